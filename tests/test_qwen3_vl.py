"""Qwen3-VL (dense and MoE) on tiny random checkpoints: visual tokens with DeepStack, the timestamped layouts against
transformers' own full-video forward, the captured scores against eager attention, the planted needle (DeepStack
carries it), incomplete checkpoints, layer-scan and the pipeline end to end."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from flexselect.backends import detect_family, load_backend
from flexselect.backends.base import GenerationConfig
from flexselect.backends.hf import qwen3_vl
from flexselect.backends.hf.qwen2_5_vl import patchify
from flexselect.errors import FlexSelectError
from flexselect.selection import frame_sets, top_k
from helpers import check_timestamped_answer, cpu_backends, needle_tokens, qwen3_clip

FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from flexselect.tiny import build_tiny_qwen3_vl

    root = tmp_path_factory.mktemp("qwen3-models")
    return {
        "qwen3_vl": build_tiny_qwen3_vl(root / "dense"),
        "qwen3_vl_moe": build_tiny_qwen3_vl(root / "moe", moe=True),
    }


@pytest.fixture(scope="module")
def backends(model_dirs):
    return cpu_backends(model_dirs)


# -- detection, loading, visual tokens -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_and_loaded(family, model_dirs, backends):
    assert detect_family(model_dirs[family]) == family
    backend = backends[family]
    assert backend.family == family and backend.num_layers == 4 and backend.hidden_size == 64
    assert hasattr(backend.text_model.layers[0].self_attn, "q_norm")


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_tokens_and_deepstack_equal_transformers_video_features(family, backends, monkeypatch):
    backend = backends[family]
    clip = qwen3_clip(n_frames=7)  # odd: the last unit repeats its last frame
    monkeypatch.setattr(qwen3_vl, "ENCODE_CHUNK_UNITS", 2)
    chunked = backend.encode(clip)
    assert chunked.num_frames == 4 and chunked.grid == (2, 3) and chunked.frame_size == (64, 96)
    assert chunked.deepstack.shape == (3, 4 * 6, 64)
    np.testing.assert_allclose(chunked.label_seconds, [0.25, 1.25, 2.25, 3.0])
    patches, (t, gh, gw) = patchify(backend.pixels(clip.frames), 16, 2, 2)
    with torch.inference_mode():
        hf = backend.model.model.get_video_features(patches, torch.tensor([[t, gh, gw]]))
    torch.testing.assert_close(chunked.embeds, hf.pooler_output[0], atol=1e-5, rtol=1e-5)
    for level in range(3):
        torch.testing.assert_close(chunked.deepstack[level], hf.deepstack_features[level][0], atol=1e-5, rtol=1e-5)


# -- layouts against transformers' full-video forward -----------------------------------------------------------------
def full_video_ids(backend, visual, prompt):
    """input_ids and token types of the whole video as Qwen3-VL's processor writes it."""
    tok = backend.tokenizer
    pad = backend.model.config.video_token_id
    ids = prompt.prefix_ids.tolist()
    for u in range(visual.num_frames):
        ids += tok(qwen3_vl.timestamp_label(visual.label_seconds[u]), add_special_tokens=False).input_ids
        ids += [backend.vision_start] + [pad] * visual.tokens_per_frame + [backend.vision_end]
    ids += prompt.suffix_ids.tolist()
    ids = torch.tensor(ids)
    return ids, (ids == pad).int() * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_pass_positions_and_deepstack_are_the_full_video_forwards(family, backends):
    backend = backends[family]
    clip = qwen3_clip(n_frames=12)
    visual = backend.encode(clip)
    prompt = backend.prompt("What happens?")
    ids, types = full_video_ids(backend, visual, prompt)
    hf = backend.model.model
    grid_thw = torch.tensor([[visual.num_frames, visual.grid[0] * 2, visual.grid[1] * 2]])
    positions, _ = hf.get_rope_index(ids[None], types[None], video_grid_thw=grid_thw)

    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)

    handle = backend.text_model.register_forward_pre_hook(grab, with_kwargs=True)
    patches, _ = patchify(backend.pixels(clip.frames), 16, 2, 2)
    try:
        with torch.inference_mode():
            full = hf(
                input_ids=ids[None], pixel_values_videos=patches, video_grid_thw=grid_thw, mm_token_type_ids=types[None]
            ).last_hidden_state
    finally:
        handle.remove()

    everything = backend.answer_inputs(visual, torch.arange(visual.num_tokens), prompt)
    assert torch.equal(everything.position_ids, positions)
    assert everything.next_position == int(positions.max()) + 1
    assert torch.equal(everything.extra["visual_pos_masks"], captured["visual_pos_masks"])
    for ours, theirs in zip(
        everything.extra["deepstack_visual_embeds"], captured["deepstack_visual_embeds"], strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        ours = backend.text_model(**everything.model_inputs()).last_hidden_state
    torch.testing.assert_close(ours, full, atol=1e-4, rtol=1e-4)

    # A subset: every kept token and all the text keep the full video's positions and DeepStack rows.
    kept = torch.tensor([0, 4, 5, 13, 32, 35])  # units 1, 3 and 4 keep nothing
    subset = backend.answer_inputs(visual, kept, prompt)
    full_columns = everything.visual_columns[kept]
    is_text = types == 0
    text_positions = positions[:, 0, is_text]
    keep_columns = torch.cat([torch.nonzero(is_text)[:, 0], full_columns]).sort().values
    assert subset.embeds.shape[1] == len(keep_columns)  # text is never dropped
    assert torch.equal(subset.position_ids[:, 0], positions[:, 0, keep_columns])
    assert torch.equal(subset.position_ids[:, 0, subset.visual_columns], positions[:, 0, full_columns])
    text_mask = torch.ones(subset.embeds.shape[1], dtype=torch.bool)
    text_mask[subset.visual_columns] = False
    assert torch.equal(subset.position_ids[:, 0, text_mask], text_positions)
    assert torch.equal(subset.embeds[0, subset.visual_columns], visual.embeds[kept])
    for level, rows in enumerate(subset.extra["deepstack_visual_embeds"]):
        torch.testing.assert_close(rows, captured["deepstack_visual_embeds"][level][kept])
    assert subset.extra["visual_pos_masks"][0].nonzero()[:, 0].tolist() == subset.visual_columns.tolist()


def test_compact_layout_closes_the_gaps_of_units_that_keep_little(backends, model_dirs):
    backend = load_backend(model_dirs["qwen3_vl"], device="cpu", dtype="float32", positions="compact")
    visual = backends["qwen3_vl"].encode(qwen3_clip(n_frames=12))
    prompt = backend.prompt("What happens?")
    kept = torch.tensor([0, 4, 5, 13, 32, 35])
    compact = backend.answer_inputs(visual, kept, prompt)
    original = backends["qwen3_vl"].answer_inputs(visual, kept, prompt)
    assert torch.equal(compact.embeds, original.embeds)
    assert compact.next_position < original.next_position
    p = len(prompt.prefix_ids)
    assert torch.equal(compact.position_ids[:, 0, :p], original.position_ids[:, 0, :p])


def test_scoring_pass_writes_the_sets_units_with_their_own_timestamps(backends):
    backend = backends["qwen3_vl"]
    visual = backend.encode(qwen3_clip(n_frames=12))
    prompt = backend.prompt("Where?")
    inputs = backend.scoring_inputs(visual, [1, 4], prompt)
    text = torch.ones(inputs.embeds.shape[1], dtype=torch.bool)
    text[inputs.visual_columns] = False
    assert torch.equal(inputs.embeds[0, inputs.visual_columns], visual.embeds[visual.frame_tokens([1, 4])])
    for level, rows in enumerate(inputs.extra["deepstack_visual_embeds"]):
        assert torch.equal(rows, visual.deepstack[level, visual.frame_tokens([1, 4])])
    ids = torch.cat(
        [
            prompt.prefix_ids,
            torch.tensor(backend.tokenizer("<1.2 seconds>", add_special_tokens=False).input_ids),
            torch.tensor([backend.vision_start, backend.vision_end]),
            torch.tensor(backend.tokenizer("<4.2 seconds>", add_special_tokens=False).input_ids),
            torch.tensor([backend.vision_start, backend.vision_end]),
            prompt.suffix_ids,
        ]
    )
    torch.testing.assert_close(inputs.embeds[0, text], backend.embed_ids(ids))
    # each unit restarts its positions: (s, s + r, s + c), the text resumes at s + max(rows, cols)
    p = len(prompt.prefix_ids)
    label = len(backend.tokenizer("<1.2 seconds>", add_special_tokens=False).input_ids)
    s = p + label + 1
    first = inputs.position_ids[:, 0, inputs.visual_columns[:6]]
    assert first[0].tolist() == [s] * 6 and first[1].tolist() == [s, s, s, s + 1, s + 1, s + 1]
    assert first[2].tolist() == [s, s + 1, s + 2] * 2
    assert int(inputs.position_ids[0, 0, inputs.visual_columns[5] + 1]) == s + 3


# -- the scoring pass ------------------------------------------------------------------------------------------------
def eager_scores(backend, inputs, rows):
    lm = backend.text_model
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        out = lm(**inputs.model_inputs(), output_attentions=True)
    finally:
        lm.config._attn_implementation = previous
    return out.attentions


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("set_frames", [64, 3])  # one frame set, several
def test_scores_equal_eager_attention_with_deepstack_and_qk_norms(family, set_frames, backends):
    backend = backends[family]
    visual = backend.encode(qwen3_clip(n_frames=16))
    prompt = backend.prompt("What color is the car?")
    rows = len(prompt.suffix_ids)
    sets = frame_sets(visual.num_frames, set_frames)
    assert len(sets) == (1 if set_frames == 64 else 3)
    worst = 0.0
    for frames in sets:
        inputs = backend.scoring_inputs(visual, frames, prompt)
        with torch.inference_mode():
            attentions = eager_scores(backend, inputs, rows)
        for layer in (1, 3):
            ours = backend.score(visual, frames, prompt, layer, "max")
            reference = attentions[layer][0, :, -rows:, inputs.visual_columns].amax(dim=(0, 1))
            assert ours.shape == (len(frames) * visual.tokens_per_frame,)
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
            assert torch.equal(top_k(ours, 5), top_k(reference, 5))
            worst = max(worst, float((ours - reference).abs().max()))
    print(f"{family} set_frames={set_frames}: max |ours - eager| = {worst:.2e}")
    # DeepStack matters at layer 3 (after three injections): dropping it changes the scores
    inputs = backend.scoring_inputs(visual, sets[0], prompt)
    inputs.extra["deepstack_visual_embeds"] = [torch.zeros_like(d) for d in inputs.extra["deepstack_visual_embeds"]]
    without = backend.layer_scores(inputs, [3], rows)[3]
    assert not torch.allclose(without, backend.score(visual, sets[0], prompt, 3, "max"), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_pass_never_runs_the_deeper_layers(family, backends):
    backend = backends[family]
    visual = backend.encode(qwen3_clip(n_frames=6))
    layers = backend.text_model.layers
    calls = []
    hooks = [layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(("layer", i))) for i in range(4)]
    hooks += [
        layers[i].self_attn.register_forward_hook(lambda m, a, o, i=i: calls.append(("attn", i))) for i in range(4)
    ]
    hooks += [layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(("mlp", i))) for i in range(4)]
    hooks.append(layers[3].self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append(("q_proj", 3))))
    hooks.append(backend.text_model.norm.register_forward_hook(lambda m, a, o: calls.append(("norm", -1))))
    try:
        backend.score(visual, [0, 1, 2], backend.prompt("Where is it?"), layer=2, aggregate="max")
    finally:
        for h in hooks:
            h.remove()
    assert [c for c in calls if c[0] == "layer"] == [("layer", 0), ("layer", 1)]
    assert [c for c in calls if c[0] == "mlp"] == [("mlp", 0), ("mlp", 1)]
    assert ("attn", 2) not in calls and ("norm", -1) not in calls
    assert not any(c[1] == 3 for c in calls)


def test_past_key_values_prefix_gives_the_same_scores_and_is_left_as_it_was(backends):
    """The capture over a cached prefix (what a video index reuses) equals the pass over the whole sequence."""
    from transformers import DynamicCache

    from flexselect.backends.hf.shared import attention_scores

    backend = backends["qwen3_vl"]
    visual = backend.encode(qwen3_clip(n_frames=6))
    prompt = backend.prompt("Where is it?")
    inputs = backend.scoring_inputs(visual, [0, 1, 2], prompt)
    rows = len(prompt.suffix_ids)
    whole = attention_scores(backend.text_model, [2], rows, **inputs.model_inputs())[2]
    n = inputs.embeds.shape[1] - rows
    cache = DynamicCache(config=backend.text_model.config)
    with torch.inference_mode():
        backend.text_model(
            inputs_embeds=inputs.embeds[:, :n],
            position_ids=inputs.position_ids[..., :n],
            visual_pos_masks=inputs.extra["visual_pos_masks"][:, :n],
            deepstack_visual_embeds=inputs.extra["deepstack_visual_embeds"],
            past_key_values=cache,
            use_cache=True,
        )
        cached = attention_scores(
            backend.text_model,
            [2],
            rows,
            inputs_embeds=inputs.embeds[:, n:],
            position_ids=inputs.position_ids[..., n:],
            past_key_values=cache,
        )[2]
    torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-6)
    assert cache.get_seq_length() == n


# -- planted needle: DeepStack carries it -----------------------------------------------------------------------------
LAYER = 3
FRAMES, GRID = 64, (2, 3)  # 384 visual tokens
KEEP_RATIO = 0.0625


def planted_needle(backend):
    """Layers before LAYER pass their input through (zero attention-output and MLP-down weights) except for DeepStack,
    which adds the needle direction to the needle tokens' hidden states. At LAYER, question queries and needle keys
    share a direction on the lowest rotary frequency; every key also carries a constant on the next-lowest one so
    the per-head K norm keeps relative magnitudes (Q/K norms rescale each head's vector to unit RMS), and the K norm's
    gain on the needle coordinate sharpens the logits."""
    from flexselect.backends.hf.qwen3_vl import DeepStackVisualTokens

    lm = backend.text_model
    hidden, head_dim = lm.config.hidden_size, lm.layers[0].self_attn.head_dim
    gen = torch.Generator().manual_seed(0)
    question_dir, needle_dir, base_dir = torch.linalg.qr(torch.randn(hidden, 3, generator=gen))[0].T
    with torch.no_grad():
        for block in lm.layers[:LAYER]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        block = lm.layers[LAYER]
        block.input_layernorm.weight.fill_(1.0)
        attn = block.self_attn
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        low = head_dim // 2 - 1  # lowest rotary frequency; low - 1 the next-lowest
        for head in range(attn.q_proj.weight.shape[0] // head_dim):
            attn.q_proj.weight[head * head_dim + low] = question_dir
        for head in range(attn.k_proj.weight.shape[0] // head_dim):
            attn.k_proj.weight[head * head_dim + low] = needle_dir
            attn.k_proj.weight[head * head_dim + low - 1] = base_dir
        attn.k_norm.weight.fill_(1.0)
        attn.k_norm.weight[low] = 4.0  # the norm's gain sharpens the needle's logits
        lm.embed_tokens.weight.copy_(
            question_dir + base_dir + 0.05 * torch.randn(lm.embed_tokens.weight.shape, generator=gen)
        )
    n_tokens = FRAMES * GRID[0] * GRID[1]
    needle = needle_tokens(FRAMES, GRID[0] * GRID[1], KEEP_RATIO)
    embeds = base_dir + 0.1 * torch.randn(n_tokens, hidden, generator=gen)
    deepstack = 0.05 * torch.randn(3, n_tokens, hidden, generator=gen)
    deepstack[0, needle] += 1.5 * needle_dir  # only DeepStack knows where the needle is
    visual = DeepStackVisualTokens(
        embeds=embeds,
        num_frames=FRAMES,
        grid=GRID,
        timestamps=np.arange(FRAMES) * 1.0,
        time_interval=1.0,
        frame_size=(64, 96),
        frames_per_unit=2,
        deepstack=deepstack,
        label_seconds=np.arange(FRAMES) + 0.25,
    )
    return visual, torch.from_numpy(needle)


@pytest.fixture()
def planted(model_dirs):
    backend = load_backend(model_dirs["qwen3_vl"], device="cpu", dtype="float32")  # own copy: weights change
    visual, needle = planted_needle(backend)
    return backend, visual, needle


@pytest.mark.parametrize("set_frames", [16, 64])
def test_kept_tokens_are_the_planted_needle(planted, set_frames):
    from flexselect.pipeline import FlexSelect, SelectOptions

    backend, visual, needle = planted
    prompt = backend.prompt("Where is the needle?")
    selection = FlexSelect(backend).select(
        visual, prompt, options=SelectOptions(budget=len(needle), layer=LAYER, set_frames=set_frames)
    )
    assert len(selection.kept) == len(needle) == int(visual.num_tokens * KEEP_RATIO)
    recall = np.isin(needle.numpy(), selection.kept.numpy()).mean()
    print(f"planted needle, set_frames={set_frames}: recall {recall:.3f}")
    assert recall >= 0.95, f"recall {recall:.3f}"
    # without DeepStack the scoring pass cannot see it
    visual.deepstack.zero_()
    blind = FlexSelect(backend).select(
        visual, prompt, options=SelectOptions(budget=len(needle), layer=LAYER, set_frames=set_frames)
    )
    assert np.isin(needle.numpy(), blind.kept.numpy()).mean() < 0.5


def test_answer_layouts_measured_on_the_planted_needle(planted):
    """The answer pass under both layouts: the reference layer's attention mass from the question to the kept
    needle tokens (mean over heads and question rows), the measure the default was chosen by."""
    backend, visual, needle = planted
    prompt = backend.prompt("Where is the needle?")
    mass, next_position = {}, {}
    for mode in ("original", "compact"):
        backend.positions = mode
        inputs = backend.answer_inputs(visual, needle, prompt)
        scores = backend.layer_scores(inputs, [LAYER], len(prompt.suffix_ids), "mean")[LAYER]
        mass[mode], next_position[mode] = float(scores.sum()), inputs.next_position
        gen = backend.generate(visual, needle, prompt, GenerationConfig(max_new_tokens=2))
        assert gen.prompt_tokens == inputs.embeds.shape[1]
    backend.positions = "original"
    print(f"answer-pass attention mass on the needle: original {mass['original']:.6f}, compact {mass['compact']:.6f}")
    assert mass["original"] > 0.5 and abs(mass["original"] - mass["compact"]) < 0.05
    assert next_position["compact"] < next_position["original"]


# -- checkpoints, layer-scan, the pipeline -----------------------------------------------------------------------------
def test_incomplete_checkpoint_is_one_clear_error(model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["qwen3_vl"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    with pytest.raises(FlexSelectError, match="incomplete: model.safetensors is truncated"):
        load_backend(broken, device="cpu")
    weights.unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FlexSelectError, match="model.safetensors is missing; the tokenizer"):
        load_backend(broken, device="cpu")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((model_dirs["qwen3_vl"] / "config.json").read_text())
    (sharded / "tokenizer.json").write_text("{}")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    shutil.copy(model_dirs["qwen3_vl"] / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    with pytest.raises(FlexSelectError, match="model-00002-of-00002.safetensors is missing"):
        load_backend(sharded, device="cpu")


def test_layer_scan_scores_every_layer_like_the_stopped_pass_and_prints_the_layer_to_use(
    model_dirs, backends, tmp_path, capsys
):
    from flexselect.layer_scan import add_layer_scan_command, layer_scores

    backend = backends["qwen3_vl"]
    visual = backend.encode(qwen3_clip(n_frames=6))
    prompt = backend.prompt("What colour is the square?")
    frames = list(range(visual.num_frames))
    every = layer_scores(backend, visual, frames, prompt)
    for layer in range(backend.num_layers):
        torch.testing.assert_close(
            every[layer], backend.score(visual, frames, prompt, layer, "max"), rtol=1e-5, atol=1e-7
        )
    parser = argparse.ArgumentParser()
    add_layer_scan_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "layer-scan",
            "--model",
            str(model_dirs["qwen3_vl"]),
            "--synthetic",
            "1",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    assert args.run(args) == 0
    best = json.loads((tmp_path / "layer_scan.json").read_text())["best_layer"]
    assert f"--layer {best}" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_answers_end_to_end(family, model_dirs):
    from flexselect.pipeline import FlexSelect, SelectOptions

    pipe = FlexSelect.load(model_dirs[family], device="cpu", dtype="float32")
    answer = pipe.answer(
        qwen3_clip(n_frames=16),
        "What happens in the video?",
        generation=GenerationConfig(max_new_tokens=3),
        options=SelectOptions(budget=12, set_frames=4, layer=2),
    )
    assert answer.visual.num_frames == 8 and answer.visual.tokens_per_frame == 6
    assert len(answer.selection.sets) == 2
    check_timestamped_answer(pipe, answer, "What happens in the video?", kept=12)
    assert len(answer.generation.token_ids) <= 3


def test_mean_aggregate_equals_eager_attention_mean(backends):
    """aggregate="mean" over the captured question rows equals the mean of eager attention over heads and rows."""
    backend = backends["qwen3_vl"]
    visual = backend.encode(qwen3_clip(n_frames=4))
    prompt = backend.prompt("Why?")
    inputs = backend.scoring_inputs(visual, [0, 1], prompt)
    mean = backend.layer_scores(inputs, [1], len(prompt.suffix_ids), "mean")[1]
    with torch.inference_mode():
        attentions = eager_scores(backend, inputs, len(prompt.suffix_ids))
    rows = attentions[1][0, :, -len(prompt.suffix_ids) :, inputs.visual_columns]
    torch.testing.assert_close(mean, rows.mean(dim=(0, 1)), rtol=1e-4, atol=1e-7)
