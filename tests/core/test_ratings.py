"""The one rule that makes a read's answer and confidence an ROC score, and the reads CSV that carries it: ``score``
first, else ``rating_scale`` (a column, or given for files without one), else the rating as given."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.stats import reader_score
from core.stats.report import AnalysisError, analyze_reads, read_reads


def test_answer_and_confidence_make_a_ten_point_scale():
    scores = reader_score(np.array([0, 0, 1, 1]), np.array([5, 1, 1, 5]), "five")
    assert list(scores) == [1, 5, 6, 10]  # negative certain ... negative unsure, positive unsure ... positive certain
    assert list(reader_score([0, 1], [12, 88], "hundred")) == [12, 88]
    assert np.isnan(reader_score([1], [np.nan], "five")[0])
    with pytest.raises(ValueError, match="unknown rating scale"):
        reader_score([1], [3], "ten")


READS = "case_id,reader_id,label,rating{extra}\nA,r1,1,5{a}\nB,r1,0,5{b}\nC,r1,1,2{c}\nD,r1,0,2{d}\n"


def _reads(extra="", **cells):
    return READS.format(extra=extra, **{k: cells.get(k, "") for k in "abcd"}).encode()


def test_a_score_column_is_taken_as_it_is():
    reads = read_reads(_reads(",score", a=",10.0", b=",1.0", c=",7.0", d=",4.0"), "ABCD")
    assert list(reads["rating"]) == [10.0, 1.0, 7.0, 4.0]


def test_a_rating_scale_applies_the_rule_from_the_file_or_the_caller():
    by_column = read_reads(_reads(",rating_scale", a=",five", b=",five", c=",five", d=",five"), "ABCD")
    assert list(by_column["rating"]) == [10.0, 1.0, 7.0, 4.0]
    by_caller = read_reads(_reads(), "ABCD", rating_scale="five")
    assert list(by_caller["rating"]) == [10.0, 1.0, 7.0, 4.0]
    assert list(read_reads(_reads(), "ABCD")["rating"]) == [5.0, 5.0, 2.0, 2.0]  # no scale: as given
    with pytest.raises(AnalysisError, match="carries its own score"):
        read_reads(_reads(",score", a=",1", b=",1", c=",1", d=",1"), "ABCD", rating_scale="five")


def test_ratings_off_their_scale_are_named_by_line():
    bad = _reads(",rating_scale", a=",five", b=",hundred", c=",ten", d=",five").replace(b"D,r1,0,2", b"D,r1,0,2.5")
    with pytest.raises(AnalysisError) as error:
        read_reads(bad, "ABCD")
    message = str(error.value)
    assert "2 problem(s)" in message  # line 3 (5 on the 0-100 scale) is fine
    assert "line 4: rating_scale must be one of five, hundred, not 'ten'" in message
    assert "line 5: rating on the five scale must be a whole number from 1 to 5, not 2.5" in message
    with pytest.raises(AnalysisError, match="line 3: score must be a number, not 'inf'"):
        read_reads(_reads(",score", a=",1", b=",inf", c=",1", d=",1"), "ABCD")


def test_one_arm_is_taken_alone_and_lines_keep_their_numbers():
    text = b"case_id,reader_id,arm,label,rating\nA,r1,FL,1,5\nB,r1,FL,0,1\nA,r1,WL,1,5\nB,r1,WL,0,x\nA,r2,WL,1,3\n"
    fl = read_reads(text, "AB", arm="FL")
    assert set(fl["arm"]) == {"FL"} and len(fl) == 2  # r2 read nothing in FL: not a problem for the FL analysis
    with pytest.raises(AnalysisError, match="line 5: rating must be a number, not 'x'"):
        read_reads(text, "AB", arm="WL")
    with pytest.raises(AnalysisError, match="no reads in arm 'CLE'"):
        read_reads(text, "AB", arm="CLE")


def test_the_scale_decides_a_readers_auc():
    """The issue: a 5-point confidence alone ranks a sure negative with a sure positive; the rule does not."""
    rng = np.random.default_rng(0)
    truth = np.array([0, 1] * 20)
    label = np.where(rng.random(40) < 0.9, truth, 1 - truth)
    confidence = rng.integers(3, 6, 40)
    cases = [f"c{i}" for i in range(40)]
    predictions = pd.DataFrame({"case_id": cases, "truth": truth, "score": np.clip(truth * 0.6 + 0.2, 0, 1)})
    reads = pd.DataFrame({"case_id": cases, "reader_id": "r", "label": label, "rating": confidence})

    def auc(**scale):
        frame = read_reads(reads.to_csv(index=False).encode(), cases, **scale)
        report = analyze_reads(predictions, frame, bootstrap=50, permutations=50)
        return report["raters"]["r"]["auc"]["estimate"]

    assert auc(rating_scale="five") > 0.8 and abs(auc() - 0.5) < 0.2
