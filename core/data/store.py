"""Content-addressed image storage inside the workspace.

Every accepted image is re-encoded losslessly without metadata (EXIF, text chunks, ICC profiles, TIFF tags: no
patient names or device serials survive) and stored as ``images/<aa>/<sha256>.<ext>``, where the sha256 is that of
the stored bytes. The same pixels uploaded twice are stored once. Files are written to a temporary name and
renamed, so a crash never leaves a half-written image under its final name.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from core.data.io import Image, encode_clean, sha256_hex

__all__ = ["StoredImage", "npy_bytes", "png_bytes", "store_image", "write_atomic"]


@dataclass(frozen=True)
class StoredImage:
    path: str  # relative to the workspace root
    sha256: str
    height: int
    width: int


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array, pixels only (Pillow writes no metadata it is not given)."""
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array as it is (dtype kept; no pickled objects)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def store_image(image: Image, root: str | os.PathLike[str], folder: str = "images") -> StoredImage:
    """Store ``image`` under ``root/folder`` by content; returns its workspace-relative path and sha256."""
    data, extension = encode_clean(image)
    digest = sha256_hex(data)
    relative = Path(folder) / digest[:2] / f"{digest}.{extension.lstrip('.')}"
    target = Path(root) / relative
    if not target.exists():
        write_atomic(target, data)
    return StoredImage(relative.as_posix(), digest, image.height, image.width)
