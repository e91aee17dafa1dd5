"""Planted needle: weights and embeddings arranged so the question attends to a known set of visual tokens.

Layers before the reference layer pass their input through unchanged (zero attention-output and MLP-down weights,
so only the residual path is left). At the reference layer, queries of text tokens and keys of needle tokens share
one direction, placed on the lowest rotary frequency so positions barely rotate it. Every other visual token is
noise. If the pipeline's frame sets, per-set positions, Q/K capture, budget split and top-k are wired right, the
kept tokens are exactly the needle.
"""

import numpy as np
import pytest
import torch

from flexselect.backends.base import GenerationConfig, VisualTokens
from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend
from flexselect.pipeline import FlexSelect, SelectOptions
from flexselect.tiny import plant_attention
from helpers import needle_tokens

LAYER = 2
FRAMES, GRID = 64, (2, 3)  # 384 visual tokens
KEEP_RATIO = 0.0625  # the paper's: 6.25%


@pytest.fixture()
def planted(tiny_model_dir):
    backend = Qwen25VLBackend.load(tiny_model_dir, device="cpu", dtype="float32")  # own copy: weights change
    lm = backend.text_model
    hidden = lm.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    question_dir, needle_dir = torch.linalg.qr(torch.randn(hidden, 2, generator=gen))[0].T
    plant_attention(lm, LAYER, key=needle_dir, query=question_dir)
    with torch.no_grad():  # every text token asks along the question direction
        lm.embed_tokens.weight.copy_(question_dir + 0.1 * torch.randn(lm.embed_tokens.weight.shape, generator=gen))

    n_tokens = FRAMES * GRID[0] * GRID[1]
    needle = needle_tokens(FRAMES, GRID[0] * GRID[1], KEEP_RATIO)
    embeds = torch.randn(n_tokens, hidden, generator=gen)
    embeds[needle] = 1.5 * needle_dir + 0.1 * torch.randn(len(needle), hidden, generator=gen)
    visual = VisualTokens(
        embeds=embeds,
        num_frames=FRAMES,
        grid=GRID,
        timestamps=np.arange(FRAMES) / 1.0,
        time_interval=2.0,
        frame_size=(56, 84),
    )
    return backend, visual, torch.from_numpy(needle)


@pytest.mark.parametrize("set_frames", [16, 64])
def test_kept_tokens_are_the_planted_needle(planted, set_frames):
    backend, visual, needle = planted
    pipe = FlexSelect(backend)
    prompt = backend.prompt("Where is the needle?")
    selection = pipe.select(
        visual, prompt, options=SelectOptions(budget=len(needle), layer=LAYER, set_frames=set_frames)
    )
    assert len(selection.kept) == len(needle)
    recall = np.isin(needle.numpy(), selection.kept.numpy()).mean()
    assert recall >= 0.95, f"recall {recall:.3f}"


def test_a_shallow_layer_does_not_find_it(planted):
    """The signal lives at the reference layer only: layer 0 sees the same inputs but random Q/K weights."""
    backend, visual, needle = planted
    selection = FlexSelect(backend).select(
        visual,
        backend.prompt("Where is the needle?"),
        options=SelectOptions(budget=len(needle), layer=0, set_frames=16),
    )
    assert np.isin(needle.numpy(), selection.kept.numpy()).mean() < 0.5


def test_original_and_compact_positions_both_answer_over_the_needle(planted, tiny_model_dir):
    """Compare the answer pass under the paper's original positions and the compact re-gridding: the reference
    layer's attention from the question to the kept needle tokens, and the prompt length, must agree, since the
    planted signal does not depend on position; what differs is only where the text after the video resumes."""
    backend, visual, needle = planted
    prompt = backend.prompt("Where is the needle?")
    mass = {}
    for mode in ("original", "compact"):
        backend.positions = mode
        inputs = backend.answer_inputs(visual, needle, prompt)
        start = len(prompt.prefix_ids)
        mass[mode] = backend.layer_scores(inputs, [LAYER], len(prompt.suffix_ids), "mean")[LAYER].sum()
        gen = backend.generate(visual, needle, prompt, GenerationConfig(max_new_tokens=3))
        assert gen.prompt_tokens == start + len(needle) + len(prompt.suffix_ids)
        mass[mode + "_next"] = inputs.next_position
    backend.positions = "original"
    assert mass["original"] > 0.5 and abs(mass["original"] - mass["compact"]) < 0.05
    assert mass["compact_next"] < mass["original_next"]  # compact closes the temporal gaps
