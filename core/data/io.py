"""Robust reading of specimen images (PNG, JPEG, TIFF, NumPy ``.npy``) into one normalised :class:`Image`.

Everything a clinician uploads goes through :func:`read_image`. Whatever is wrong with a file, the caller gets an
:class:`ImageError` carrying one reason that says what to do next, never a Pillow, tifffile or NumPy exception.
The format is sniffed from the content's magic bytes (an extension says nothing about what a file holds), and the
declared image size is checked from the header before any pixel is decoded, so a decompression bomb never allocates
memory. Decoded pixels are normalised to three dtypes (uint8, uint16, float32) and two layouts ((H, W) and
(H, W, 3)) so that no other module has to care about Pillow modes, palettes, alpha or byte order.

:func:`encode_clean` re-encodes an image losslessly with nothing but its pixels (no EXIF, text chunks or ICC
profile), which is what the project stores: patient data hidden in metadata never reaches the database.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

__all__ = [
    "MAX_ASPECT",
    "MAX_BYTES",
    "MAX_PIXELS",
    "MOSAIC_MAX_PIXELS",
    "MIN_SIDE",
    "FileError",
    "Image",
    "ImageError",
    "encode_clean",
    "read_image",
    "sha256_hex",
]

_DEFAULT_MAX_PIXELS = 50_000_000
_MAX_PIXELS_ENV = "IOAI_MAX_PIXELS"


def _env_max_pixels() -> int | None:
    """The pixel limit set in the environment, or None when unset or not a positive integer."""
    value = os.environ.get(_MAX_PIXELS_ENV, "").strip().replace("_", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


MAX_PIXELS: int = _env_max_pixels() or _DEFAULT_MAX_PIXELS
# Whole RCM mosaics reach 12,000 x 12,000 px; they are read on purpose, with this limit instead.
MOSAIC_MAX_PIXELS: int = max(MAX_PIXELS, 150_000_000)
MAX_BYTES: int = 200 * 1024 * 1024
MIN_SIDE: int = 16
MAX_ASPECT: float = 20.0

_FORMATS = ("PNG", "JPEG", "TIFF", "NPY")
_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
_ACCEPTED = "expected PNG, JPEG, TIFF or NumPy .npy"
_SNIFF_BYTES = 132

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"\x93NUMPY", "NPY"),
)
_OTHER_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"%PDF", "PDF"),
    (0, b"PK\x03\x04", "ZIP archive (.zip, .npz, Office document)"),
    (128, b"DICM", "DICOM"),
    (8, b"WEBP", "WebP"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
)
_TEXT_BYTES = frozenset(string.printable.encode("ascii"))

_EXIF_ORIENTATION = 0x0112
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class FileError(ValueError):
    """A file that cannot be used, with the reason in words a clinician can act on.

    ``str(error)`` is ``"<name>: <reason>"`` so it can be shown as is; ``.name`` and ``.reason`` are kept apart for
    tables that list many files.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple[type[FileError], tuple[str, str]]:
        """Pickle by (name, reason), so the error survives worker processes and caches."""
        return type(self), (self.name, self.reason)


class ImageError(FileError):
    """An image file that cannot be used (see :class:`FileError`)."""


@dataclass(frozen=True)
class Image:
    """One decoded image: the pixels in one of three dtypes and two layouts, its display name and source format.

    ``array`` is (H, W) single channel or (H, W, 3) RGB, dtype uint8, uint16 or float32 (finite). Arrays made by
    :func:`read_image` are read-only, so an Image held in a cache cannot be changed by accident. ``format`` is the
    sniffed container ("PNG", "JPEG", "TIFF" or "NPY"; in-memory arrays count as "NPY").
    """

    array: np.ndarray
    name: str
    format: str

    def __post_init__(self) -> None:
        """Refuse an Image that breaks the layout and dtype promises the rest of the project relies on."""
        array = self.array
        if not isinstance(array, np.ndarray) or array.dtype not in _DTYPES:
            raise ImageError(self.name, "pixels must be a uint8, uint16 or float32 NumPy array")
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
            raise ImageError(self.name, f"pixels must have shape (H, W) or (H, W, 3), not {array.shape}")
        if self.format not in _FORMATS:
            raise ImageError(self.name, f"format must be one of {', '.join(_FORMATS)}, not {self.format!r}")

    @property
    def height(self) -> int:
        """Rows of pixels."""
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        """Columns of pixels."""
        return int(self.array.shape[1])

    @property
    def is_rgb(self) -> bool:
        """True for (H, W, 3) colour images."""
        return self.array.ndim == 3

    @property
    def bit_depth(self) -> int:
        """Bits per sample: 8, 16 or 32 (float)."""
        return self.array.dtype.itemsize * 8


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as lowercase hex: the identity under which cleaned images and checkpoints are stored."""
    return hashlib.sha256(data).hexdigest()


def read_image(
    source: str | os.PathLike | bytes | np.ndarray,
    name: str | None = None,
    *,
    max_pixels: int | None = None,
) -> Image:
    """Read a path, the bytes of an upload or an in-memory array into a normalised :class:`Image`.

    ``name`` is what error messages and tables show; it defaults to the file name, ``"upload"`` for bytes and
    ``"array"`` for arrays. The pixel limit is ``max_pixels`` if given, else the ``IOAI_MAX_PIXELS`` environment
    variable read at call time, else :data:`MAX_PIXELS`. Bytes larger than :data:`MAX_BYTES` are refused before
    decoding (a path on disk is not an upload and is only bounded by the pixel limit).

    Normalisation: palette, CMYK and YCbCr become RGB; alpha is dropped (not composited); bilevel and bool become
    uint8 0/255; integers that fit 0..65535 become uint16, others are refused; float64 becomes float32; (H, W, 1) is
    squeezed and channel-first (C, H, W) arrays with C <= 4 are moved to channels-last. The EXIF/TIFF orientation tag
    is applied, so the pixels are upright as in any image viewer and stay so after :func:`encode_clean` drops the
    tag. ICC profiles are ignored: pixels are used as stored. Pillow reads 16-bit colour PNGs at 8 bits per channel
    (the high byte); colour photos feed WL models at 8 bits anyway, and 16-bit colour should come as TIFF.

    Raises ImageError, and only ImageError, for anything wrong with the content; TypeError for a source of the
    wrong type (a programming error, not a bad file).
    """
    limit = max_pixels if max_pixels is not None else (_env_max_pixels() or MAX_PIXELS)
    if isinstance(source, np.ndarray):
        label = name if name is not None else "array"
        array = _normalise_array(source, label, limit)
        return Image(array=array, name=label, format="NPY")
    if isinstance(source, bytes | bytearray | memoryview):
        label = name if name is not None else "upload"
        data = bytes(source)
        if len(data) > MAX_BYTES:
            raise ImageError(
                label,
                f"the file is {_mib(len(data))}, above the upload limit of {_mib(MAX_BYTES)}; "
                "downsample it or save it with lossless compression first",
            )
        return _decode(io.BytesIO(data), len(data), label, limit)
    if isinstance(source, str | os.PathLike):
        path = Path(os.fsdecode(source))
        label = name if name is not None else path.name
        try:
            with path.open("rb") as handle:
                return _decode(handle, os.fstat(handle.fileno()).st_size, label, limit)
        except FileNotFoundError:
            raise ImageError(label, f"the file was not found ({path}); check the path") from None
        except IsADirectoryError:
            raise ImageError(label, f"{path} is a folder, not an image file; choose the image inside it") from None
        except PermissionError:
            raise ImageError(
                label, f"the file cannot be read (permission denied: {path}); check its permissions"
            ) from None
        except OSError as exc:
            raise ImageError(
                label, f"the file cannot be read ({exc.strerror or exc}); copy it locally and retry"
            ) from None
    raise TypeError(f"read_image expects a path, bytes or a NumPy array, not {type(source).__name__}")


def encode_clean(image: Image) -> tuple[bytes, str]:
    """Re-encode ``image`` losslessly with nothing but its pixels; returns ``(data, extension)``.

    uint8 grey or RGB and uint16 grey become PNG (no text chunks, EXIF or ICC profile: Pillow only writes what it is
    given). uint16 RGB and float32, which PNG cannot hold, become a Deflate-compressed TIFF written by tifffile with
    ``metadata=None``, no description and no software tag. The extension has its dot (".png" or ".tif").
    """
    array = np.ascontiguousarray(image.array)
    buffer = io.BytesIO()
    if array.dtype == np.uint8 or (array.dtype == np.uint16 and array.ndim == 2):
        PILImage.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue(), ".png"
    photometric = "rgb" if array.ndim == 3 else "minisblack"
    tifffile.imwrite(
        buffer,
        array,
        photometric=photometric,
        compression="zlib",
        metadata=None,
        description=None,
        software=False,
    )
    return buffer.getvalue(), ".tif"


def _mib(size: int) -> str:
    """A byte count in MiB for messages."""
    return f"{size / 1024 / 1024:,.1f} MiB".replace(".0 MiB", " MiB")


def _decode(handle: BinaryIO, size: int, name: str, limit: int) -> Image:
    """Sniff the container from the first bytes of ``handle`` and hand it to the matching decoder."""
    if size == 0:
        raise ImageError(name, "the file is empty (0 bytes); re-export the image and upload it again")
    head = handle.read(_SNIFF_BYTES)
    handle.seek(0)
    kind = _sniff(head, name)
    decoders: dict[str, Callable[[BinaryIO, str, int], np.ndarray]] = {
        "PNG": _decode_pillow_png,
        "JPEG": _decode_pillow_jpeg,
        "TIFF": _decode_tiff,
        "NPY": _decode_npy,
    }
    return Image(array=decoders[kind](handle, name, limit), name=name, format=kind)


def _sniff(head: bytes, name: str) -> str:
    """The accepted format named by the magic bytes, or an ImageError that names what the file is instead."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    for offset, magic, label in _OTHER_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            raise ImageError(name, f"not an accepted image format ({label}): {_ACCEPTED}; export it as PNG or TIFF")
    if head and set(head) <= _TEXT_BYTES:
        raise ImageError(name, f"not an image but a text file: {_ACCEPTED}; check that you chose the right file")
    raise ImageError(name, f"not an image: {_ACCEPTED}; check that you chose the right file")


def _corrupt(name: str, exc: BaseException) -> ImageError:
    """The one message for any decoder failure on damaged data."""
    detail = str(exc).strip() or type(exc).__name__
    return ImageError(
        name, f"the file is truncated or corrupt and cannot be decoded; re-export it and upload it again ({detail})"
    )


def _check_geometry(height: int, width: int, name: str, limit: int) -> None:
    """Refuse sizes that are too many pixels, not specimen-shaped or too small, before anything is decoded."""
    pixels = height * width
    if pixels > limit:
        raise _too_many_pixels(name, pixels, limit)
    short, long = min(height, width), max(height, width)
    if short > 0 and long / short > MAX_ASPECT:
        ratio = f"{long / short:,.1f}".removesuffix(".0")
        limit_text = f"{MAX_ASPECT:g}"
        raise ImageError(
            name,
            f"aspect ratio 1:{ratio} is not a specimen image (at most 1:{limit_text}); "
            "crop the specimen or upload the full photo",
        )
    if short < MIN_SIDE:
        raise ImageError(
            name,
            f"the image is {width} x {height} pixels; the smallest accepted side is {MIN_SIDE} px; "
            "upload the full-resolution image",
        )


def _too_many_pixels(name: str, pixels: int, limit: int) -> ImageError:
    """The decompression-bomb / oversize refusal."""
    return ImageError(name, f"the image has {pixels:,} pixels, above the limit of {limit:,}; downsample it first")


def _decode_pillow_png(handle: BinaryIO, name: str, limit: int) -> np.ndarray:
    """Decode a PNG with Pillow; animated PNGs are refused."""
    return _decode_pillow(handle, name, limit, "PNG")


def _decode_pillow_jpeg(handle: BinaryIO, name: str, limit: int) -> np.ndarray:
    """Decode a JPEG with Pillow; of a multi-picture (MPO) camera JPEG only the primary image is used."""
    return _decode_pillow(handle, name, limit, "JPEG")


def _decode_pillow(handle: BinaryIO, name: str, limit: int, kind: str) -> np.ndarray:
    """Open lazily, check the declared size, then decode and normalise.

    Pillow's ``Image.open`` only parses the header, so the size is checked before ``load`` allocates pixels. Pillow's
    own decompression-bomb guard (process-wide ``MAX_IMAGE_PIXELS``, left as Pillow sets it because other code in the
    process relies on it) can fire inside ``open`` first; its error is translated to the same message. Truncated data
    makes ``load`` raise because ``LOAD_TRUNCATED_IMAGES`` is left off.
    """
    try:
        with PILImage.open(handle, formats=[kind]) as pil:
            if kind == "PNG" and getattr(pil, "n_frames", 1) > 1:
                raise ImageError(name, f"the image has {pil.n_frames} frames (animated); upload one image per file")
            _check_geometry(pil.height, pil.width, name, limit)
            pil.load()
            orientation = _pil_orientation(pil)
            array = _pil_to_array(pil, name)
    except ImageError:
        raise
    except PILImage.DecompressionBombError as exc:
        found = _BOMB_PIXELS.search(str(exc))
        pillow_limit = 2 * (PILImage.MAX_IMAGE_PIXELS or limit)
        pixels = int(found.group(1)) if found else max(limit, pillow_limit) + 1
        raise _too_many_pixels(name, pixels, min(limit, pillow_limit)) from None
    except UnidentifiedImageError:
        raise ImageError(name, f"the {kind} header is damaged and cannot be read; re-export the image") from None
    except Exception as exc:  # any failure of a decoder on untrusted bytes is a damaged file, not a program error
        raise _corrupt(name, exc) from None
    return _normalise_array(_orient(array, orientation), name, limit)


def _pil_orientation(pil: PILImage.Image) -> int:
    """The EXIF/TIFF orientation tag (1 = upright); unreadable EXIF counts as upright rather than failing the file."""
    try:
        value = pil.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF in an otherwise sound image: the pixels are still usable as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply the orientation tag (1-8, as in EXIF and TIFF) so the array is upright, as ImageOps.exif_transpose does."""
    transforms: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    transform = transforms.get(orientation)
    return transform(array) if transform else array


def _pil_to_array(pil: PILImage.Image, name: str) -> np.ndarray:
    """Pixels of a decoded Pillow image, before dtype/layout normalisation (see :func:`read_image`)."""
    mode = pil.mode
    if mode in ("P", "PA"):
        return np.asarray(pil.convert("RGBA"))[..., :3]
    if mode in ("CMYK", "YCbCr"):
        return np.asarray(pil.convert("RGB"))
    if mode in ("1", "L", "RGB", "I", "F") or mode.startswith("I;16"):
        return np.asarray(pil)
    if mode in ("LA", "La"):
        return np.asarray(pil)[..., 0]
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(pil)[..., :3]
    raise ImageError(name, f"the colour mode {mode} is not supported; save the image as RGB or greyscale")


def _decode_tiff(handle: BinaryIO, name: str, limit: int) -> np.ndarray:
    """Read a single-page TIFF: header checks with tifffile, pixels with Pillow where lossless, else tifffile.

    tifffile parses the page structure without decoding, so page count and size are checked first. Pillow decodes
    8-bit and bilevel TIFFs (it knows JPEG-in-TIFF, CCITT, palettes, YCbCr) and single-channel uint16/float32
    exactly; it would silently cut 16-bit colour to 8 bits and cannot read float64, so those go to tifffile.
    Reduced-resolution pages (thumbnails) do not count as pages.
    """
    try:
        with tifffile.TiffFile(handle) as tif:
            pages = [page for page in tif.pages if not getattr(page, "is_reduced", False)]
            if len(pages) > 1:
                raise ImageError(name, f"the image has {len(pages)} pages; upload one image per file")
            if not pages:
                raise ImageError(name, "the TIFF holds no image; re-export it")
            page = pages[0]
            _check_geometry(int(page.imagelength), int(page.imagewidth), name, limit)
            if page.dtype is None:
                raise ImageError(name, "the TIFF sample format is not supported; save it as 8/16-bit or float32")
            dtype, samples = np.dtype(page.dtype), int(page.samplesperpixel)
            orientation = int(getattr(page, "orientation", 1) or 1)
            use_pillow = dtype.kind == "b" or dtype == np.uint8 or (samples == 1 and dtype in (np.uint16, np.float32))
            if not use_pillow:
                return _normalise_array(_orient(_tifffile_pixels(page, name), orientation), name, limit)
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types on damaged structure; all mean the same to the user
        raise _corrupt(name, exc) from None
    handle.seek(0)
    return _decode_pillow(handle, name, limit, "TIFF")


def _tifffile_pixels(page: tifffile.TiffPage, name: str) -> np.ndarray:
    """Decode one page with tifffile, naming the compression when this installation lacks its codec."""
    try:
        return page.asarray()
    except (KeyError, ValueError) as exc:
        if "imagecodecs" in str(exc):
            compression = getattr(page.compression, "name", str(page.compression))
            raise ImageError(
                name,
                f"the TIFF uses {compression} compression, which cannot be decoded here; "
                "re-save it uncompressed or with Deflate (ZIP) compression",
            ) from None
        raise


def _decode_npy(handle: BinaryIO, name: str, limit: int) -> np.ndarray:
    """Load a ``.npy`` without pickle, checking shape and dtype from its header before the data is read."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except Exception as exc:  # a damaged header is a damaged file
        raise _corrupt(name, exc) from None
    if dtype.hasobject or dtype.fields is not None:
        raise ImageError(
            name,
            "the .npy file holds Python objects (pickled data), not pixel values; save a numeric array with numpy.save",
        )
    height, width = _layout(tuple(shape), name)
    _check_geometry(height, width, name, limit)
    handle.seek(0)
    try:
        array = np.load(handle, allow_pickle=False)
    except Exception as exc:  # short data, bad header padding, ...
        raise _corrupt(name, exc) from None
    return _normalise_array(array, name, limit)


def _layout(shape: tuple[int, ...], name: str) -> tuple[int, int]:
    """(height, width) of an array shape, accepting (H, W), (H, W, C) and channel-first (C, H, W) with C <= 4."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        if shape[0] <= 4 < shape[2]:
            return shape[1], shape[2]
        return shape[0], shape[1]
    raise ImageError(name, f"the array has shape {shape}; expected (H, W) greyscale or (H, W, 3) colour")


def _normalise_array(array: np.ndarray, name: str, limit: int) -> np.ndarray:
    """Bring any decoded array to the Image contract: (H, W) or (H, W, 3); uint8, uint16 or finite float32."""
    height, width = _layout(array.shape, name)
    _check_geometry(height, width, name, limit)
    if array.ndim == 3 and array.shape[0] <= 4 < array.shape[2]:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels == 1:
            array = array[..., 0]
        elif channels == 4:
            array = array[..., :3]
        elif channels == 2:
            raise ImageError(name, "the image has 2 channels; expected 1 (greyscale) or 3 (RGB); export it as such")
        elif channels != 3:
            raise ImageError(
                name,
                f"the array has shape {array.shape}, which is not one image; expected (H, W) greyscale or (H, W, 3) "
                "colour: save one image per file",
            )
    return _normalise_dtype(array, name)


def _normalise_dtype(array: np.ndarray, name: str) -> np.ndarray:
    """Convert to uint8/uint16/float32 by the rules of :func:`read_image`; returns a read-only contiguous copy."""
    kind = array.dtype.kind
    if kind == "b":
        out = array.astype(np.uint8) * np.uint8(255)
    elif array.dtype == np.uint8:
        out = np.array(array, dtype=np.uint8)
    elif kind in "ui":
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 65535:
            raise ImageError(
                name,
                f"pixel values range {low:,}..{high:,}, outside 0..65,535; save the image as 16-bit or float32",
            )
        out = array.astype(np.uint16)
    elif kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            out = array.astype(np.float32)
        bad = int(np.count_nonzero(~np.isfinite(out)))
        if bad:
            raise ImageError(
                name,
                f"the image has NaN or infinite values (or values too large for float32) in {bad:,} of "
                f"{out.size:,} samples; replace them (e.g. with 0) and export again",
            )
    else:
        raise ImageError(name, f"pixel type {array.dtype} is not an image; save a uint8, uint16 or float array")
    out = np.ascontiguousarray(out)
    out.setflags(write=False)
    return out
