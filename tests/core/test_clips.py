"""Tests for core.data.clips and the synthetic clips of core.data.synth_cle: real files in tmp_path, small frames."""

from __future__ import annotations

import io
import pickle
import re
import threading
import tracemalloc
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage
from scipy import ndimage as ndi
from scipy.stats import rankdata

from core.data.clips import Clip, ClipError, ClipLimits, is_clip, open_clip
from core.data.synth_cle import CLEClip, make_cle_clip, write_clip

N_FRAMES = 24
SIZE = 64


@pytest.fixture(scope="module")
def clip() -> CLEClip:
    return make_cle_clip(N_FRAMES, SIZE, seed=3)


@pytest.fixture(scope="module")
def files(clip: CLEClip, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The clip written once in every format write_clip knows."""
    folder = tmp_path_factory.mktemp("clips")
    return {
        suffix: write_clip(clip.frames, folder / f"site.{suffix}", fps=clip.fps)
        for suffix in ("tif", "zip", "mp4", "avi")
    }


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return buffer.getvalue()


def _mkv(frames: np.ndarray) -> bytes:
    """A Matroska H.264 video: Matroska states a duration but no frame count."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=20)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray").reformat(format="yuv420p")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _frames(opened: Clip) -> np.ndarray:
    return np.stack(list(opened.frames()))


def _refused(source: str | Path | bytes, phrase: str, name: str | None = None, **limits: float) -> ClipError:
    """Assert that opening ``source`` raises ClipError naming the clip, with ``phrase`` in its reason."""
    with pytest.raises(ClipError) as caught:
        open_clip(source, name, limits=ClipLimits(**limits))
    error = caught.value
    expected = name if name is not None else (Path(source).name if isinstance(source, str | Path) else "upload")
    assert error.name == expected and str(error).startswith(f"{expected}: ")
    assert phrase in error.reason, error.reason
    return error


def _refused_while_streaming(source: str | Path | bytes, phrase: str, **limits: float) -> tuple[int, ClipError]:
    """Assert that ``source`` opens but its frames raise ClipError with ``phrase``; (frames delivered, error)."""
    delivered = 0
    with open_clip(source, "clip", limits=ClipLimits(**limits)) as opened, pytest.raises(ClipError) as caught:
        for _ in opened.frames():
            delivered += 1
    assert phrase in caught.value.reason, caught.value.reason
    return delivered, caught.value


# --- formats -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "kind", "fps"), [("tif", "tiff", 20.0), ("zip", "frames", None)])
def test_lossless_formats_round_trip_exactly(
    clip: CLEClip, files: dict[str, Path], suffix: str, kind: str, fps: float | None
) -> None:
    for source in (files[suffix], files[suffix].read_bytes()):
        with open_clip(source) as opened:
            assert (opened.info.kind, opened.info.n_frames, opened.info.fps) == (kind, N_FRAMES, fps)
            assert (opened.info.height, opened.info.width) == (SIZE, SIZE)
            frames = _frames(opened)
        assert frames.dtype == np.uint8
        np.testing.assert_array_equal(frames, clip.frames)


@pytest.mark.parametrize("suffix", ["mp4", "avi"])
def test_videos_round_trip_closely_with_their_rate(clip: CLEClip, files: dict[str, Path], suffix: str) -> None:
    with open_clip(files[suffix]) as opened:
        assert (opened.info.kind, opened.info.n_frames, opened.info.fps) == ("video", N_FRAMES, 20.0)
        frames = _frames(opened)
    assert frames.shape == clip.frames.shape and frames.dtype == np.uint8
    difference = np.abs(frames.astype(np.int16) - clip.frames)
    assert difference.mean() < 6.0
    assert abs(float(frames.mean()) - float(clip.frames.mean())) < 2.0


def test_a_colour_video_decodes_as_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = ndi.gaussian_filter(rng.uniform(0, 255, (SIZE, SIZE, 3)), (6, 6, 0))
    frames = np.stack([np.roll(base, shift, axis=1) for shift in range(8)]).astype(np.uint8)
    with open_clip(write_clip(frames, tmp_path / "colour.mp4")) as opened:
        decoded = _frames(opened)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 6.0


def test_a_matroska_video_has_no_stated_count(clip: CLEClip) -> None:
    with open_clip(_mkv(clip.frames)) as opened:
        assert (opened.info.kind, opened.info.n_frames, opened.info.fps) == ("video", None, 20.0)
        assert len(_frames(opened)) == N_FRAMES


def test_names_default_to_the_file_or_upload_and_show_in_messages(files: dict[str, Path]) -> None:
    with open_clip(files["tif"]) as opened:
        assert opened.info.name == "site.tif"
    with open_clip(files["tif"].read_bytes()) as opened:
        assert opened.info.name == "upload"
    with open_clip(files["tif"], "biopsy site 3") as opened:
        assert opened.info.name == "biopsy site 3"
    _refused(_png(np.zeros((SIZE, SIZE), np.uint8)), "not a clip", name="biopsy site 4")
    _refused(files["tif"].read_bytes(), "frames", max_frames=10)


def test_the_kind_comes_from_the_content_not_the_name(files: dict[str, Path], tmp_path: Path) -> None:
    disguised = tmp_path / "clip.avi"
    disguised.write_bytes(files["tif"].read_bytes())
    with open_clip(disguised) as opened:
        assert opened.info.kind == "tiff"


def test_zip_entries_come_in_natural_order_skipping_mac_and_dot_files() -> None:
    frames = {index: np.full((SIZE, SIZE), index, np.uint8) for index in (1, 2, 10)}
    data = _zip(
        {
            "clip/frame10.png": _png(frames[10]),
            "clip/frame2.png": _png(frames[2]),
            "clip/Frame1.png": _png(frames[1]),
            "__MACOSX/clip/._frame1.png": b"\x00\x05\x16\x07",
            "clip/.DS_Store": b"\x00\x00\x00\x01Bud1",
            "clip/": b"",
        }
    )
    with open_clip(data) as opened:
        assert opened.info.n_frames == 3
        assert [int(frame[0, 0]) for frame in opened.frames()] == [1, 2, 10]


def test_a_folder_of_frames_reads_in_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "site 2"
    (folder / "notes").mkdir(parents=True)
    for index in (1, 2, 10):
        (folder / f"frame{index}.png").write_bytes(_png(np.full((SIZE, SIZE), index, np.uint8)))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with open_clip(folder) as opened:
        assert (opened.info.name, opened.info.kind, opened.info.n_frames) == ("site 2", "frames", 3)
        assert [int(frame[0, 0]) for frame in opened.frames()] == [1, 2, 10]
    (folder / "readme.txt").write_text("frames of site 2")
    _refused(folder, "readme.txt")
    _refused(tmp_path / "notes", "not found")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "no frame images")


def test_sixteen_bit_tiff_frames_stay_sixteen_bit(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).integers(0, 4096, (5, SIZE, SIZE), dtype=np.uint16)
    with open_clip(write_clip(frames, tmp_path / "deep.tif")) as opened:
        np.testing.assert_array_equal(_frames(opened), frames)


# --- streaming ---------------------------------------------------------------------------------------------------


def test_streaming_keeps_memory_bounded(tmp_path: Path) -> None:
    frames = np.random.default_rng(2).integers(0, 256, (600, 128, 128), dtype=np.uint8)
    path = write_clip(frames, tmp_path / "long.tif")
    checksum = 0
    tracemalloc.start()
    try:
        with open_clip(path) as opened:
            for frame in opened.frames():
                checksum += int(frame[0, 0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert checksum == int(frames[:, 0, 0].astype(np.int64).sum())
    assert peak < frames.nbytes / 20


def test_frames_are_lazy_and_a_damaged_page_stops_the_stream_there(clip: CLEClip, tmp_path: Path) -> None:
    path = tmp_path / "damaged.tif"
    tifffile.imwrite(path, clip.frames, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[6].dataoffsets[0], tif.pages[6].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    with open_clip(path) as opened:
        stream = opened.frames()
        delivered = [next(stream) for _ in range(6)]
        with pytest.raises(ClipError) as caught:
            next(stream)
    np.testing.assert_array_equal(np.stack(delivered), clip.frames[:6])
    assert "after frame 6: frame 7 cannot be decoded" in caught.value.reason


def test_a_damaged_zip_entry_is_named_when_its_turn_comes() -> None:
    good = _png(np.zeros((SIZE, SIZE), np.uint8))
    data = _zip({"f1.png": good, "f2.png": good, "f3.png": good[: len(good) // 2], "f4.png": good})
    delivered, error = _refused_while_streaming(data, "frame 3 (f3.png)")
    assert delivered == 2 and "truncated or corrupt" in error.reason


def test_batches_group_the_frames(files: dict[str, Path]) -> None:
    with open_clip(files["zip"]) as opened:
        assert [len(batch) for batch in opened.batches(10)] == [10, 10, 4]
        assert [len(batch) for batch in opened.batches(24)] == [24]
        with pytest.raises(ValueError):
            opened.batches(0)


def test_closing_ends_running_streams(files: dict[str, Path]) -> None:
    with open_clip(files["mp4"]) as opened:
        stream = opened.frames()
        next(stream)
    assert next(stream, None) is None
    with pytest.raises(ValueError, match="closed"):
        next(opened.frames())


def _decoding_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("decode ")]


@pytest.mark.parametrize("suffix", ["tif", "zip", "mp4"])
@pytest.mark.parametrize("ahead", [1, 3])
def test_batches_decoded_ahead_are_the_same_frames_in_order(files: dict[str, Path], suffix: str, ahead: int) -> None:
    with open_clip(files[suffix]) as opened:
        plain = list(opened.batches(5))
        threaded = list(opened.batches(5, ahead=ahead))
        with pytest.raises(ValueError, match="ahead"):
            opened.batches(5, ahead=-1)
    assert [len(batch) for batch in threaded] == [5, 5, 5, 5, 4]
    assert [len(batch) for batch in threaded] == [len(batch) for batch in plain]
    np.testing.assert_array_equal(np.concatenate(threaded), np.concatenate(plain))
    assert not _decoding_threads()


def test_an_error_of_the_decoding_thread_is_raised_in_the_caller_in_turn() -> None:
    good = _png(np.zeros((SIZE, SIZE), np.uint8))
    data = _zip({f"f{i}.png": good if i != 5 else good[: len(good) // 2] for i in range(1, 9)})
    outcomes = {}
    for ahead in (0, 2):
        delivered = []
        with open_clip(data, "clip") as opened, pytest.raises(ClipError) as caught:
            for batch in opened.batches(2, ahead=ahead):
                delivered.append(len(batch))
        outcomes[ahead] = (delivered, type(caught.value), str(caught.value))
    assert outcomes[2] == outcomes[0]
    assert outcomes[2][0] == [2, 2] and "frame 5 (f5.png)" in outcomes[2][2]
    assert not _decoding_threads()


def test_a_closed_clip_refuses_batches_decoded_ahead(files: dict[str, Path]) -> None:
    opened = open_clip(files["tif"])
    opened.close()
    with pytest.raises(ValueError, match="closed"):
        next(opened.batches(4, ahead=1))


def test_leaving_batches_decoded_ahead_early_stops_the_decoding_thread(files: dict[str, Path]) -> None:
    with open_clip(files["mp4"]) as opened:
        batches = opened.batches(2, ahead=1)
        next(batches)
        assert len(_decoding_threads()) == 1
        batches.close()  # what contextlib.closing does when the loop's body raises (a cancel)
        assert not _decoding_threads()
        batches = opened.batches(2, ahead=1)
        next(batches)
    assert not _decoding_threads()  # closing the clip stops it too
    assert next(batches, None) is None


# --- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["mp4", "avi"])
def test_a_video_cut_in_half_is_refused_with_a_message(files: dict[str, Path], suffix: str) -> None:
    data = files[suffix].read_bytes()
    half = data[: len(data) // 2]
    try:
        delivered, error = _refused_while_streaming(half, "frame")
    except ClipError as refused:  # refused at once: also a clear answer
        assert "damaged" in refused.reason
    else:
        assert delivered < N_FRAMES and ("truncated" in error.reason or "damaged" in error.reason)
        assert f"frame {delivered}" in error.reason


def test_corrupt_and_unknown_bytes_are_refused(files: dict[str, Path]) -> None:
    noise = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _refused(files["mp4"].read_bytes()[:32] + noise, "damaged or not a video")
    _refused(files["tif"].read_bytes()[:8] + noise, "damaged")
    _refused(b"PK\x03\x04" + noise, "zip archive is damaged")
    _refused(b"\x01\x02" + noise, "not a clip")
    _refused(b"frame,probability\n0,0.5\n", "text file")
    _refused(b"", "empty")


def test_a_truncated_tiff_is_refused_at_once(files: dict[str, Path], tmp_path: Path) -> None:
    data = files["tif"].read_bytes()
    for keep in (0.6, 0.02):
        error = _refused(data[: int(len(data) * keep)], "truncated")
        assert "one image" not in error.reason


def test_single_images_are_not_clips(tmp_path: Path) -> None:
    image = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(image).save(buffer, format="JPEG")
    for data in (_png(image), buffer.getvalue()):
        _refused(data, "one image, not a clip: use single-image diagnosis")
    single = tmp_path / "one.tif"
    tifffile.imwrite(single, image)
    _refused(single, "one image, not a clip: use single-image diagnosis")
    _refused(_zip({"frame1.png": _png(image)}), "one image, not a clip")


def test_too_many_frames_are_refused(files: dict[str, Path]) -> None:
    for suffix in ("tif", "zip", "mp4"):
        error = _refused(files[suffix], "above the limit of 10", max_frames=10)
        assert "frames" in error.reason


def test_a_video_whose_header_understates_its_length_is_stopped_at_the_limit(clip: CLEClip) -> None:
    delivered, error = _refused_while_streaming(_mkv(clip.frames), "more than 10 frames", max_frames=10)
    assert delivered == 10


def test_a_video_too_long_by_its_stated_duration_is_refused(files: dict[str, Path], clip: CLEClip) -> None:
    for source in (files["mp4"], _mkv(clip.frames)):
        error = _refused(source, "above the limit of 1 s", max_seconds=1.0)
        assert re.search(r"lasts 1\.[2-3] s", error.reason), error.reason


def test_too_large_files_and_frames_are_refused(files: dict[str, Path]) -> None:
    for suffix in ("tif", "zip", "mp4", "avi"):
        _refused(files[suffix], "above the limit of", max_bytes=1000)
        _refused(files[suffix], f"{SIZE * SIZE:,} pixels", max_frame_pixels=SIZE * SIZE - 1)


def test_zip_with_a_non_image_entry_is_refused_by_name(clip: CLEClip) -> None:
    entries = {f"frame{index}.png": _png(frame) for index, frame in enumerate(clip.frames[:3])}
    _refused(_zip({**entries, "notes.txt": b"site 3"}), "notes.txt, which is not a frame image")


def test_zip_with_path_traversal_is_refused(clip: CLEClip) -> None:
    entries = {f"frame{index}.png": _png(frame) for index, frame in enumerate(clip.frames[:3])}
    _refused(_zip({**entries, "../frame9.png": _png(clip.frames[3])}), "outside the archive")
    _refused(_zip({**entries, "/etc/frame9.png": _png(clip.frames[3])}), "outside the archive")


def test_zip_bomb_expansion_is_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2048, 2048), np.uint8))
    data = _zip({"frame1.npy": buffer.getvalue(), "frame2.npy": buffer.getvalue()}, zipfile.ZIP_DEFLATED)
    assert len(data) < 50_000
    _refused(data, "zip bomb")


def test_an_empty_zip_is_refused() -> None:
    _refused(_zip({}), "no frames (empty)")
    _refused(_zip({"__MACOSX/._frame1.png": b"\x00"}), "no frames (empty)")


def test_frames_of_different_sizes_are_refused_naming_the_frame(clip: CLEClip, tmp_path: Path) -> None:
    small = clip.frames[0, :48, :48]
    entries = {f"frame{index}.png": _png(frame) for index, frame in enumerate(clip.frames[:3], start=1)}
    delivered, error = _refused_while_streaming(_zip({**entries, "frame4.png": _png(small)}), "frame 4 (frame4.png)")
    assert delivered == 3 and "48 x 48 px" in error.reason and "64 x 64 px" in error.reason
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as writer:
        for frame in (clip.frames[0], clip.frames[1], small):
            writer.write(np.ascontiguousarray(frame), contiguous=False)
    delivered, error = _refused_while_streaming(path, "frames of different sizes: frame 3 is 48 x 48 px")
    assert delivered == 2
    colour = np.stack([clip.frames[2]] * 3, axis=-1)
    entries["frame4.png"] = _png(colour)
    _refused_while_streaming(_zip(entries), "frame 4 (frame4.png) is 64 x 64 px, 8-bit colour")


def test_an_unknown_video_codec_is_refused(clip: CLEClip) -> None:
    data = _mkv(clip.frames)
    codec_id = b"V_MPEG4/ISO/AVC" if b"V_MPEG4/ISO/AVC" in data else b"V_MS/VFW/FOURCC"
    _refused(data.replace(codec_id, b"V_UNKNOWN/CODEC"[: len(codec_id)].ljust(len(codec_id), b"X")), "codec")


def test_a_source_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        open_clip(np.zeros((2, SIZE, SIZE), np.uint8))  # type: ignore[arg-type]


def test_clip_errors_pickle() -> None:
    error = ClipError("site 3.mp4", "the clip lasts 1,500 s, above the limit of 1,200 s; cut it into shorter clips")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ClipError and (again.name, again.reason, str(again)) == (error.name, error.reason, str(error))
    raised = _refused(b"", "empty")
    assert str(pickle.loads(pickle.dumps(raised))) == str(raised)


def test_is_clip_sniffs_containers(files: dict[str, Path], clip: CLEClip) -> None:
    for path in files.values():
        assert is_clip(path.read_bytes()[:64])
    assert is_clip(_mkv(clip.frames)[:64])
    assert is_clip(_zip({})[:16])
    assert not is_clip(_png(clip.frames[0])[:64])
    assert not is_clip(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    assert not is_clip(b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00")
    assert not is_clip(b"frame,probability\n0,0.5\n")


def test_write_clip_refuses_what_it_cannot_write(clip: CLEClip, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix|cannot write"):
        write_clip(clip.frames, tmp_path / "clip.gif")
    with pytest.raises(ValueError, match="even"):
        write_clip(clip.frames[:, :63, :63], tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match="shape"):
        write_clip(clip.frames[0], tmp_path / "one.tif")


# --- synthetic clips ---------------------------------------------------------------------------------------------


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores ``positive`` against ``negative`` (Mann-Whitney, ties averaged)."""
    ranks = rankdata(np.concatenate([positive, negative]))
    return float(
        (ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2) / (positive.size * negative.size)
    )


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_make_cle_clip_is_deterministic_with_both_classes() -> None:
    first, again = make_cle_clip(120, SIZE, seed=7), make_cle_clip(120, SIZE, seed=7)
    np.testing.assert_array_equal(first.frames, again.frames)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.frames, make_cle_clip(120, SIZE, seed=8).frames)
    assert first.frames.shape == (120, SIZE, SIZE) and first.frames.dtype == np.uint8
    assert first.labels.shape == (120,) and set(np.unique(first.labels)) == {0, 1}
    assert abs(first.labels.mean() - 0.3) < 0.1
    assert first.fps == 20.0
    assert make_cle_clip(30, SIZE, seed=7, diagnostic_fraction=0.0).labels.sum() == 0
    assert make_cle_clip(30, SIZE, seed=7, diagnostic_fraction=1.0).labels.mean() > 0.8


def test_make_cle_clip_labels_follow_the_drawn_tissue() -> None:
    """Diagnostic frames show packed large nuclei: the 90th percentile of a 5 px local variance tells them apart."""
    for seed in (0, 1):
        made = make_cle_clip(160, SIZE, seed=seed)
        frames = made.frames.astype(np.float64)
        mean = ndi.uniform_filter(frames, (1, 5, 5))
        variance = ndi.uniform_filter(frames**2, (1, 5, 5)) - mean**2
        score = np.percentile(variance.reshape(len(frames), -1), 90, axis=1)
        assert _auc(score[made.labels == 1], score[made.labels == 0]) > 0.9
        changes = int(np.count_nonzero(np.diff(made.labels)))
        assert 1 <= changes <= 8


def test_make_cle_clip_frames_are_correlated_like_a_moving_probe() -> None:
    made = make_cle_clip(160, SIZE, seed=2)
    frames = made.frames.astype(np.float64)
    neighbours = [_correlation(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]
    apart = [_correlation(frames[i], frames[(i + 80) % len(frames)]) for i in range(len(frames))]
    assert np.median(neighbours) > 0.6
    assert np.median(neighbours) > np.median(apart) + 0.2
    with pytest.raises(ValueError):
        make_cle_clip(0, SIZE)
    with pytest.raises(ValueError):
        make_cle_clip(10, SIZE, diagnostic_fraction=1.5)
