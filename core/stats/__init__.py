"""Statistics of diagnostic accuracy studies.

- ``thresholds``: operating-threshold policies (sens90, closest, Youden, fixed).
- ``compare``: the CNN against each reader and the readers' average: vectorized case bootstrap CIs, paired
  permutation tests, exact McNemar, DeLong's test for correlated AUCs, error analysis.
- ``mrmc``: multi-reader multi-case ROC analysis (Obuchowski-Rockette, Hillis ddf), model vs readers, binary MRMC.
- ``ratings``: the one rule that makes a reader's answer and confidence an ROC score (``reader_score``).
- ``report``: the analysis from CSV files (``python -m core analyze``).
"""

from core.stats.ratings import RATING_SCALES, reader_score

__all__ = ["RATING_SCALES", "reader_score"]
