"""layer-scan: one pass scores every layer like the stopped scoring pass, Recall@K, and a planted layer is found."""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flexselect.backends.base import VisualTokens
from flexselect.layer_scan import (
    ScanExample,
    add_layer_scan_command,
    layer_scores,
    load_examples,
    make_scan_examples,
    recall_at_k,
    relevant_token_set,
    scan,
    write_report,
)
from flexselect.tiny import plant_attention
from helpers import random_clip

LAYER = 2
FRAMES, GRID = 16, (4, 4)
NEEDLE_FRAMES = (5, 6)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from flexselect.tiny import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    from flexselect.tiny import build_tiny_internvl

    return build_tiny_internvl(tmp_path_factory.mktemp("models") / "tiny-internvl")


def load(path):
    from flexselect.backends import load_backend

    return load_backend(path, device="cpu", dtype="float32")


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_one_pass_equals_the_stopped_scoring_pass_at_every_layer(family, llava_dir, internvl_dir):
    backend = load(llava_dir if family == "llava" else internvl_dir)
    visual = backend.encode(random_clip(n_frames=6, height=60, width=80, fps=1.0))
    prompt = backend.prompt("What colour is the square?")
    frames = list(range(visual.num_frames))
    every = layer_scores(backend, visual, frames, prompt)
    assert every.shape == (backend.num_layers, visual.num_tokens)
    for layer in range(backend.num_layers):
        torch.testing.assert_close(
            every[layer], backend.score(visual, frames, prompt, layer, "max"), rtol=1e-5, atol=1e-7
        )


def test_recall_at_k_is_the_share_of_relevant_tokens_in_the_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.0], [0.0, 0.1, 0.9, 0.8, 0.7]])
    relevant = torch.tensor([0, 1])
    assert recall_at_k(scores, relevant).tolist() == [1.0, 0.0]  # K = |R| = 2
    assert recall_at_k(scores, relevant, k=4).tolist() == [1.0, 0.5]  # layer 1's top 4 holds token 1 only


def test_relevant_ranges_map_sampled_frames_to_units():
    visual = VisualTokens(
        embeds=torch.zeros(8 * 4, 2),
        num_frames=8,
        grid=(2, 2),
        timestamps=np.arange(8) * 0.5,
        time_interval=1.0,
        frame_size=(28, 28),
    )
    ts = list(np.arange(16) * 0.25)  # 16 sampled frames, two per unit (as Qwen2.5-VL pairs them)
    by_time = relevant_token_set(ScanExample("v", "q", relevant_seconds=(1.0, 1.6)), visual, ts)
    assert by_time.tolist() == list(range(8, 16))  # frames 4..6 -> units 2, 3
    by_frame = relevant_token_set(ScanExample("v", "q", relevant_frames=(3, 3)), visual, ts)
    assert by_frame.tolist() == [4, 5, 6, 7]
    with pytest.raises(Exception, match="exactly one"):
        relevant_token_set(ScanExample("v", "q"), visual, ts)


@pytest.fixture()
def planted(llava_dir):
    """At LAYER, question queries and needle keys share a direction (`plant_attention`, as in test_needle.py)."""
    backend = load(llava_dir)
    lm = backend.text_model
    hidden = lm.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    question_dir, needle_dir = torch.linalg.qr(torch.randn(hidden, 2, generator=gen))[0].T
    plant_attention(lm, LAYER, key=needle_dir, query=question_dir)
    with torch.no_grad():
        lm.embed_tokens.weight.copy_(question_dir + 0.1 * torch.randn(lm.embed_tokens.weight.shape, generator=gen))
    tpf = GRID[0] * GRID[1]
    embeds = torch.randn(FRAMES * tpf, hidden, generator=gen)
    needle = torch.arange(NEEDLE_FRAMES[0] * tpf, (NEEDLE_FRAMES[1] + 1) * tpf)
    embeds[needle] = 1.5 * needle_dir + 0.1 * torch.randn(len(needle), hidden, generator=gen)
    visual = VisualTokens(
        embeds=embeds,
        num_frames=FRAMES,
        grid=GRID,
        timestamps=np.arange(FRAMES) / 1.0,
        time_interval=1.0,
        frame_size=(112, 112),
    )
    backend.encode = lambda clip, progress=None: visual  # the scan encodes this planted video
    return backend, visual, needle


def test_layer_scan_finds_the_planted_layer(planted, tmp_path):
    backend, visual, needle = planted
    clip = SimpleNamespace(frames=np.zeros((FRAMES, 4, 4, 3), np.uint8), timestamps=np.arange(FRAMES) / 1.0)
    examples = [
        ScanExample(clip, "Where is the needle?", relevant_frames=NEEDLE_FRAMES),
        ScanExample(clip, "Which frames show it?", relevant_seconds=(4.5, 6.5)),
    ]
    result = scan(backend, examples)
    assert result.best_layer == LAYER, result.recall
    assert result.recall[LAYER] >= 0.95
    assert max(r for i, r in enumerate(result.recall) if i != LAYER) < 0.5
    assert [e["relevant_tokens"] for e in result.examples] == [len(needle)] * 2
    json_path, png_path = write_report(result, tmp_path, model="planted")
    report = json.loads(json_path.read_text())
    assert report["best_layer"] == LAYER and len(report["recall"]) == backend.num_layers
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_examples_show_the_square_in_the_stated_frames(tmp_path):
    import av

    path = make_scan_examples(tmp_path, 2, num_frames=8, fps=4.0)
    examples = load_examples(path)
    assert len(examples) == 2
    for ex in examples:
        with av.open(ex.video) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 8
        # the square is saturated, the background grey: saturation per frame tells where it is
        sat = [float((f.max(-1).astype(int) - f.min(-1)).mean()) for f in frames]
        shown = [i for i, s in enumerate(sat) if s > 20]
        t0, t1 = ex.relevant_seconds
        assert shown == [i for i in range(8) if t0 <= i / 4.0 <= t1] and len(shown) == 2


def test_cli_parser_registers_layer_scan():
    parser = argparse.ArgumentParser()
    add_layer_scan_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["layer-scan", "--model", "m", "--top-k", "50"])
    assert args.top_k == 50 and args.run.__name__ == "run_layer_scan"


def test_cli_end_to_end_on_synthetic_examples(llava_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_layer_scan_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "layer-scan",
            "--model",
            str(llava_dir),
            "--synthetic",
            "2",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    assert args.run(args) == 0
    report = json.loads((tmp_path / "layer_scan.json").read_text())
    assert len(report["recall"]) == 4 and all(e["relevant_tokens"] == 2 * 16 for e in report["examples"])
    assert "best layer:" in capsys.readouterr().out
