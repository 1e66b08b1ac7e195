"""``core.text``'s CSV side: cells that would start a spreadsheet formula are escaped (OWASP, "CSV Injection"), the
escape is undone exactly on import, and numbers stay numbers."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from core.text import csv_as_typed, csv_bytes, csv_safe, neutralise, unneutralise

ARMED = ['=HYPERLINK("http://evil","x")', "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd", "=1", "@evil"]
PLAIN = ["", "reader 1", "-0.25", "+3", "1e-3", "a=b", "'quoted", "S-01"]


@pytest.mark.parametrize("text", ARMED)
def test_formula_cells_get_a_leading_quote_and_come_back(text):
    assert neutralise(text) == "'" + text
    assert unneutralise(neutralise(text)) == text


@pytest.mark.parametrize("text", PLAIN)
def test_other_cells_are_left_alone(text):
    assert neutralise(text) == text and unneutralise(text) == text


@pytest.mark.parametrize("text", ["'=x", "''=x", "'@", "'-x"])
def test_the_escape_is_a_bijection_even_for_typed_quotes(text):
    assert neutralise(text) == "'" + text  # a quote typed before a formula is kept, not eaten by the import
    assert unneutralise(neutralise(text)) == text


def test_csv_bytes_escapes_text_not_numbers_and_reads_back():
    frame = pd.DataFrame({"reader_id": ["@evil", "r1"], "comment": ["=2+5", None], "rating": [-1.5, 3.0]})
    data = csv_bytes(frame)
    assert data.decode().splitlines() == ["reader_id,comment,rating", "'@evil,'=2+5,-1.5", "r1,,3.0"]
    back = csv_as_typed(pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False))
    assert list(back["reader_id"]) == ["@evil", "r1"] and list(back["comment"]) == ["=2+5", ""]
    renamed = csv_safe(frame.rename(columns={"comment": "=c"}))
    assert list(renamed.columns) == ["reader_id", "'=c", "rating"]
    assert list(csv_as_typed(renamed.astype(str)).columns) == ["reader_id", "=c", "rating"]
