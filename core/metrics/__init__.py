"""Classification metrics (segmentation and localization metrics follow in later issues)."""
