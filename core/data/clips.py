"""Streaming reading of confocal laser endomicroscopy (CLE) clips into one frame at a time.

A CLE probe streams up to 20 frames/s, so a clip from one biopsy site has hundreds to thousands of frames: a
10-minute clip must never sit in memory whole. :func:`open_clip` reads four containers the way they come out of CLE
systems and image tools: a multi-page TIFF (tifffile, page by page), a video (MP4, MOV, AVI, MKV/WebM through PyAV,
decoded as a stream), a zip of frame images or a folder of them (PNG, JPEG, TIFF or ``.npy``, in natural order, so
``frame2`` comes before ``frame10``; each frame is read by :func:`core.data.io.read_image`).

As in :mod:`core.data.io`, whatever is wrong with a clip, the caller gets a :class:`ClipError` with one reason that
says what to do next, never a tifffile, PyAV or zipfile exception. The container is sniffed from the content (an
extension says nothing about what a file holds); everything that can be checked without decoding the pixels (size of
the file, stated frame count and duration, frame size, zip entries) is checked when the clip is opened, with the first
frame, and the rest as the frames stream by: a clip whose remainder is truncated or damaged, whose header understated
its length or whose frames change size raises :class:`ClipError` naming the frame (counted from 1).
"""

from __future__ import annotations

import io
import math
import os
import queue
import re
import struct
import threading
import weakref
import zipfile
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

import av
import numpy as np
import tifffile

from core.data.io import MAX_BYTES, FileError, ImageError, read_image

__all__ = ["Clip", "ClipError", "ClipInfo", "ClipLimits", "is_clip", "open_clip"]

_SNIFF_BYTES = 132
_ACCEPTED = "a video (MP4, MOV, AVI or MKV), a multi-page TIFF or a zip of frames"
_SINGLE_IMAGE = "one image, not a clip: use single-image diagnosis"
_EMPTY = "the clip holds no frames (empty); export it again"
_FRAME_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy"})
_FRAME_FORMATS = "PNG, JPEG, TIFF or .npy"
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
_BOMB_RATIO = 100
_BOMB_FLOOR = 1024 * 1024
_GREY_SPREAD = 2
_TRUNCATION_SLACK = 0.01
_STOP_POLL_SECONDS = 0.05  # how often a decoding thread waiting on a full queue looks whether it was stopped

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_MATROSKA_MAGIC = b"\x1a\x45\xdf\xa3"
_QUICKTIME_ATOMS = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
_STILL_BRANDS = (b"heic", b"heix", b"mif1", b"avif")
_STILL_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"\xff\xd8\xff"),
    (0, b"\x93NUMPY"),
    (0, b"BM"),
    (8, b"WEBP"),
)
_OTHER_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"%PDF", "PDF"),
    (128, b"DICM", "DICOM"),
    (0, b"RIFF", "RIFF (not AVI)"),
)
_TEXT_BYTES = frozenset(bytes(range(32, 127)) + b"\t\n\r\x0b\x0c")


class ClipError(FileError):
    """A clip that cannot be used (see :class:`core.data.io.FileError`: ``"<name>: <reason>"``, pickled by both)."""


@dataclass(frozen=True)
class ClipLimits:
    """What :func:`open_clip` accepts: frames, seconds (a video's stated duration), bytes (the file; for a zip also
    what its entries expand to, for a folder its frame files together) and pixels per frame."""

    max_frames: int = 24_000
    max_seconds: float = 1_200.0
    max_bytes: int = 2 * 1024**3
    max_frame_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        """Refuse limits that would refuse every clip."""
        for field in ("max_frames", "max_seconds", "max_bytes", "max_frame_pixels"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be positive, not {getattr(self, field)}")


@dataclass(frozen=True)
class ClipInfo:
    """What is known of a clip once opened.

    ``kind`` is "tiff", "video" or "frames" (a zip or a folder). ``n_frames`` is the TIFF's pages, the zip's or
    folder's frame files, or a video container's stated count (None where it states none). ``fps`` is a video
    stream's average rate, or the rate an ImageJ or tifffile TIFF states; else None. ``height`` and ``width`` are those
    of the first frame, which every frame shares.
    """

    name: str
    kind: str
    n_frames: int | None
    fps: float | None
    height: int
    width: int


class _Source(Protocol):
    """Where a clip's frames come from: its info, the first frame's shape and dtype, and the frames in order."""

    info: ClipInfo
    shape: tuple[int, ...]
    dtype: np.dtype

    def arrays(self) -> Iterator[tuple[str | None, np.ndarray]]:
        """(entry name or None, frame) for every frame, from the first, decoding one at a time."""
        ...

    def close(self) -> None:
        """Release files and containers."""
        ...


class Clip:
    """An opened clip (made by :func:`open_clip`): ``info`` and its frames, decoded one at a time.

    Frames are (H, W) uint8 or uint16 greyscale, or (H, W, 3) uint8 RGB for colour; each is read-only or a fresh
    array, never reused. :meth:`frames` and :meth:`batches` can be called again to go through the clip once more. A
    context manager: leaving it (or :meth:`close`) closes the file, archive or video containers, also those of
    iterations not run to the end.
    """

    def __init__(self, source: _Source, limits: ClipLimits) -> None:
        self.info = source.info
        self._source = source
        self._limits = limits
        self._running: weakref.WeakSet[Generator[np.ndarray, None, None]] = weakref.WeakSet()
        self._closed = False

    def frames(self) -> Iterator[np.ndarray]:
        """The frames in order; nothing is decoded before the first is asked for.

        Raises ClipError when a frame cannot be decoded (the clip breaks off there), when more than ``max_frames``
        come, when a video ends well before the frame count its header states, or when a frame's size, colour or bit
        depth differs from the first frame's; each message names the frame.
        """
        stream = self._stream()
        self._running.add(stream)
        return stream

    def batches(self, size: int, *, ahead: int = 0) -> Iterator[list[np.ndarray]]:
        """:meth:`frames` in lists of ``size``; the last may be shorter.

        ``ahead`` > 0 decodes up to that many batches ahead on a thread of its own while the caller works on the
        current one: torch releases the GIL while a network runs, so decoding goes on meanwhile (PyAV holds the GIL
        for much of a video frame, so videos gain less than TIFFs and zips, whose codecs release it). At most
        ``ahead`` + 1 batches are held besides the caller's. The batches, and the errors, are the same either way: an
        error of the decoding thread (a :class:`ClipError` naming the frame) is raised in the caller, in the place of
        the batch it broke. Closing the iterator, or the clip, stops the thread and closes its stream; close it when
        the loop may end early (an exception in the loop's body, a cancel), e.g. with :func:`contextlib.closing`.
        """
        if size < 1:
            raise ValueError(f"a batch needs at least one frame, not {size}")
        if ahead < 0:
            raise ValueError(f"batches decoded ahead must be 0 or more, not {ahead}")
        if not ahead:
            return _grouped(self.frames(), size)
        stream = self._prefetched(size, ahead)
        self._running.add(stream)
        return stream

    def close(self) -> None:
        """Stop running iterations and close the clip's files; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._running):
            stream.close()
        self._source.close()

    def __enter__(self) -> Clip:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Clip({self.info!r})"

    def _prefetched(self, size: int, ahead: int) -> Generator[list[np.ndarray], None, None]:
        """The batches, decoded by a thread that runs at most ``ahead`` batches in front of the caller."""
        ready: queue.Queue[list[np.ndarray] | BaseException | None] = queue.Queue(maxsize=ahead)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._decode_ahead, args=(size, ready, stop), name=f"decode {self.info.name}", daemon=True
        )
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()

    def _decode_ahead(
        self, size: int, ready: queue.Queue[list[np.ndarray] | BaseException | None], stop: threading.Event
    ) -> None:
        """The decoding thread: batches, then None at the end, or the error that ended the stream; it returns as
        soon as ``stop`` is set, closing its stream."""

        def put(item: list[np.ndarray] | BaseException | None) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=_STOP_POLL_SECONDS)
                    return True
                except queue.Full:
                    continue
            return False

        frames = self._stream()
        try:
            for batch in _grouped(frames, size, stop):
                if not put(batch):
                    return
            put(None)
        except BaseException as error:  # handed to the caller, whose loop raises it
            put(error)
        finally:
            frames.close()

    def _stream(self) -> Generator[np.ndarray, None, None]:
        if self._closed:
            raise ValueError(f"the clip {self.info.name} is closed")
        name, limits = self.info.name, self._limits
        arrays = self._source.arrays()
        first = (self._source.shape, self._source.dtype)
        count = 0
        try:
            while True:
                try:
                    entry, frame = next(arrays)
                except StopIteration:
                    break
                except ClipError:
                    raise
                except Exception as exc:  # any decoder failure on untrusted bytes is a damaged clip
                    raise _broken(name, count, exc) from None
                count += 1
                if count > limits.max_frames:
                    raise ClipError(
                        name,
                        f"the clip has more than {limits.max_frames:,} frames, the limit; its header understated its "
                        "length: cut it into shorter clips",
                    )
                _check_like_first(frame.shape, frame.dtype, first, name, _where(count, entry))
                yield frame
        finally:
            arrays.close()
        stated = self.info.n_frames
        if stated is not None and stated - count > max(2, _TRUNCATION_SLACK * stated):
            raise ClipError(
                name,
                f"the clip ends after frame {count:,} of the {stated:,} its header states: the file is truncated; "
                "copy or export the clip again",
            )


def _grouped(
    frames: Iterator[np.ndarray], size: int, stop: threading.Event | None = None
) -> Generator[list[np.ndarray], None, None]:
    """``frames`` in lists of ``size`` (the last may be shorter); ends early, quietly, once ``stop`` is set."""
    batch: list[np.ndarray] = []
    for frame in frames:
        if stop is not None and stop.is_set():
            return
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_clip(head: bytes) -> bool:
    """Whether these first bytes (at least 16) look like a container :func:`open_clip` reads (TIFF, MP4/MOV, AVI,
    Matroska/WebM, ZIP).

    A TIFF is only a clip when it has more than one page, which needs the whole file: any TIFF counts here and
    :func:`open_clip` decides.
    """
    return _sniff(head) is not None


def open_clip(source: str | Path | bytes, name: str | None = None, *, limits: ClipLimits = ClipLimits()) -> Clip:
    """Open a clip: a multi-page TIFF, a video, a zip of frame images, or a folder of them.

    ``source`` is a path (a file or a folder) or the bytes of an upload; the container is sniffed from the first
    bytes, not the name. ``name`` is what messages show (default: the path's name, ``"upload"`` for bytes). The
    header and the first frame are read and checked now; refused at once with ClipError: a file that is not a clip
    (a single image is told to go to single-image diagnosis), corrupt, empty, an undecodable codec, longer than
    ``limits`` allow (stated frames or seconds), too large (bytes, pixels per frame), a zip with entries that are not
    frame images (``__MACOSX`` and dot-files are skipped), with paths leaving the archive, or expanding like a zip
    bomb. The rest is checked as :meth:`Clip.frames` streams.

    Raises ClipError for anything wrong with the content; TypeError for a source of the wrong type.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        label = name if name is not None else "upload"
        data = bytes(source)
        return _open_file(lambda: io.BytesIO(data), data[:_SNIFF_BYTES], len(data), label, limits)
    if isinstance(source, str | os.PathLike):
        path = Path(os.fsdecode(source))
        label = name if name is not None else path.name
        try:
            if path.is_dir():
                return Clip(_FolderFrames(path, label, limits), limits)
            with path.open("rb") as handle:
                head = handle.read(_SNIFF_BYTES)
                size = os.fstat(handle.fileno()).st_size
        except OSError as exc:
            raise _unreadable(label, path, exc) from None
        return _open_file(lambda: path.open("rb"), head, size, label, limits)
    raise TypeError(f"open_clip expects a path or bytes, not {type(source).__name__}")


def _open_file(opener: Callable[[], BinaryIO], head: bytes, size: int, name: str, limits: ClipLimits) -> Clip:
    """Check the size, sniff the container and open it."""
    if size == 0:
        raise ClipError(name, "the file is empty (0 bytes); export the clip again")
    if size > limits.max_bytes:
        raise ClipError(
            name,
            f"the file is {_bytes(size)}, above the limit of {_bytes(limits.max_bytes)}; cut it into shorter clips",
        )
    kind = _sniff(head)
    if kind is None:
        raise _not_a_clip(head, name)
    if kind == "video":
        return Clip(_VideoFrames(opener, _demuxer(head), name, limits), limits)
    try:
        handle = opener()
    except OSError as exc:
        raise ClipError(name, f"the file cannot be read ({exc.strerror or exc}); copy it locally and retry") from None
    try:
        source: _Source = _TiffFrames(handle, name, limits) if kind == "tiff" else _ZipFrames(handle, name, limits)
    except BaseException:
        handle.close()
        raise
    return Clip(source, limits)


def _sniff(head: bytes) -> str | None:
    """The container the magic bytes name ("tiff", "video" or "zip"), or None."""
    if head.startswith(_TIFF_MAGIC):
        return "tiff"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    return "video" if _demuxer(head) else None


def _demuxer(head: bytes) -> str | None:
    """The FFmpeg demuxer for a video's first bytes ("mov", "avi", "matroska"), or None for anything else.

    Naming it keeps FFmpeg from probing the file into formats that read other files (playlists, concat lists).
    """
    if head[4:8] in _QUICKTIME_ATOMS and not (head[4:8] == b"ftyp" and head[8:12] in _STILL_BRANDS):
        return "mov"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(_MATROSKA_MAGIC):
        return "matroska"
    return None


def _not_a_clip(head: bytes, name: str) -> ClipError:
    """The refusal of a file that is no clip container, naming what it is where the bytes tell."""
    if any(head[offset : offset + len(magic)] == magic for offset, magic in _STILL_MAGIC) or (
        head[4:8] == b"ftyp" and head[8:12] in _STILL_BRANDS
    ):
        return ClipError(name, _SINGLE_IMAGE)
    for offset, magic, label in _OTHER_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return ClipError(name, f"not a clip format read here ({label}): export the clip as {_ACCEPTED}")
    if set(head) <= _TEXT_BYTES:
        return ClipError(name, f"not a clip but a text file: expected {_ACCEPTED}; check that you chose the right file")
    return ClipError(name, f"not a clip: expected {_ACCEPTED}; check that you chose the right file")


def _unreadable(name: str, path: Path, exc: OSError) -> ClipError:
    """The refusal of a path that cannot be opened."""
    if isinstance(exc, FileNotFoundError):
        return ClipError(name, f"the file was not found ({path}); check the path")
    if isinstance(exc, PermissionError):
        return ClipError(name, f"the file cannot be read (permission denied: {path}); check its permissions")
    return ClipError(name, f"the file cannot be read ({exc.strerror or exc}); copy it locally and retry")


def _bytes(size: int) -> str:
    """A byte count for messages: bytes, MiB or GiB."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2)):
        if size >= scale:
            return f"{size / scale:,.1f}".removesuffix(".0") + f" {unit}"
    return f"{size:,} bytes"


def _seconds(value: float) -> str:
    """A duration for messages: "1.5 s", "90 s", "1,500 s (25 min)"."""
    text = f"{value:,.1f}".removesuffix(".0") if value < 100 else f"{value:,.0f}"
    return f"{text} s ({value / 60:,.0f} min)" if value >= 120 else f"{text} s"


def _detail(exc: BaseException) -> str:
    """What a decoder said, for the end of a message: FFmpeg's words without its error number."""
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return str(exc).strip() or type(exc).__name__


def _where(index: int, entry: str | None) -> str:
    """How messages name a frame: "frame 7", or "frame 7 (frame0007.png)" for a file of a zip or folder."""
    return f"frame {index:,}" if entry is None else f"frame {index:,} ({entry})"


def _broken(name: str, done: int, exc: BaseException) -> ClipError:
    """The one message for a clip that cannot be decoded past frame ``done``."""
    return ClipError(
        name,
        f"the clip breaks off after frame {done:,}: frame {done + 1:,} cannot be decoded (the file is truncated or "
        f"damaged); export the clip again ({_detail(exc)})",
    )


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
    """A frame's size, bit depth and colour for messages, e.g. "128 x 96 px, 8-bit greyscale"."""
    colour = "colour" if len(shape) == 3 else "greyscale"
    return f"{shape[1]} x {shape[0]} px, {dtype.itemsize * 8}-bit {colour}"


def _check_like_first(
    shape: tuple[int, ...], dtype: np.dtype, first: tuple[tuple[int, ...], np.dtype], name: str, where: str
) -> None:
    """Refuse a frame whose size, colour or bit depth differs from the first frame's (``first``: shape, dtype)."""
    if (shape, dtype) != first:
        raise ClipError(
            name,
            f"frames of different sizes: {where} is {_describe(shape, dtype)}, the first frame "
            f"{_describe(*first)}; every frame of a clip must match: export the clip again",
        )


def _check_size_like_first(
    size: tuple[int, int], first: tuple[tuple[int, ...], np.dtype], name: str, where: str
) -> None:
    """Refuse a frame whose (height, width) differs from the first frame's before it is decoded or converted."""
    shape, dtype = first
    if size != shape[:2]:
        _check_like_first(size + shape[2:], dtype, first, name, where)


def _check_frame_pixels(height: int, width: int, name: str, where: str, limits: ClipLimits) -> None:
    """Refuse frames with more pixels than the limit, before they are decoded."""
    if height * width > limits.max_frame_pixels:
        raise ClipError(
            name,
            f"{where} has {height * width:,} pixels ({width} x {height}), above the limit of "
            f"{limits.max_frame_pixels:,} per frame; export the clip at a lower resolution",
        )


def _check_frame_count(count: int, name: str, limits: ClipLimits, *, at_least: bool = False) -> None:
    """Refuse an empty clip, a single image and one with more frames than the limit."""
    if count == 0:
        raise ClipError(name, _EMPTY)
    if count == 1:
        raise ClipError(name, _SINGLE_IMAGE)
    if count > limits.max_frames:
        stated = f"more than {limits.max_frames:,}" if at_least else f"{count:,}"
        raise ClipError(
            name, f"the clip has {stated} frames, above the limit of {limits.max_frames:,}; cut it into shorter clips"
        )


def _as_frame(pixels: np.ndarray | bytes | Path, name: str, where: str, limits: ClipLimits) -> np.ndarray:
    """Decode or normalise one frame with :func:`core.data.io.read_image`; ClipError naming the frame if unusable."""
    try:
        array = read_image(pixels, where, max_pixels=limits.max_frame_pixels).array
    except ImageError as exc:
        raise ClipError(name, f"{where}: {exc.reason}") from None
    if array.dtype == np.float32:
        raise ClipError(name, f"{where} has floating-point pixels; export the clip with 8- or 16-bit frames")
    if array.dtype == np.uint16 and array.ndim == 3:
        raise ClipError(name, f"{where} is 16-bit colour; export the clip as 8-bit colour or 16-bit greyscale")
    return array


class _TiffFrames:
    """A multi-page TIFF, one page at a time (page headers are parsed as they come and not kept)."""

    def __init__(self, handle: BinaryIO, name: str, limits: ClipLimits) -> None:
        self._handle = handle
        self._name = name
        self._limits = limits
        self._tif: tifffile.TiffFile | None = None
        try:
            self._tif = tifffile.TiffFile(handle)
        except Exception as exc:  # tifffile raises many types on damaged structure
            raise _corrupt_file(name, exc) from None
        try:
            pages = self._tif.pages
            pages.cache = False
            pages.useframes = False
            try:
                pages[limits.max_frames]
            except IndexError:
                self._count = len(pages)
                if self._count and not _chain_ends(self._tif, pages[self._count - 1]):
                    raise ClipError(
                        name,
                        f"the TIFF is truncated or damaged: its pages break off after page {self._count:,}; export "
                        "the clip again",
                    ) from None
            else:
                self._count = limits.max_frames + 1
            if not self._count:
                raise ClipError(name, _EMPTY)
            first = self._pixels(pages[0], 1)  # first, so that one damaged page is not taken for one image
            _check_frame_count(self._count, name, limits, at_least=True)
            fps = _tiff_fps(self._tif)
        except ClipError:
            self.close()
            raise
        except Exception as exc:  # a damaged page chain or first page
            self.close()
            raise _corrupt_file(name, exc) from None
        self.shape, self.dtype = first.shape, first.dtype
        self.info = ClipInfo(name, "tiff", self._count, fps, first.shape[0], first.shape[1])

    def arrays(self) -> Iterator[tuple[str | None, np.ndarray]]:
        pages = self._tif.pages
        for index in range(self._count):
            page = pages[index]
            size = (int(page.imagelength), int(page.imagewidth))
            _check_size_like_first(size, (self.shape, self.dtype), self._name, _where(index + 1, None))
            yield None, self._pixels(page, index + 1)

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
        self._handle.close()

    def _pixels(self, page: tifffile.TiffPage, index: int) -> np.ndarray:
        where = _where(index, None)
        _check_frame_pixels(int(page.imagelength), int(page.imagewidth), self._name, where, self._limits)
        ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False)]
        if not ends or max(ends) > self._tif.filehandle.size:
            raise ClipError(
                self._name,
                f"the TIFF is truncated: the pixels of {where} are missing or cut off; export the clip again",
            )
        try:
            array = page.asarray()
        except (KeyError, ValueError) as exc:
            if "imagecodecs" not in str(exc):
                raise
            compression = getattr(page.compression, "name", str(page.compression))
            raise ClipError(
                self._name,
                f"the TIFF uses {compression} compression, which cannot be decoded here; re-save the clip "
                "uncompressed or with Deflate (ZIP) compression",
            ) from None
        return _as_frame(array, self._name, where, self._limits)


def _chain_ends(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> bool:
    """Whether the page's link to a next page is 0, i.e. the chain of pages ends there rather than breaking off.

    tifffile stops quietly (it logs) at a link that points outside the file, as in a truncated TIFF, which would
    otherwise pass for a shorter clip or a single image.
    """
    tiff, handle = tif.tiff, tif.filehandle
    handle.seek(page.offset)
    tags = struct.unpack(tiff.tagnoformat, handle.read(tiff.tagnosize))[0]
    handle.seek(page.offset + tiff.tagnosize + tags * tiff.tagsize)
    link = handle.read(tiff.offsetsize)
    return len(link) == tiff.offsetsize and struct.unpack(tiff.offsetformat, link)[0] == 0


def _tiff_fps(tif: tifffile.TiffFile) -> float | None:
    """The frame rate an ImageJ (``fps`` or ``finterval``) or tifffile (``fps``) description states, or None."""
    imagej = tif.imagej_metadata or {}
    shaped = tif.shaped_metadata or ({},)
    interval = _positive(imagej.get("finterval"))
    return _positive(imagej.get("fps")) or (1.0 / interval if interval else None) or _positive(shaped[0].get("fps"))


def _positive(value: object) -> float | None:
    """``value`` as a float when it is a finite positive number (metadata may hold anything), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _corrupt_file(name: str, exc: BaseException) -> ClipError:
    """The refusal of a clip whose structure or first frame cannot be read."""
    return ClipError(
        name, f"the file is damaged or truncated and cannot be read; export the clip again ({_detail(exc)})"
    )


class _VideoFrames:
    """A video decoded as a stream by PyAV; every pass opens its own container, closed when the pass ends."""

    def __init__(self, opener: Callable[[], BinaryIO], demuxer: str, name: str, limits: ClipLimits) -> None:
        self._opener = opener
        self._demuxer = demuxer
        self._name = name
        self._containers: set[av.container.InputContainer] = set()
        with self._demux() as (container, stream):
            context = stream.codec_context
            if context is None:
                raise ClipError(
                    name,
                    "the video's codec is unknown or cannot be decoded here (no decoder for it); export the clip as "
                    "H.264 MP4",
                )
            codec = context.codec.long_name or context.name
            if context.width and context.height:
                _check_frame_pixels(context.height, context.width, name, "each frame", limits)
            seconds = _duration(stream, container)
            if seconds is not None and seconds > limits.max_seconds:
                raise ClipError(
                    name,
                    f"the clip lasts {_seconds(seconds)}, above the limit of {_seconds(limits.max_seconds)}; "
                    "cut it into shorter clips",
                )
            stated = int(stream.frames) or None
            if stated is not None:
                _check_frame_count(stated, name, limits)
            try:
                first = next(container.decode(stream), None)
            except Exception as exc:  # PyAV raises FFmpegError subclasses, and others on odd data
                raise ClipError(
                    name,
                    f"the {codec} video cannot be decoded: the file is damaged; export the clip again ({_detail(exc)})",
                ) from None
            if first is None:
                raise ClipError(name, "the video holds no frames (empty); export the clip again")
            _check_frame_pixels(first.height, first.width, name, "the first frame", limits)
            self._format = _frame_format(first)
            array = first.to_ndarray(format=self._format)
            rate = stream.average_rate or stream.guessed_rate
        self.shape, self.dtype = array.shape, array.dtype
        fps = float(rate) if rate else None
        self.info = ClipInfo(name, "video", stated, fps, first.height, first.width)

    def arrays(self) -> Iterator[tuple[str | None, np.ndarray]]:
        first = (self.shape, self.dtype)
        with self._demux() as (container, stream):
            for index, frame in enumerate(container.decode(stream), start=1):
                _check_size_like_first((frame.height, frame.width), first, self._name, _where(index, None))
                yield None, frame.to_ndarray(format=self._format)

    def close(self) -> None:
        for container in list(self._containers):
            container.close()

    @contextmanager
    def _demux(self) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
        """An input container and its first video stream; ClipError if the file is no readable video."""
        try:
            handle = self._opener()
        except OSError as exc:
            raise ClipError(
                self._name, f"the file cannot be read ({exc.strerror or exc}); copy it locally and retry"
            ) from None
        try:
            try:
                container = av.open(handle, format=self._demuxer, metadata_errors="replace")
            except Exception as exc:  # FFmpegError and its subclasses: not a video, damaged header, ...
                raise ClipError(
                    self._name, f"the file is damaged or not a video; export the clip again ({_detail(exc)})"
                ) from None
            self._containers.add(container)
            try:
                if not container.streams.video:
                    raise ClipError(
                        self._name, "the file holds no video stream (perhaps only sound); export the clip as a video"
                    )
                yield container, container.streams.video[0]
            finally:
                self._containers.discard(container)
                container.close()
        finally:
            handle.close()


def _duration(stream: av.VideoStream, container: av.container.InputContainer) -> float | None:
    """Seconds the video stream (else the container) states, or None."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _frame_format(frame: av.VideoFrame) -> str:
    """The format frames are converted to: "gray" or "gray16le" for grey streams, else "rgb24".

    A grey pixel format is grey; a YUV or RGB stream is grey when its first frame is (the chroma of a grey clip
    encoded as YUV is neutral), so one clip is decoded one way throughout.
    """
    pixel_format = frame.format
    if pixel_format.name.startswith(("gray", "ya", "mono")):
        return "gray16le" if pixel_format.components[0].bits > 8 else "gray"
    rgb = frame.to_ndarray(format="rgb24").astype(np.int16)
    spread = max(int(np.abs(rgb[..., 0] - rgb[..., 1]).max()), int(np.abs(rgb[..., 1] - rgb[..., 2]).max()))
    return "gray" if spread <= _GREY_SPREAD else "rgb24"


class _FrameFiles:
    """Frames from image files in natural order: the entries of a zip or the files of a folder."""

    def __init__(self, entries: list[str], read: Callable[[int], bytes | Path], name: str, limits: ClipLimits) -> None:
        self._entries = entries
        self._read = read
        self._name = name
        self._limits = limits
        _check_frame_count(len(entries), name, limits)
        try:
            first = self._frame(0)
        except ClipError:
            raise
        except Exception as exc:  # zipfile or file errors on the first entry
            raise _corrupt_file(name, exc) from None
        self.shape, self.dtype = first.shape, first.dtype
        self.info = ClipInfo(name, "frames", len(entries), None, first.shape[0], first.shape[1])

    def arrays(self) -> Iterator[tuple[str | None, np.ndarray]]:
        for index, entry in enumerate(self._entries):
            yield entry, self._frame(index)

    def _frame(self, index: int) -> np.ndarray:
        return _as_frame(self._read(index), self._name, _where(index + 1, self._entries[index]), self._limits)


class _ZipFrames(_FrameFiles):
    """A zip of frame images, checked from its central directory before any entry is read."""

    def __init__(self, handle: BinaryIO, name: str, limits: ClipLimits) -> None:
        self._handle = handle
        try:
            self._zip = zipfile.ZipFile(handle)
        except Exception as exc:  # BadZipFile, or OSError/ValueError on a damaged directory
            raise ClipError(
                name, f"the zip archive is damaged and cannot be read; zip the frames again ({_detail(exc)})"
            ) from None
        try:
            infos = _zip_frames(self._zip.infolist(), name, limits)
            super().__init__(
                [info.filename for info in infos], lambda index: self._zip.read(infos[index]), name, limits
            )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._zip.close()
        self._handle.close()


def _zip_frames(infos: list[zipfile.ZipInfo], name: str, limits: ClipLimits) -> list[zipfile.ZipInfo]:
    """The frame entries in natural order, refusing traversal, non-images, encryption and zip-bomb expansion."""
    frames = []
    total = 0
    for info in infos:
        entry = info.filename
        parts = re.split(r"[\\/]", entry)
        if entry.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", entry) or ".." in parts:
            raise ClipError(
                name,
                f"the zip entry {entry} points outside the archive, which is refused for safety; zip the frames "
                "again from their folder",
            )
        if info.is_dir() or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):
            continue
        if PurePosixPath(parts[-1]).suffix.lower() not in _FRAME_SUFFIXES:
            raise ClipError(
                name,
                f"the zip holds {entry}, which is not a frame image ({_FRAME_FORMATS}); remove it and zip the frames "
                "again",
            )
        if info.flag_bits & 0x1:
            raise ClipError(name, f"the zip entry {entry} is encrypted; zip the frames again without a password")
        if info.compress_type not in _ZIP_METHODS:
            raise ClipError(
                name,
                f"the zip entry {entry} uses a compression method that cannot be read here; zip the frames again "
                "with the standard (Deflate) method",
            )
        if info.file_size > _BOMB_FLOOR and info.file_size > _BOMB_RATIO * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise ClipError(
                name,
                f"the zip entry {entry} would expand {ratio:,.0f}-fold to {_bytes(info.file_size)}, like a zip bomb, "
                "and is refused; export the frames as PNG or JPEG and zip them again",
            )
        if info.file_size > MAX_BYTES:
            raise ClipError(
                name,
                f"the zip entry {entry} is {_bytes(info.file_size)}, above the limit of {_bytes(MAX_BYTES)} for one "
                "frame; export the frames at a lower resolution",
            )
        total += info.file_size
        frames.append(info)
    if total > limits.max_bytes:
        raise ClipError(
            name,
            f"the zip's frames expand to {_bytes(total)}, above the limit of {_bytes(limits.max_bytes)}; cut the clip "
            "into shorter ones",
        )
    return sorted(frames, key=lambda info: _natural_key(info.filename))


class _FolderFrames(_FrameFiles):
    """The frame images directly in a folder (subfolders, ``__MACOSX`` and dot-files are left out)."""

    def __init__(self, path: Path, name: str, limits: ClipLimits) -> None:
        files = []
        total = 0
        for child in path.iterdir():
            if child.name.startswith(".") or child.name == "__MACOSX" or child.is_dir():
                continue
            if child.suffix.lower() not in _FRAME_SUFFIXES:
                raise ClipError(
                    name,
                    f"the folder holds {child.name}, which is not a frame image ({_FRAME_FORMATS}); move it out "
                    "and try again",
                )
            total += child.stat().st_size
            files.append(child)
        if total > limits.max_bytes:
            raise ClipError(
                name,
                f"the frames in the folder take {_bytes(total)}, above the limit of {_bytes(limits.max_bytes)}; "
                "cut the clip into shorter ones",
            )
        files.sort(key=lambda child: _natural_key(child.name))
        if not files:
            raise ClipError(
                name, f"the folder holds no frame images ({_FRAME_FORMATS}) directly in it; choose the frames' folder"
            )
        super().__init__([child.name for child in files], files.__getitem__, name, limits)

    def close(self) -> None:
        """Nothing stays open between frames."""


def _natural_key(text: str) -> tuple[str | int, ...]:
    """Sort key putting ``frame2`` before ``frame10``: runs of digits compare as numbers, the rest case-blind."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(part) if index % 2 else part.casefold() for index, part in enumerate(parts))
