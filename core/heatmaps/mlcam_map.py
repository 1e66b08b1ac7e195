"""The MLCAM-LICI final diagnostic feature map as a heatmap method (seed 000, section 2.2, eq. 5).

The model computes the map itself (``MLCAMLICI.fdfm``: lateral inhibition of each depth's normalised DFM by its NFM,
collateral integration over pairs of depths); this module only registers it, so ``core.models`` never imports the
heatmap package. The method keys on ``fdfm``, a name only MLCAM-LICI models have, so it is offered only for them.
"""

from __future__ import annotations

from core.heatmaps.base import register_model_map

__all__ = ["MLCAMLICIMap"]

MLCAMLICIMap = register_model_map(
    "mlcam-lici",
    "MLCAM-LICI",
    "fdfm",
    "Final diagnostic feature map of MLCAM-LICI (seed 000, eq. 5): multi-layer CAMs with lateral inhibition and "
    "collateral integration.",
)
