"""Metrics: classification (at a threshold, AUC, vectorized confusion counts), localization (pixel AUC, Dice
sweep, FCN mean accuracy / mean IU / frequency-weighted IU, region precision and recall by seed 001's 75 % rule) and
agreement between readers' drawn masks (pairwise Dice and IoU, STAPLE consensus, majority vote, leave-one-out
human baseline, COCO RLE)."""
