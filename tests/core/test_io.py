"""Tests for core.data.io: every file is generated in tmp_path (or taken from scikit-image's bundled samples)."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image as PILImage
from PIL import PngImagePlugin

from core.data import io as image_io
from core.data.io import Image, ImageError, encode_clean, read_image, sha256_hex

SAMPLES = Path(skimage.data.data_dir)
RNG_SEED = 1234


def _rng() -> np.random.Generator:
    """A fresh seeded generator per test, so tests do not depend on their order."""
    return np.random.default_rng(RNG_SEED)


def _png_bytes(array: np.ndarray, **save: object) -> bytes:
    """Encode an array as PNG with Pillow."""
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _jpeg_bytes(array: np.ndarray, **save: object) -> bytes:
    """Encode an array as JPEG with Pillow at high quality."""
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def _tiff_bytes(array: np.ndarray, **write: object) -> bytes:
    """Encode an array as TIFF with tifffile."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, metadata=None, **write)
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """Serialise an array as .npy."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched to declare width x height, with the CRC fixed."""
    data = bytearray(_png_bytes(np.zeros((16, 16), dtype=np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _write(tmp_path: Path, filename: str, data: bytes) -> Path:
    """Write bytes to a file in tmp_path and return its path."""
    path = tmp_path / filename
    path.write_bytes(data)
    return path


def _refused(source: object, phrase: str, name: str | None = None) -> ImageError:
    """Assert that reading ``source`` raises ImageError naming the file and containing ``phrase``."""
    with pytest.raises(ImageError) as caught:
        read_image(source, name)
    error = caught.value
    expected_name = name or (Path(source).name if isinstance(source, str | os.PathLike) else None)
    if expected_name is not None:
        assert error.name == expected_name
        assert str(error).startswith(f"{expected_name}: ")
    assert phrase in error.reason, error.reason
    return error


# --- reading good files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "mode"),
    [
        (np.arange(24 * 40, dtype=np.uint8).reshape(24, 40), "L"),
        (np.arange(24 * 40 * 3, dtype=np.uint8).reshape(24, 40, 3), "RGB"),
        ((np.arange(24 * 40, dtype=np.uint32).reshape(24, 40) * 61).astype(np.uint16), "I;16"),
    ],
)
def test_png_lossless_round_trip(tmp_path: Path, array: np.ndarray, mode: str) -> None:
    path = _write(tmp_path, "specimen.png", _png_bytes(array))
    assert PILImage.open(path).mode == mode
    image = read_image(path)
    assert image.format == "PNG" and image.name == "specimen.png"
    assert image.array.dtype == array.dtype
    np.testing.assert_array_equal(image.array, array)
    assert (image.height, image.width) == (24, 40)
    assert image.is_rgb == (array.ndim == 3)
    assert image.bit_depth == array.dtype.itemsize * 8


def test_jpeg_grey_and_rgb(tmp_path: Path) -> None:
    grey = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (32, 1))
    colour = np.stack([grey, grey[::-1], np.full_like(grey, 128)], axis=2)
    for array in (grey, colour):
        image = read_image(_write(tmp_path, "photo.jpg", _jpeg_bytes(array)))
        assert image.format == "JPEG" and image.array.shape == array.shape and image.array.dtype == np.uint8
        assert np.abs(image.array.astype(int) - array).mean() < 3


@pytest.mark.parametrize(
    "array",
    [
        np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100,
        np.linspace(-5.5, 1e6, 20 * 30, dtype=np.float32).reshape(20, 30),
        np.arange(20 * 30 * 3, dtype=np.uint16).reshape(20, 30, 3) * 30,
        np.linspace(0, 1, 20 * 30 * 3, dtype=np.float32).reshape(20, 30, 3),
        np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3),
    ],
    ids=["uint16", "float32", "uint16-rgb", "float32-rgb", "uint8-rgb"],
)
def test_tiff_exact(tmp_path: Path, array: np.ndarray) -> None:
    image = read_image(_write(tmp_path, "fl.tif", _tiff_bytes(array)))
    assert image.format == "TIFF"
    assert image.array.dtype == array.dtype
    np.testing.assert_array_equal(image.array, array)


def test_tiff_float64_becomes_float32_and_planar_rgb_is_channels_last(tmp_path: Path) -> None:
    values = _rng().random((20, 24))
    image = read_image(_tiff_bytes(values))
    assert image.array.dtype == np.float32
    np.testing.assert_allclose(image.array, values, rtol=1e-6)
    planar = _rng().integers(0, 65535, (3, 20, 24), dtype=np.uint16)
    image = read_image(_tiff_bytes(planar, photometric="rgb", planarconfig="separate"))
    np.testing.assert_array_equal(image.array, np.moveaxis(planar, 0, -1))


def test_alpha_palette_bilevel_and_cmyk_are_normalised() -> None:
    rgba = _rng().integers(0, 256, (20, 30, 4), dtype=np.uint8)
    np.testing.assert_array_equal(read_image(_png_bytes(rgba)).array, rgba[..., :3])

    la = PILImage.merge("LA", [PILImage.fromarray(rgba[..., 0]), PILImage.fromarray(rgba[..., 3])])
    buffer = io.BytesIO()
    la.save(buffer, format="PNG")
    np.testing.assert_array_equal(read_image(buffer.getvalue()).array, rgba[..., 0])

    palette = PILImage.fromarray(rgba[..., :3]).quantize(colors=8)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    np.testing.assert_array_equal(read_image(buffer.getvalue()).array, np.asarray(palette.convert("RGB")))

    bilevel = PILImage.fromarray(rgba[..., 0] > 128).convert("1")
    buffer = io.BytesIO()
    bilevel.save(buffer, format="PNG")
    image = read_image(buffer.getvalue())
    assert image.array.dtype == np.uint8 and set(np.unique(image.array)) <= {0, 255}
    np.testing.assert_array_equal(image.array == 255, rgba[..., 0] > 128)

    cmyk = PILImage.fromarray(rgba[..., :3]).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=95)
    image = read_image(buffer.getvalue())
    assert image.format == "JPEG" and image.array.shape == (20, 30, 3)


def test_format_is_sniffed_from_content_not_extension(tmp_path: Path) -> None:
    path = _write(tmp_path, "really_a_png.jpg", _png_bytes(np.zeros((20, 20), dtype=np.uint8)))
    assert read_image(path).format == "PNG"


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.ones((20, 30), dtype=bool), np.uint8),
        (np.full((20, 30), 7, dtype=np.int32), np.uint16),
        (np.full((20, 30), 65535, dtype=np.int64), np.uint16),
        (np.full((20, 30), 0.5, dtype=np.float64), np.float32),
        (np.zeros((20, 30, 1), dtype=np.uint8), np.uint8),
        (np.zeros((20, 30, 4), dtype=np.uint16), np.uint16),
    ],
)
def test_npy_and_array_dtypes(array: np.ndarray, dtype: type) -> None:
    for image in (read_image(_npy_bytes(array), "x.npy"), read_image(array)):
        assert image.array.dtype == dtype
        assert image.array.shape[:2] == (20, 30) and image.array.ndim in (2, 3)
        assert image.format == "NPY"
    assert read_image(array).name == "array"
    if array.dtype == bool:
        assert read_image(array).array.max() == 255


def test_channel_first_array_is_moved_to_channels_last() -> None:
    array = _rng().integers(0, 256, (3, 20, 30), dtype=np.uint8)
    np.testing.assert_array_equal(read_image(array).array, np.moveaxis(array, 0, -1))


def test_arrays_are_copied_and_read_only() -> None:
    source = np.zeros((20, 20), dtype=np.uint8)
    image = read_image(source)
    source[0, 0] = 9
    assert image.array[0, 0] == 0
    with pytest.raises(ValueError):
        image.array[0, 0] = 1


def test_exif_orientation_is_applied() -> None:
    array = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30).astype(np.uint8)
    exif = PILImage.Exif()
    exif[0x0112] = 6
    image = read_image(_png_bytes(array, exif=exif))
    np.testing.assert_array_equal(image.array, np.rot90(array, k=-1))


def test_skimage_samples() -> None:
    retina = read_image(SAMPLES / "retina.jpg")
    assert retina.format == "JPEG" and retina.is_rgb and retina.name == "retina.jpg"
    camera = read_image(SAMPLES / "camera.png")
    assert camera.array.shape == (512, 512) and camera.array.dtype == np.uint8
    logo = read_image(SAMPLES / "logo.png")
    assert logo.array.shape == (500, 500, 3)


# --- refusals -------------------------------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    _refused(_write(tmp_path, "empty.png", b""), "the file is empty (0 bytes)")
    _refused(b"", "the file is empty", name="blank.tif")


@pytest.mark.parametrize(
    "encode",
    [
        lambda a: _png_bytes(a),
        lambda a: _jpeg_bytes(a),
        lambda a: _tiff_bytes(a),
        lambda a: _npy_bytes(a),
    ],
    ids=["png", "jpeg", "tiff", "npy"],
)
def test_truncated_files(tmp_path: Path, encode: Callable[[np.ndarray], bytes]) -> None:
    data = encode(_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8))
    _refused(_write(tmp_path, "cut.img", data[: len(data) // 2]), "truncated or corrupt")


def test_text_and_other_formats_are_not_images(tmp_path: Path) -> None:
    _refused(_write(tmp_path, "notes.png", b"patient 12, left frontal\n" * 10), "not an image")
    _refused(SAMPLES / "no_time_for_that_tiny.gif", "expected PNG, JPEG, TIFF or NumPy .npy")
    _refused(bytes(range(256)) * 4, "not an image", name="noise.bin")


def test_decompression_bomb_png_header(tmp_path: Path) -> None:
    error = _refused(_write(tmp_path, "bomb.png", _png_declaring(30000, 30000)), "900,000,000 pixels")
    assert "downsample it first" in error.reason
    _refused(_png_declaring(8000, 8000), "64,000,000 pixels, above the limit of 50,000,000", name="big.png")


def test_decompression_bomb_tiff_and_npy_headers(tmp_path: Path) -> None:
    data = bytearray(_tiff_bytes(np.zeros((16, 16), dtype=np.uint16)))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages[0].tags
        for tag_name in ("ImageWidth", "ImageLength"):
            tag = tags[tag_name]
            struct.pack_into("<I" if tag.dtype == 4 else "<H", data, tag.valueoffset, 30000)
    _refused(_write(tmp_path, "bomb.tif", bytes(data)), "900,000,000 pixels")

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u2", "fortran_order": False, "shape": (30000, 30000)})
    _refused(_write(tmp_path, "bomb.npy", header.getvalue()), "900,000,000 pixels")


def test_pixel_limit_from_argument_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    array = np.zeros((40, 40), dtype=np.uint8)
    with pytest.raises(ImageError, match="1,600 pixels, above the limit of 1,000"):
        read_image(array, "a", max_pixels=1000)
    monkeypatch.setenv("IOAI_MAX_PIXELS", "1000")
    _refused(_png_bytes(array), "above the limit of 1,000", name="env.png")
    assert read_image(array, max_pixels=2000).width == 40


def test_byte_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png_bytes(np.zeros((40, 40), dtype=np.uint8))
    monkeypatch.setattr(image_io, "MAX_BYTES", len(data) - 1)
    _refused(data, "above the upload limit", name="large.png")


def test_too_small_and_wrong_aspect(tmp_path: Path) -> None:
    _refused(_write(tmp_path, "dot.png", _png_bytes(np.zeros((1, 1), dtype=np.uint8))), "the image is 1 x 1 pixels")
    error = _refused(
        _write(tmp_path, "strip.png", _png_bytes(np.zeros((10, 400), dtype=np.uint8))), "aspect ratio 1:40"
    )
    assert "at most 1:20" in error.reason
    assert read_image(np.zeros((16, 320), dtype=np.uint8)).width == 320


def test_multi_page_and_animated(tmp_path: Path) -> None:
    _refused(SAMPLES / "multipage.tif", "the image has 2 pages; upload one image per file")
    stack = np.zeros((5, 20, 20), dtype=np.uint16)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for page in stack:
            writer.write(page, metadata=None)
    _refused(_write(tmp_path, "stack.tif", buffer.getvalue()), "the image has 5 pages")
    frames = [PILImage.fromarray(np.full((20, 20), value, dtype=np.uint8)) for value in (0, 100, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    _refused(_write(tmp_path, "movie.png", buffer.getvalue()), "3 frames")


def test_bad_arrays(tmp_path: Path) -> None:
    _refused(_write(tmp_path, "two.npy", _npy_bytes(np.zeros((20, 20, 2), dtype=np.uint8))), "2 channels")
    _refused(np.zeros((20, 20, 5), dtype=np.uint8), "not one image", name="five")
    _refused(np.zeros((2, 20, 20, 3), dtype=np.uint8), "expected (H, W)", name="stack")
    nan = np.ones((20, 20), dtype=np.float32)
    nan[3, 4] = np.nan
    _refused(_write(tmp_path, "nan.npy", _npy_bytes(nan)), "in 1 of 400 samples")
    _refused(_write(tmp_path, "nan.tif", _tiff_bytes(nan)), "NaN or infinite")
    _refused(np.full((20, 20), 1e300), "NaN or infinite", name="huge")
    _refused(np.full((20, 20), -1, dtype=np.int16), "outside 0..65,535", name="negative")
    _refused(np.zeros((20, 20), dtype=np.complex64), "not an image", name="complex")
    pickled = _npy_bytes(np.array([{"patient": "x"}], dtype=object), allow_pickle=True)
    _refused(_write(tmp_path, "object.npy", pickled), "pickled data")


def test_missing_path_and_folder(tmp_path: Path) -> None:
    _refused(tmp_path / "absent.png", "not found")
    _refused(tmp_path, "is a folder")
    with pytest.raises(TypeError):
        read_image(12345)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_only_image_error_on_random_and_damaged_bytes() -> None:
    rng = _rng()
    candidates = [rng.bytes(int(rng.integers(1, 400))) for _ in range(50)]
    valid = [
        _png_bytes(rng.integers(0, 256, (24, 24), dtype=np.uint8)),
        _jpeg_bytes(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)),
        _tiff_bytes(rng.integers(0, 65535, (24, 24), dtype=np.uint16)),
        _tiff_bytes(rng.random((24, 24, 3)).astype(np.float32)),
        _npy_bytes(rng.random((24, 24))),
    ]
    for data in valid:
        for _ in range(12):
            damaged = bytearray(data)
            for position in rng.integers(0, len(data), 4):
                damaged[position] = int(rng.integers(0, 256))
            candidates.append(bytes(damaged[: int(rng.integers(8, len(data) + 1))]))
    refused = 0
    for data in candidates:
        try:
            image = read_image(data)
        except ImageError:
            refused += 1
        else:
            assert isinstance(image, Image)
    assert refused >= 50


# --- clean re-encoding, hashing, types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "extension"),
    [
        (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30).astype(np.uint8), ".png"),
        (np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3), ".png"),
        (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 97, ".png"),
        (np.arange(20 * 30 * 3, dtype=np.uint16).reshape(20, 30, 3) * 31, ".tif"),
        (np.linspace(-3, 7e4, 20 * 30, dtype=np.float32).reshape(20, 30), ".tif"),
        (np.linspace(0, 1, 20 * 30 * 3, dtype=np.float32).reshape(20, 30, 3), ".tif"),
    ],
)
def test_encode_clean_round_trip(array: np.ndarray, extension: str) -> None:
    image = read_image(array, "source")
    data, ext = encode_clean(image)
    assert ext == extension
    again = read_image(data)
    assert again.array.dtype == array.dtype
    np.testing.assert_array_equal(again.array, array)
    if ext == ".tif":
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            names = {tag.name for tag in tif.pages[0].tags}
        assert not names & {"ImageDescription", "Software", "DateTime", "Artist"}


def test_encode_clean_drops_metadata() -> None:
    exif = PILImage.Exif()
    exif[0x010E] = "secret description"
    exif[0x013B] = "Dr Secret"
    text = PngImagePlugin.PngInfo()
    text.add_text("Patient", "Jane Doe")
    array = _rng().integers(0, 256, (24, 32, 3), dtype=np.uint8)
    sources = [
        _png_bytes(array, exif=exif, pnginfo=text),
        _jpeg_bytes(array, exif=exif, comment=b"Jane Doe"),
        (SAMPLES / "hubble_deep_field.jpg").read_bytes(),
    ]
    for source in sources:
        assert b"secret" in source or b"Exif" in source
        original = read_image(source)
        data, ext = encode_clean(original)
        assert ext == ".png"
        for secret in (b"secret", b"Jane Doe", b"Dr Secret", b"Exif", b"tEXt", b"iCCP", b"eXIf", b"iTXt", b"zTXt"):
            assert secret not in data
        reopened = PILImage.open(io.BytesIO(data))
        assert not set(reopened.info) - {"dpi"}
        assert not reopened.getexif()
        np.testing.assert_array_equal(read_image(data).array, original.array)


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_image_error_shape_and_pickling() -> None:
    error = ImageError("scan.png", "the file is empty (0 bytes)")
    assert str(error) == "scan.png: the file is empty (0 bytes)"
    assert isinstance(error, ValueError)
    restored = pickle.loads(pickle.dumps(error))
    assert (restored.name, restored.reason, str(restored)) == (error.name, error.reason, str(error))


def test_image_refuses_broken_contract() -> None:
    with pytest.raises(ImageError):
        Image(array=np.zeros((20, 20), dtype=np.int32), name="x", format="NPY")
    with pytest.raises(ImageError):
        Image(array=np.zeros((20, 20, 4), dtype=np.uint8), name="x", format="NPY")
    with pytest.raises(ImageError):
        Image(array=np.zeros((20, 20), dtype=np.uint8), name="x", format="BMP")
