"""Video -> frames: sampling rules (shared with the C++ runtime), decoding, decoders agreeing, bad files."""

import numpy as np
import pytest

from flexselect.errors import FlexSelectError
from flexselect.video import Clip, VideoInfo, estimate_clip_bytes, load_clip, output_size, probe, sample_indices

INFO = VideoInfo("v.mp4", num_frames=100, fps=10.0, duration=10.0, width=1920, height=1080)


def test_uniform_sampling_takes_segment_centres():
    assert sample_indices(INFO, num_frames=4).tolist() == [12, 37, 62, 87]  # floor((2i+1)*100/8)
    assert sample_indices(INFO, num_frames=1).tolist() == [50]
    assert sample_indices(INFO, num_frames=1000).tolist() == list(range(100))  # never more than there are


def test_fps_sampling_start_end_and_cap():
    assert len(sample_indices(INFO, fps=2.0)) == 20
    assert sample_indices(INFO, fps=1.0, start=2.0, end=6.0).tolist() == [25, 35, 45, 55]
    assert len(sample_indices(INFO, fps=5.0, max_frames=8)) == 8
    assert len(sample_indices(INFO)) == 100  # neither: every frame


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_frames": 0}, "> 0"),
        ({"fps": -1.0}, "> 0"),
        ({"start": 11.0}, "beyond"),
        ({"start": 5.0, "end": 4.0}, "after start"),
        ({"max_frames": 0}, "> 0"),
        ({"start": -1.0}, ">= 0"),
    ],
)
def test_bad_sampling_requests(kwargs, message):
    with pytest.raises(FlexSelectError, match=message):
        sample_indices(INFO, **kwargs)


def test_output_size_keeps_aspect_never_upscales():
    assert output_size(1920, 1080, 560) == (560, 316)
    assert output_size(160, 96, 560) == (160, 96)
    assert estimate_clip_bytes(INFO, 10, 560) == 10 * 560 * 316 * 3
    with pytest.raises(FlexSelectError, match="at least"):
        output_size(1920, 1080, 10)


def test_load_clip_keeps_timestamps_and_the_needle(test_video):
    calls = []
    clip = load_clip(test_video, num_frames=12, on_frame=lambda i, n: calls.append((i, n)))
    assert clip.frames.shape == (12, 112, 168, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_allclose(clip.timestamps, sample_indices(probe(test_video), num_frames=12) / 8.0)
    assert calls[-1] == (12, 12) and len(calls) == 12
    whole = load_clip(test_video, num_frames=48)
    r, g, b = whole.frames[20, 56, 84].astype(int)  # needle frame: the red square's centre
    assert r > 180 and g < 80 and b < 80
    assert not (whole.frames[5, 56, 84].astype(int) == [r, g, b]).all()


def test_sample_fps_is_the_requested_rate_when_met(test_video):
    # 48 frames at 8 fps: a 3 fps request takes 18 whole frames, whose first and last timestamps would say 3.022 fps;
    # M-RoPE's temporal spacing must use the 3.0 asked for (as Qwen's preprocessing and the C++ runtime do)
    clip = load_clip(test_video, fps=3.0)
    assert len(clip.frames) == 18 and clip.sample_fps == 3.0
    assert (len(clip.timestamps) - 1) / (clip.timestamps[-1] - clip.timestamps[0]) != 3.0
    capped = load_clip(test_video, fps=3.0, max_frames=6)  # not met: the frames taken over the span they cover
    assert capped.sample_fps == 6 / 6.0
    assert load_clip(test_video, num_frames=12).sample_fps == 12 / 6.0
    assert load_clip(test_video, fps=2.0, start=1.0, end=4.0).sample_fps == 2.0


def test_clip_from_frames():
    frames = np.zeros((5, 28, 56, 3), np.uint8)
    clip = Clip.from_frames(frames, fps=2.5, source="mine")
    assert clip.sample_fps == 2.5 and clip.timestamps.tolist() == [0.0, 0.4, 0.8, 1.2, 1.6]
    assert clip.info.num_frames == 5 and (clip.info.width, clip.info.height) == (56, 28) and clip.source == "mine"


def test_decord_and_pyav_agree(test_video):
    a = load_clip(test_video, num_frames=10, max_side=112, decoder="decord")
    b = load_clip(test_video, num_frames=10, max_side=112, decoder="pyav")
    assert a.frames.shape == b.frames.shape
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 8  # resize filters differ slightly


def test_progress_callback_exceptions_propagate(test_video):
    class Cancelled(Exception):
        pass

    def cancel(i, n):
        if i == 3:
            raise Cancelled

    for decoder in ("decord", "pyav"):
        with pytest.raises(Cancelled):
            load_clip(test_video, num_frames=10, on_frame=cancel, decoder=decoder)


def test_bad_files(tmp_path, test_video):
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "cut.mp4").write_bytes(test_video.read_bytes()[: test_video.stat().st_size // 2])
    cases = {
        "missing.mp4": "not found",
        "text.mp4": "cannot read",
        "empty.mp4": "empty",
        "cut.mp4": "cannot read",
        ".": "is a directory, not a video",
    }
    for name, message in cases.items():
        with pytest.raises(FlexSelectError, match=message):
            load_clip(tmp_path / name, num_frames=4)
