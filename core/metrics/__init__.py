"""Metrics: classification (at a threshold, AUC, vectorized confusion counts) and localization (pixel AUC, Dice
sweep, FCN mean accuracy / mean IU / frequency-weighted IU, region precision and recall by seed 001's 75 % rule)."""
