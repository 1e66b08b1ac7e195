"""Core library: image I/O, synthetic cohorts, models, training, heatmaps, metrics and statistics.

Never imports streamlit or db; usable from notebooks and from the CLI (``python -m core``).
"""
