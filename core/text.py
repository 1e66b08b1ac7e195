"""Text that users typed or uploaded, made safe where it goes: spreadsheets, markdown and plots.

- **CSV.** A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a live formula when the
  file is opened in a spreadsheet (OWASP, "CSV Injection"). :func:`neutralise` prefixes such a cell with a single
  quote, which spreadsheets show as text; :func:`unneutralise` undoes exactly that, so a file this project exported
  can be imported again unchanged. Leading quotes are counted, so the pair is a bijection on strings (``'=x`` exports
  as ``''=x`` and imports back as ``'=x``). Plain numbers (``-0.25``) are numbers in every spreadsheet, so they are
  left alone. :func:`csv_bytes` is the one way this project writes a CSV a person may open.
- **Markdown.** :func:`md_escape` backslash-escapes every ASCII punctuation character (CommonMark lets any of them be
  escaped), so a file name like ``![x](http://host/a.png)`` is shown as those characters, not as an image or a
  link, and ``$``, ``:red[...]`` or ``# `` cannot become maths, colours or headings; line breaks become spaces.
  Escapes are not enough for Streamlit's renderer: after parsing, plugins rewrite the *text* (escapes already
  gone) again, turning ``http://``, ``www.`` and e-mail addresses into links (GFM literal autolinks), ``:smile:``
  and ``:streamlit:`` into pictures and `` -> `` or `` -- `` into arrows and dashes. An invisible word joiner
  (U+2060) right after the trigger (``:``, ``@``, ``www``, the first of the two characters) breaks each of those
  patterns; it is the only character md_escape adds to what the reader sees.
- **Plots.** Plotly reads its titles, legend names and hover texts as a small HTML dialect (``<a href>``, ``<b>``,
  ``<br>``); :func:`plot_escape` turns ``&``, ``<`` and ``>`` into entities that Plotly shows as those characters.
"""

from __future__ import annotations

import re
import string
from typing import Any

import pandas as pd

__all__ = [
    "FORMULA_TRIGGERS",
    "csv_as_typed",
    "csv_bytes",
    "csv_safe",
    "md_escape",
    "neutralise",
    "plot_escape",
    "unneutralise",
]

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")
_JOINER = "\u2060"
# Where Streamlit's text plugins would match: `:` opening a shortcode (`:smile:`, `:streamlit:`) or `://`, `@` of an
# e-mail address, `www.`, and the arrows and dashes `->`, `<-`, `<->`, `--`, `>=`, `<=`, `~=`.
_REWRITTEN = re.compile(r"(?<=:)(?=[\w+/-])|(?<=@)(?=[\w.+-])|(?<=www)(?=\.)|(?<=[<>~-])(?=[=>-])", re.IGNORECASE)


def _armed(text: str) -> bool:
    """Whether ``text``, past any leading single quotes, starts like a formula (and is not a plain number)."""
    rest = text.lstrip("'")
    return rest[:1] in FORMULA_TRIGGERS and rest[:1] != "" and not _NUMBER.fullmatch(rest)


def neutralise(value: Any) -> Any:
    """``value`` safe for a spreadsheet cell: strings that would start a formula get a leading ``'``."""
    if isinstance(value, str) and _armed(value):
        return "'" + value
    return value


def unneutralise(value: Any) -> Any:
    """The inverse of :func:`neutralise`: a cell this project escaped, read back as it was typed."""
    if isinstance(value, str) and value.startswith("'") and _armed(value):
        return value[1:]
    return value


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with every text cell and column name neutralised (numbers, dates and booleans as they
    are)."""
    out = frame.copy()
    out.columns = [neutralise(str(c)) for c in out.columns]
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(neutralise)
    return out


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as UTF-8 CSV bytes, neutralised against formulas: every CSV download and export goes through here."""
    return csv_safe(frame).to_csv(index=False).encode()


def csv_as_typed(frame: pd.DataFrame) -> pd.DataFrame:
    """A CSV read as text (``dtype=str``), with every cell and column name :func:`unneutralise` d: what people typed.
    Only cells that start with a quote can carry the escape, so only those are looked at."""
    out = frame.copy()
    out.columns = [unneutralise(c) for c in out.columns]
    for position in range(out.shape[1]):
        cells = out.iloc[:, position]
        if cells.dtype == object or pd.api.types.is_string_dtype(cells):
            quoted = cells.str.startswith("'", na=False).to_numpy()
            if quoted.any():
                out.iloc[quoted, position] = cells[quoted].map(unneutralise)
    return out


def _escape_line(text: str) -> str:
    return _PUNCTUATION.sub(r"\\\1", _REWRITTEN.sub(_JOINER, text))


def md_escape(text: Any, *, multiline: bool = False) -> str:
    """``text`` for use inside markdown (``st.markdown``, captions, labels, options): shown literally, on one line.

    With ``multiline`` (a block of its own, such as a study's instructions), each line is kept as a line and blank
    lines as paragraph breaks; lines lose their leading and trailing spaces (which markdown would read as code)."""
    if not multiline:
        return _escape_line(_LINE_BREAKS.sub(" ", str(text)))
    lines = re.split(r"\r\n|[\r\n\u2028\u2029]", str(text).strip())
    return "  \n".join(_escape_line(line.strip()) for line in lines)


def plot_escape(text: Any) -> str:
    """``text`` for a Plotly title, legend or hover label: shown literally, not read as Plotly's HTML dialect."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
