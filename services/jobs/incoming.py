"""Uploads kept for a job: the bytes a person uploaded, written into the workspace for a worker to read.

A job's parameters name its input files by workspace-relative path (``kinds._workspace_file``), never by bytes, so
a page first keeps the upload here: ``<workspace>/incoming/<random uuid><suffix>``, written atomically. The name is
random, so nothing a person typed ends up in a path; only the suffix is kept, from an allow-list per kind of upload.
Image uploads are also refused at once when their first bytes are not an image format the readers accept (PNG,
JPEG, TIFF, NumPy), so an obvious wrong file never becomes a job that fails on the cluster. A cohort zip's contents
are checked by the ``import`` kind itself (a zip, with a ``manifest.csv``).
"""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath, PureWindowsPath

from core.data.store import write_atomic
from core.settings import workspace_dir

__all__ = ["FOLDER", "MAX_UPLOAD_BYTES", "SUFFIXES", "discard_upload", "keep_upload"]

FOLDER = "incoming"
MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # the app's upload limit (.streamlit/config.toml: server.maxUploadSize = 200)
_IMAGES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
SUFFIXES: dict[str, tuple[str, ...]] = {
    "cohort": (".zip",),
    "mosaic": (".png", ".tif", ".tiff", ".npy"),
    "image": _IMAGES,
    "clip": (".tif", ".tiff", ".mp4", ".avi", ".mov", ".mkv", ".webm", ".zip"),
}
# the first bytes of each image format the readers accept (core.data.io sniffs the same ones)
_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    b"\x93NUMPY",
)


def _suffix(original_name: str, kind: str) -> str:
    """The upload's suffix, lower case, when ``kind`` allows it (the last part of a name, whatever its separators)."""
    if kind not in SUFFIXES:
        raise ValueError(f"unknown kind of upload {kind!r}; one of {', '.join(SUFFIXES)}")
    name = PureWindowsPath(PurePosixPath(str(original_name)).name).name
    suffix = PurePosixPath(name).suffix.lower()
    allowed = SUFFIXES[kind]
    if suffix not in allowed:
        raise ValueError(f"{name or 'the file'}: only {', '.join(allowed)} files are taken here; choose another file")
    return suffix


def keep_upload(data: bytes, original_name: str, *, kind: str, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """Write an upload to ``<workspace>/incoming/<uuid><suffix>``; its workspace-relative POSIX path.

    ``kind`` is ``cohort`` (a .zip), ``mosaic``, ``image`` or ``clip``. ``ValueError`` says what is wrong: a suffix
    the kind does not take, an empty file, one over ``max_bytes``, or an image or clip upload whose bytes are not
    one."""
    suffix = _suffix(original_name, kind)
    if not data:
        raise ValueError(f"{original_name} is empty (0 bytes); choose the file again")
    if len(data) > max_bytes:
        raise ValueError(
            f"{original_name} is {len(data) / 1024 / 1024:,.1f} MiB; files up to {max_bytes / 1024 / 1024:,.0f} MiB "
            "are accepted"
        )
    if kind == "clip":
        from core.data.clips import is_clip

        if not is_clip(data[:256]):
            raise ValueError(
                f"{original_name} is not a clip (a multi-page TIFF, an MP4, AVI, MOV or MKV video, or a zip of "
                "frames); check the file"
            )
    elif kind != "cohort" and not data.startswith(_IMAGE_MAGIC):
        raise ValueError(f"{original_name} is not an image (PNG, JPEG, TIFF or NumPy .npy); check the file")
    relative = PurePosixPath(FOLDER) / f"{uuid.uuid4().hex}{suffix}"
    write_atomic(workspace_dir() / relative, data)
    return relative.as_posix()


def discard_upload(relative: str) -> None:
    """Remove a kept upload that will not become a job (its job was refused); only files in the incoming folder."""
    path = PurePosixPath(relative)
    if path.parent != PurePosixPath(FOLDER) or path.name in ("", ".", ".."):
        raise ValueError(f"{relative!r} is not a kept upload")
    (workspace_dir() / path).unlink(missing_ok=True)
