"""Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE on GGUF: the export and the llama.cpp backend against the
transformers backend on the same tiny random weights (f32 GGUF, f32 KV cache where outputs are compared).

Agreement asked for (measured on these fixtures: see the README's GGUF section):
  * visual tokens (main embedding and every DeepStack slice): max |diff| <= 2e-3 x max |value|;
  * the scoring and answer layouts (timestamp text, per-unit positions, visual columns): identical;
  * Q/K captured with the graph stopped after the reference layer = without the stop, bit for bit;
  * kept tokens per frame set (top 25%) at every tested layer: mean overlap >= 0.95, every set >= 0.90;
  * greedy answer tokens: identical.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flexselect.backends import load_backend
from flexselect.backends.base import GenerationConfig
from flexselect.backends.gguf_info import inspect_gguf
from flexselect.backends.llama_cpp import LlamaCppBackend
from flexselect.errors import FlexSelectError
from flexselect.selection import frame_sets, top_k
from flexselect.tiny import build_tiny_qwen3_5, build_tiny_qwen3_vl
from flexselect_export.gguf import export_gguf

FAMILIES = {  # family -> (builder, llama.cpp text architecture, layers to score)
    "qwen3_vl": (lambda d: build_tiny_qwen3_vl(d), "qwen3vl", (1, 3)),
    "qwen3_vl_moe": (lambda d: build_tiny_qwen3_vl(d, moe=True), "qwen3vlmoe", (1, 3)),
    "qwen3_5": (lambda d: build_tiny_qwen3_5(d), "qwen35", (3, 7)),
    "qwen3_5_moe": (lambda d: build_tiny_qwen3_5(d, moe=True), "qwen35moe", (3, 7)),
}
QUESTION = "What color is the car?"
EMBED_RTOL = 2e-3


def fake_clip(n_frames=16, height=96, width=128, fps=2.0, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n_frames, height, width, 3), dtype=np.uint8)
    frames[:, : height // 2, : width // 3] //= 8  # a few flat regions so that attention has something to prefer
    return SimpleNamespace(frames=frames, timestamps=np.arange(n_frames) / fps, source="fake", sample_fps=fps)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (checkpoint folder, model.gguf, mmproj.gguf), each built and exported once."""
    out = {}
    for family, (build, _, _) in FAMILIES.items():
        model_dir = build(tmp_path_factory.mktemp("models") / f"tiny-{family}")
        out[family] = (model_dir, *export_gguf(model_dir, tmp_path_factory.mktemp(f"gguf-{family}"), "f32"))
    return out


@pytest.fixture(scope="module")
def pair(exported, request):
    """(transformers backend, llama.cpp backend with an f32 KV cache) of one family."""
    model_dir, model, mmproj = exported[request.param]
    hf = load_backend(model_dir, device="cpu", dtype="float32")
    return hf, LlamaCppBackend(model, mmproj, n_ctx=4096, n_threads=2, kv_f32=True)


@pytest.fixture(scope="module")
def clip():
    return fake_clip()


EVERY_FAMILY = pytest.mark.parametrize("pair", list(FAMILIES), indirect=True)


def _family(pair) -> str:
    return pair[1].family


# -- export --------------------------------------------------------------------------------------------------------
@EVERY_FAMILY
def test_export_writes_checked_files(pair, exported):
    _, model, mmproj = exported[_family(pair)]
    assert sorted(p.name for p in model.parent.iterdir()) == ["mmproj.gguf", "model.gguf"]  # no leftovers
    text, proj = inspect_gguf(model), inspect_gguf(mmproj)
    assert text["architecture"] == FAMILIES[_family(pair)][1] and text["embedding_length"] == 64
    assert proj["projector_type"] == "qwen3vl_merger" and proj["projection_dim"] == 64
    if _family(pair).startswith("qwen3_vl"):
        assert text["deepstack_layers"] == proj["deepstack_layers"] == 3 and text["block_count"] == 4
        assert pair[1].row_width == 4 * 64  # each mtmd row: the embedding and its three DeepStack slices
    else:
        assert text["deepstack_layers"] == proj["deepstack_layers"] == 0 and text["block_count"] == 8
        assert text["recurrent_layers"] == [0, 1, 2, 4, 5, 6] and pair[1].attention_layers == [3, 7]
        assert not any(".nextn." in t for t in text["tensors"])  # no multi-token-prediction head


# -- tokens, encoding, layouts -------------------------------------------------------------------------------------
@EVERY_FAMILY
def test_prompt_and_visual_tokens_match_transformers(pair, clip):
    hf, lb = pair
    ours, theirs = lb.prompt(QUESTION), hf.prompt(QUESTION)
    assert torch.equal(ours.prefix_ids, theirs.prefix_ids) and torch.equal(ours.suffix_ids, theirs.suffix_ids)
    a, b = lb.encode(clip), hf.encode(clip)
    assert (a.num_frames, a.grid, a.frame_size) == (b.num_frames, b.grid, b.frame_size) == (8, (3, 4), (96, 128))
    np.testing.assert_array_equal(a.label_seconds, b.label_seconds)
    assert (a.embeds - b.embeds).abs().max() <= EMBED_RTOL * b.embeds.abs().max()
    assert a.deepstack.shape == b.deepstack.shape
    if b.deepstack.numel():
        assert (a.deepstack - b.deepstack).abs().max() <= EMBED_RTOL * b.deepstack.abs().max()


@pytest.mark.parametrize("positions", ["original", "compact"])
@EVERY_FAMILY
def test_layouts_match_transformers(pair, clip, positions):
    hf, lb = pair
    visual, prompt = hf.encode(clip), hf.prompt(QUESTION)
    units = [1, 4, 7]
    runs, columns, _ = lb._qwen3_layout(visual, units, [visual.frame_tokens([u]) for u in units], prompt, False)
    theirs = hf.scoring_inputs(visual, units, prompt)
    assert np.array_equal(np.concatenate([p for _, _, p in runs], axis=1), theirs.position_ids[:, 0].cpu().numpy())
    assert torch.equal(columns, theirs.visual_columns.cpu())
    kept = torch.tensor([0, 5, 30, 31, 77, 90, 91])  # units 0, 2, 6 and 7 keep tokens; 1, 3, 4 and 5 keep none
    hf.positions = lb.positions = positions
    try:
        owner = kept // visual.tokens_per_frame
        runs, columns, next_position = lb._qwen3_layout(
            visual,
            list(range(visual.num_frames)),
            [kept[owner == u] for u in range(visual.num_frames)],
            prompt,
            compact=positions == "compact",
        )
        theirs = hf.answer_inputs(visual, kept, prompt)
    finally:
        hf.positions = lb.positions = "original"
    assert np.array_equal(np.concatenate([p for _, _, p in runs], axis=1), theirs.position_ids[:, 0].cpu().numpy())
    assert torch.equal(columns, theirs.visual_columns.cpu()) and next_position == theirs.next_position


# -- scoring pass --------------------------------------------------------------------------------------------------
@EVERY_FAMILY
def test_stopped_pass_equals_full_pass(pair, clip):
    _, lb = pair
    visual, prompt = lb.encode(clip), lb.prompt(QUESTION)
    layer = FAMILIES[_family(pair)][2][0]
    q_stop, k_stop = lb.reference_qk(visual, [0, 3, 6], prompt, layer, abort=True)
    q_full, k_full = lb.reference_qk(visual, [0, 3, 6], prompt, layer, abort=False)
    assert torch.equal(q_stop, q_full) and torch.equal(k_stop, k_full)
    assert q_stop.shape[:2] == (4, len(prompt.suffix_ids)) and k_stop.shape[0] == 2


@pytest.mark.parametrize("pair", ["qwen3_vl", "qwen3_vl_moe"], indirect=True)  # hybrids have no index
def test_indexed_scores_equal_plain_scores(pair, clip):
    """The video index's two halves (context saved once, the question decoded against it) score a Qwen3-VL set
    with the timestamp layout of a plain pass, bit for bit, for the question it was built with and another."""
    _, lb = pair
    visual = lb.encode(clip)
    prompts = [lb.prompt(QUESTION), lb.prompt("How many people are there?")]
    layer = FAMILIES[_family(pair)][2][0]
    for frames in frame_sets(visual.num_frames, 4):
        entry = lb.index_set(visual, frames, prompts[0], layer)
        for prompt in prompts:
            assert torch.equal(lb.score_indexed(entry, visual, prompt), lb.score(visual, frames, prompt, layer))


@EVERY_FAMILY
def test_kept_tokens_per_set_match_transformers(pair, clip):
    hf, lb = pair
    visual, prompt = hf.encode(clip), hf.prompt(QUESTION)
    overlaps = []
    for layer in FAMILIES[_family(pair)][2]:
        for frames in frame_sets(visual.num_frames, 3):
            theirs = hf.score(visual, frames, prompt, layer, "max")
            ours = lb.score(visual, frames, prompt, layer, "max")
            k = len(theirs) // 4
            overlaps.append(len(set(top_k(ours, k).tolist()) & set(top_k(theirs, k).tolist())) / k)
    assert np.mean(overlaps) >= 0.95 and min(overlaps) >= 0.90, overlaps


@EVERY_FAMILY
def test_greedy_answer_matches_transformers(pair, clip):
    hf, lb = pair
    visual, prompt = hf.encode(clip), hf.prompt(QUESTION)
    layer = FAMILIES[_family(pair)][2][-1]
    kept = top_k(hf.score(visual, list(range(visual.num_frames)), prompt, layer, "max"), 40)
    config = GenerationConfig(max_new_tokens=10)
    ours, theirs = lb.generate(visual, kept, prompt, config), hf.generate(visual, kept, prompt, config)
    assert ours.token_ids == theirs.token_ids and len(ours.token_ids) > 0
    assert ours.prompt_tokens == theirs.prompt_tokens


# -- bad inputs ----------------------------------------------------------------------------------------------------
@EVERY_FAMILY
def test_linear_attention_layer_and_wrong_mmproj_are_refused(pair, exported, clip):
    _, lb = pair
    family = _family(pair)
    _, model, _ = exported[family]
    other = "qwen3_5" if family.startswith("qwen3_vl") else "qwen3_vl"  # DeepStack levels differ: 0 vs 3
    with pytest.raises(FlexSelectError, match="DeepStack levels .* belongs to another model"):
        LlamaCppBackend(model, exported[other][2], n_ctx=256, n_threads=1)
    if family.startswith("qwen3_5"):
        visual, prompt = lb.encode(clip), lb.prompt(QUESTION)
        with pytest.raises(FlexSelectError, match="layer 2 is a linear-attention layer.* are 3, 7"):
            lb.score(visual, [0, 1], prompt, 2, "max")


def test_qwen2_5_vl_and_qwen3_vl_files_are_not_mixed(exported, tiny_model_dir, tmp_path_factory):
    # the projector type decides, before anything is loaded
    qwen25_model, qwen25_mmproj = export_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf-qwen2_5_vl"), "f16")
    _, model, mmproj = exported["qwen3_vl"]
    with pytest.raises(FlexSelectError, match="'qwen2.5vl_merger' projector, but .* takes a 'qwen3vl_merger'"):
        LlamaCppBackend(model, qwen25_mmproj, n_ctx=256, n_threads=1)
    with pytest.raises(FlexSelectError, match="a 'qwen2vl' model takes"):
        LlamaCppBackend(qwen25_model, mmproj, n_ctx=256, n_threads=1)
