"""The selection heatmap: kept tokens land on the right cells of the right frames, and inputs stay untouched."""

import numpy as np
import pytest
import torch

from flexselect.backends.base import VisualTokens
from flexselect.errors import FlexSelectError
from flexselect.show import contact_sheet, even_subsample, frame_units, render_heatmaps, selection_sheet


def visual_of(units, grid):
    rows, cols = grid
    return VisualTokens(
        embeds=torch.zeros(units * rows * cols, 4),
        num_frames=units,
        grid=grid,
        timestamps=np.arange(units) * 0.5,
        time_interval=1.0,
        frame_size=(rows * 28, cols * 28),
    )


def test_kept_cells_are_red_and_dropped_cells_dimmed():
    frames = np.full((4, 56, 84, 3), 200, dtype=np.uint8)  # 4 frames -> 2 units of a 2x3 grid
    before = frames.copy()
    visual = visual_of(2, (2, 3))
    kept = torch.tensor([0, 6 + 5])  # unit 0 top-left cell; unit 1 bottom-right cell
    out = render_heatmaps(frames, visual, kept)
    np.testing.assert_array_equal(frames, before)
    assert out.shape == frames.shape and out.dtype == np.uint8
    red = out[..., 0].astype(int) - out[..., 1].astype(int) > 50
    for i in (0, 1):  # unit 0
        assert red[i, :28, :28].all() and not red[i, 28:, :].any() and not red[i, :, 28:].any()
    for i in (2, 3):  # unit 1
        assert red[i, 28:, 56:].all() and red[i].sum() == 28 * 28
    assert out[0, 40, 40, 1] < 200 * 0.5  # dropped: dimmed


def test_grid_stretches_over_any_frame_size_and_odd_frame_counts():
    frames = np.zeros((5, 30, 50, 3), dtype=np.uint8)  # odd count -> 3 units; size not a multiple of 28
    visual = visual_of(3, (3, 5))
    assert frame_units(5, 3).tolist() == [0, 0, 1, 1, 2]
    out = render_heatmaps(frames, visual, torch.arange(visual.num_tokens))  # everything kept
    assert (out[..., 0] > out[..., 1]).all()


def test_subsample_sheet_and_errors():
    frames = np.random.default_rng(0).integers(0, 255, (8, 28, 56, 3), dtype=np.uint8)
    visual = visual_of(4, (1, 2))
    sel = type("Sel", (), {"kept": torch.tensor([1, 2, 7])})()
    picked = even_subsample(8, 3)
    assert picked.tolist() == [0, 4, 7]
    assert render_heatmaps(frames, visual, sel, frames=picked).shape == (3, 28, 56, 3)
    sheet = selection_sheet(frames, visual, sel, max_frames=4)
    assert sheet.ndim == 3 and sheet.shape[2] == 3 and sheet.dtype == np.uint8
    wide = contact_sheet(np.zeros((6, 100, 400, 3), np.uint8), columns=6, max_width=600)
    assert wide.shape[1] <= 600
    with pytest.raises(FlexSelectError, match="only 8 visual tokens"):
        render_heatmaps(frames, visual, torch.tensor([8]))
    with pytest.raises(FlexSelectError, match="cannot cover"):
        render_heatmaps(frames[:3], visual, sel)
    with pytest.raises(FlexSelectError, match=r"\[N, H, W, 3\]"):
        render_heatmaps(frames[..., 0], visual, sel)


@pytest.mark.parametrize("kind", [".gif", ".mp4"])
def test_animation_plays_every_frame_with_its_overlay(tmp_path, kind):
    import av
    from PIL import Image

    from flexselect.show import write_animation

    frames = np.full((6, 56, 84, 3), 200, dtype=np.uint8)  # 6 frames -> 3 units of a 2x3 grid
    visual = visual_of(3, (2, 3))
    kept = torch.tensor([2 * 6 + 0])  # only unit 2 (frames 4, 5) keeps a token: its top-left cell
    out = write_animation(tmp_path / f"sel{kind}", frames, visual, kept, fps=5.0)
    assert out == tmp_path / f"sel{kind}" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    if kind == ".gif":
        with Image.open(out) as gif:
            decoded = []
            for i in range(gif.n_frames):  # Pillow merges identical neighbours into one longer frame
                gif.seek(i)
                decoded += [np.asarray(gif.convert("RGB"))] * round(gif.info["duration"] / 200)
    else:
        with av.open(str(out)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].shape == (56, 84, 3)
    cell = [f[16:26, 4:26].astype(float).mean((0, 1)) for f in decoded]  # the kept cell, below the label
    assert [bool(c[0] - c[1] > 60) for c in cell] == [False, False, False, False, True, True]


def test_animation_bad_inputs_leave_nothing(tmp_path, monkeypatch):
    from flexselect import show

    frames = np.zeros((4, 28, 28, 3), dtype=np.uint8)
    visual = visual_of(2, (1, 1))
    with pytest.raises(FlexSelectError, match=r"\.gif or an \.mp4"):
        show.write_animation(tmp_path / "x.avi", frames, visual, torch.tensor([0]))

    def broken(*a, **k):
        raise FlexSelectError("render failed")

    monkeypatch.setattr(show, "render_heatmaps", broken)
    for kind in (".gif", ".mp4"):
        with pytest.raises(FlexSelectError, match="render failed"):
            show.write_animation(tmp_path / f"x{kind}", frames, visual, torch.tensor([0]))
    assert list(tmp_path.iterdir()) == []
