"""``core.text``: user text shown literally in markdown and in Plotly labels.

Streamlit renders markdown in two passes: the markdown parser (where a backslash escape makes any ASCII punctuation
literal), then plugins that rewrite the resulting *text*, escapes already gone. The patterns below are the ones
those plugins match, copied from Streamlit 1.67's frontend (``StreamlitMarkdown``: GFM literal autolinks,
remark-emoji, the ``:streamlit:`` logo and the typographic arrows and dashes).
"""

from __future__ import annotations

import html
import re
import string

import pytest

from core.text import md_escape, plot_escape

HOSTILE = [
    "![x](http://host/beacon.png) [Session expired](http://host/phish)",
    "<img src=x onerror=alert(1)> <a href='http://host'>y</a> &lt;b&gt;",
    ":red[alert] :material/warning: :smile: :+1: :-1: :streamlit: $x^2$ $$\\int$$",
    "# heading\n> quote\n- item\n1. item\n```\ncode\n```\n|a|b|\n|-|-|",
    "see www.host.example, https://host.example/x or mail@host.example",
    "a -> b <- c <-> d -- e >= f <= g ~= h",
    "**bold** _it_ ~~gone~~ `code` [ref][1] [1]: http://host \\*not\\* 10:30",
]
_ESCAPED = re.compile(r"\\[" + re.escape(string.punctuation) + "]")
_TEXT_PLUGINS = {  # Streamlit's text-node rewrites; \w is ASCII in JavaScript
    "autolink url": re.compile(r"(https?://|www(?=\.))[-.\w]+", re.IGNORECASE | re.ASCII),
    "autolink e-mail": re.compile(r"[-.\w+]+@[-\w]+(?:\.[-\w]+)+", re.ASCII),
    "emoji": re.compile(r":\+1:|:-1:|:[\w-]+:", re.ASCII),
    "typography": re.compile(r"(^|\s)(<->|->|<-|--|>=|<=|~=)(\s|$)"),
}


def _parsed_text(source: str) -> str:
    """What the markdown parser leaves as text: each backslash escape replaced by its character."""
    return _ESCAPED.sub(lambda m: m.group(0)[1], source)


@pytest.mark.parametrize("text", HOSTILE)
def test_md_escape_leaves_no_markdown_syntax(text):
    escaped = md_escape(text)
    assert "\n" not in escaped and "\r" not in escaped
    unescaped = _ESCAPED.sub("", escaped)
    assert not set(unescaped) & set(string.punctuation), unescaped  # every ASCII punctuation is escaped


@pytest.mark.parametrize("text", HOSTILE)
def test_md_escape_defeats_streamlits_text_plugins(text):
    shown = _parsed_text(md_escape(text))
    for name, pattern in _TEXT_PLUGINS.items():
        assert not pattern.search(shown), f"{name}: {shown!r}"


@pytest.mark.parametrize("text", HOSTILE)
def test_md_escape_shows_the_characters_themselves(text):
    """Nothing is dropped or replaced: the reader sees the text (line breaks as spaces), with invisible joiners."""
    shown = _parsed_text(md_escape(text)).replace("\u2060", "")
    assert shown == re.sub(r"[\r\n]+", " ", text)


def test_md_escape_adds_joiners_only_where_a_plugin_would_match():
    assert md_escape("scan 12.png, FL") == r"scan 12\.png\, FL"
    assert md_escape("http://h") == "http\\:\u2060\\/\\/h"
    assert md_escape("a@b") == "a\\@\u2060b"
    assert md_escape("WWW.x") == "WWW\u2060\\.x"
    assert md_escape("x -> y") == "x \\-\u2060\\> y"


def test_md_escape_multiline_keeps_lines_and_paragraphs():
    text = "Read each case.\n  - no lists\r\n\n    not code\n# not a heading "
    escaped = md_escape(text, multiline=True)
    assert escaped == "Read each case\\.  \n\\- no lists  \n  \nnot code  \n\\# not a heading"
    for line in escaped.split("  \n"):
        assert not set(_ESCAPED.sub("", line)) & set(string.punctuation)
    assert md_escape("line one\nline two") == "line one line two"


def test_plot_escape_shows_plotlys_html_dialect_as_text():
    text = "<a href='http://host'>x</a> <b>&amp;</b> <br>"
    escaped = plot_escape(text)
    assert "<" not in escaped and ">" not in escaped
    assert html.unescape(escaped) == text
    assert plot_escape("reader 1") == "reader 1"
