"""The server side of the mask editor: what the browser sends is untrusted, so anything but an exact PNG mask of the
expected size is refused (None, or a MaskState without masks), never an exception or a mask of another size."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.mask_canvas import decode_mask, encode_mask, mask_canvas, parse_state

W, H = 20, 15
PREFIX = "data:image/png;base64,"


def _mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[3:7, 4:9] = True
    return mask


def _url(raw: bytes) -> str:
    return PREFIX + base64.b64encode(raw).decode()


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _handmade_png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_a_grey_png_round_trips_at_the_image_resolution():
    decoded = decode_mask(encode_mask(_mask()), W, H)
    assert decoded is not None and decoded.dtype == bool and decoded.shape == (H, W)
    assert (decoded == _mask()).all()


def test_a_one_bit_png_is_read_too():
    decoded = decode_mask(_url(_png(Image.fromarray(_mask()).convert("1"))), W, H)
    assert decoded is not None and (decoded == _mask()).all()


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        {"png": "x"},
        "",
        "not a data url",
        PREFIX,
        PREFIX + "!!!not base64!!!",
        PREFIX + "iVBORw0KGgo",  # the PNG signature and nothing after it
        "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xe0").decode(),
        "data:text/html;base64," + base64.b64encode(b"<script>alert(1)</script>").decode(),
    ],
    ids=repr,
)
def test_malformed_values_are_refused(value):
    assert decode_mask(value, W, H) is None


def test_other_image_formats_are_refused_even_under_a_png_label():
    grey = Image.fromarray(np.where(_mask(), 255, 0).astype(np.uint8), mode="L")
    for fmt in ("JPEG", "BMP", "GIF", "TIFF"):
        buffer = io.BytesIO()
        grey.save(buffer, format=fmt)
        assert decode_mask(_url(buffer.getvalue()), W, H) is None, fmt


@pytest.mark.parametrize("size", [(W + 1, H), (W, H - 1), (H, W), (1, 1)])
def test_a_mask_of_another_size_is_refused(size):
    assert decode_mask(encode_mask(np.zeros(size[::-1], dtype=bool)), W, H) is None


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "I;16"])
def test_only_grey_and_one_bit_modes_are_accepted(mode):
    image = Image.fromarray(np.where(_mask(), 255, 0).astype(np.uint8), mode="L").convert(mode)
    assert decode_mask(_url(_png(image)), W, H) is None


def test_a_huge_declared_size_is_refused_before_decoding():
    huge = _handmade_png(100_000, 100_000, zlib.compress(b"\x00" * 1000))
    assert decode_mask(_url(huge), W, H) is None
    assert decode_mask(_url(huge), 100_000, 100_000) is None  # broken, and refused without an exception


def test_a_truncated_or_corrupt_png_is_refused():
    good = base64.b64decode(encode_mask(_mask())[len(PREFIX) :])
    assert decode_mask(_url(good[:-12]), W, H) is None  # all pixels there, the end missing
    assert decode_mask(_url(good[:45] + good[-12:]), W, H) is None  # pixel data cut short
    corrupt = _handmade_png(W, H, zlib.compress(b"\x07" * ((W + 1) * H)))  # filter type 7 does not exist
    assert decode_mask(_url(corrupt), W, H) is None


def test_a_value_beyond_the_size_limit_is_refused():
    padding = _chunk(b"tEXt", b"comment\x00" + b"x" * 200_000)
    good = base64.b64decode(encode_mask(_mask())[len(PREFIX) :])
    padded = good[:33] + padding + good[33:]
    assert Image.open(io.BytesIO(padded)).size == (W, H)  # a valid PNG, only too big for a 20x15 mask
    assert decode_mask(_url(padded), W, H) is None


def _value(**changes) -> dict:
    value = {"fingerprint": "f", "version": 3, "no_region": False, "masks": {"region": encode_mask(_mask())}}
    value.update(changes)
    return value


def _parse(value: object):
    return parse_state(value, fingerprint="f", layers=("region",), width=W, height=H)


def test_a_well_formed_value_gives_the_masks():
    state = _parse(_value())
    assert state is not None and state.error is None and state.version == 3 and not state.no_region
    assert (state.masks["region"] == _mask()).all()


def test_nothing_sent_or_drawn_on_another_image_gives_none():
    assert _parse(None) is None
    assert _parse(_value(fingerprint="another image")) is None


@pytest.mark.parametrize(
    "value",
    [
        "a string",
        [1, 2],
        _value(version="3"),
        _value(version=True),
        _value(version=0),
        _value(version=10**12),
        _value(no_region="no"),
        _value(masks=["region"]),
        _value(masks={}),
        _value(masks={"region": encode_mask(_mask()), "extra": encode_mask(_mask())}),
        _value(masks={"region": "data:image/png;base64,AAAA"}),
        _value(masks={"region": encode_mask(np.zeros((H * 2, W * 2), dtype=bool))}),
        _value(no_region=True),  # says no region, but has one
        {**_value(), "script": "alert(1)"},
    ],
)
def test_a_malformed_value_is_refused_with_a_reason(value):
    state = _parse(value)
    assert state is not None and state.masks is None and state.error


def test_no_region_with_empty_masks_is_accepted():
    state = _parse(_value(no_region=True, masks={"region": encode_mask(np.zeros((H, W), dtype=bool))}))
    assert state is not None and state.no_region and not state.masks["region"].any()


def _picture_png(width: int = W, height: int = H) -> bytes:
    return _png(Image.new("RGB", (width, height), (90, 90, 90)))


def test_outside_a_script_run_the_editor_returns_its_start():
    start = _mask()
    state = mask_canvas(_picture_png(), key="k", layers=("intermediate", "restrictive"), start={"restrictive": start})
    assert state.version == 0 and not state.no_region and state.error is None
    assert not state.masks["intermediate"].any() and (state.masks["restrictive"] == start).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layers": ()},
        {"layers": ("a", "a")},
        {"layers": ("a", "b", "c", "d", "e")},
        {"start": {"other": _mask()}},
        {"start": {"region": np.zeros((W, H), dtype=bool)}},
        {"start": {"region": _mask()}, "start_no_region": True},
    ],
)
def test_the_callers_mistakes_raise(kwargs):
    with pytest.raises(ValueError):
        mask_canvas(_picture_png(), key="k", **kwargs)


def test_the_picture_must_be_a_png_of_a_bounded_size():
    buffer = io.BytesIO()
    Image.new("RGB", (W, H)).save(buffer, format="JPEG")
    with pytest.raises(ValueError):
        mask_canvas(buffer.getvalue(), key="k")
    with pytest.raises(ValueError):
        mask_canvas(_handmade_png(5000, 5000, zlib.compress(b"")), key="k")
