"""Qwen3.5 (dense and MoE) on tiny random checkpoints: the hybrid Gated DeltaNet / full-attention text stack.

Only full-attention layers can be reference layers: the captured scores equal an eager full forward's attention
probabilities there (the linear layers before it carrying their convolution and recurrent state as in that forward),
the deeper layers never run, a linear-attention --layer is refused with the valid list, the default is the
full-attention layer nearest Qwen2.5-VL's relative depth, layer-scan scans only those layers, the planted needle is
found at a 6.25% keep ratio, the cached answer pass equals uncached full forwards, and the pipeline answers end to end.
"""

import argparse
import logging

import numpy as np
import pytest
import torch

from flexselect.backends import detect_family, load_backend
from flexselect.backends.base import GenerationConfig
from flexselect.backends.hf.qwen2_5_vl import patchify
from flexselect.backends.hf.qwen3_5 import Qwen35Backend
from flexselect.defaults import reference_layer_for
from flexselect.errors import FlexSelectError
from flexselect.pipeline import FlexSelect, SelectOptions
from flexselect.selection import frame_sets, top_k
from helpers import check_timestamped_answer, cpu_backends, needle_tokens, qwen3_clip

FAMILIES = ["qwen3_5", "qwen3_5_moe"]
FULL = [3, 7]  # the tiny models' full-attention layers (interval 4 of 8)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from flexselect.tiny import build_tiny_qwen3_5, build_tiny_qwen3_5_moe

    root = tmp_path_factory.mktemp("qwen3_5-models")
    return {"qwen3_5": build_tiny_qwen3_5(root / "dense"), "qwen3_5_moe": build_tiny_qwen3_5_moe(root / "moe")}


@pytest.fixture(scope="module")
def backends(model_dirs):
    return cpu_backends(model_dirs)


# -- detection, loading, visual tokens -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_and_loaded_with_its_full_attention_layers(family, model_dirs, backends):
    assert detect_family(model_dirs[family]) == family
    backend = backends[family]
    assert isinstance(backend, Qwen35Backend) and backend.family == family and backend.num_layers == 8
    assert backend.attention_layers == FULL
    assert [hasattr(layer, "linear_attn") for layer in backend.text_model.layers] == [i not in FULL for i in range(8)]


def test_tokenizer_is_the_checkpoints_own(backends, model_dirs):
    """transformers' Qwen3_5Tokenizer would rebuild a byte-level BPE; the backend reads tokenizer.json as is."""
    from tokenizers import Tokenizer

    backend = backends["qwen3_5"]
    text = "<|im_start|>user\nWhat colour is the car?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    own = Tokenizer.from_file(str(model_dirs["qwen3_5"] / "tokenizer.json")).encode(text, add_special_tokens=False)
    assert backend.tokenizer(text, add_special_tokens=False).input_ids == own.ids
    assert backend.tokenizer.decode(own.ids, skip_special_tokens=True).strip().startswith("user\nWhat colour")


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_tokens_equal_transformers_video_features_without_deepstack(family, backends):
    backend = backends[family]
    clip = qwen3_clip(n_frames=7)
    visual = backend.encode(clip)
    assert visual.num_frames == 4 and visual.grid == (2, 3) and visual.deepstack.shape[0] == 0
    patches, (t, gh, gw) = patchify(backend.pixels(clip.frames), 16, 2, 2)
    with torch.inference_mode():
        hf = backend.model.model.get_video_features(patches, torch.tensor([[t, gh, gw]]))
    torch.testing.assert_close(visual.embeds, hf.pooler_output[0], atol=1e-5, rtol=1e-5)
    inputs = backend.scoring_inputs(visual, [0, 2], backend.prompt("What?"))
    assert inputs.extra == {}  # the language model takes no DeepStack inputs


# -- the scoring pass against an eager full forward ------------------------------------------------------------------
def eager_attentions(backend, inputs):
    """Attention probabilities of an eager full forward: one entry per full-attention layer, in order."""
    lm = backend.text_model
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            out = lm(**inputs.model_inputs(), output_attentions=True)
    finally:
        lm.config._attn_implementation = previous
    assert len(out.attentions) == len(backend.attention_layers)
    return dict(zip(backend.attention_layers, out.attentions))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("set_frames", [64, 3])  # one frame set, several
def test_scores_equal_eager_attention_at_each_full_attention_layer(family, set_frames, backends):
    backend = backends[family]
    visual = backend.encode(qwen3_clip(n_frames=16))
    prompt = backend.prompt("What color is the car?")
    rows = len(prompt.suffix_ids)
    worst = 0.0
    for frames in frame_sets(visual.num_frames, set_frames):
        inputs = backend.scoring_inputs(visual, frames, prompt)
        attentions = eager_attentions(backend, inputs)
        for layer in FULL:
            ours = backend.score(visual, frames, prompt, layer, "max")
            reference = attentions[layer][0, :, -rows:, inputs.visual_columns].amax(dim=(0, 1))
            assert ours.shape == (len(frames) * visual.tokens_per_frame,)
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
            assert torch.equal(top_k(ours, 5), top_k(reference, 5))
            worst = max(worst, float((ours - reference).abs().max()))
    print(f"{family} set_frames={set_frames}: max |ours - eager| = {worst:.2e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_layers_before_the_reference_carry_the_state_of_a_full_forward(family, backends):
    """What enters the reference layer in the stopped pass is exactly what enters it in an uncached full forward,
    and the linear layers do mix the sequence there (dropping one visual token changes the rows after it): their
    convolution and recurrent state ran over the whole prefix + set + question, from zero, as in that forward."""
    backend = backends[family]
    visual = backend.encode(qwen3_clip(n_frames=6))
    prompt = backend.prompt("Where is it?")
    inputs = backend.scoring_inputs(visual, [0, 1, 2], prompt)
    entering = []
    handle = backend.text_model.layers[FULL[0]].register_forward_pre_hook(
        lambda module, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    first = int(inputs.visual_columns[0])
    without_first = torch.cat([torch.arange(first), torch.arange(first + 1, inputs.embeds.shape[1])])
    try:
        backend.score(visual, [0, 1, 2], prompt, FULL[0], "max")
        with torch.inference_mode():
            backend.text_model(**inputs.model_inputs(), use_cache=False)
            backend.text_model(
                inputs_embeds=inputs.embeds[:, without_first],
                position_ids=inputs.position_ids[..., without_first],
                use_cache=False,
            )
    finally:
        handle.remove()
    stopped, full, shorter = entering
    assert torch.equal(stopped, full)
    after = (full[0, first + 1 : first + 4] - shorter[0, first : first + 3]).abs().amax(dim=-1)
    assert bool((after > 1e-4).all()), after


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_pass_stops_after_the_reference_layers_qk(family, backends):
    backend = backends[family]
    visual = backend.encode(qwen3_clip(n_frames=6))
    layers = backend.text_model.layers
    calls = []
    hooks = [layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(("layer", i))) for i in range(8)]
    hooks += [layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(("mlp", i))) for i in range(8)]
    for i in FULL:
        attn = layers[i].self_attn
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: calls.append(("k_proj", i))))
        hooks.append(attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: calls.append(("o_proj", i))))
    hooks.append(backend.text_model.norm.register_forward_hook(lambda m, a, o: calls.append(("norm", -1))))
    try:
        backend.score(visual, [0, 1, 2], backend.prompt("Where is it?"), layer=FULL[0], aggregate="max")
    finally:
        for h in hooks:
            h.remove()
    assert [c for c in calls if c[0] == "layer"] == [("layer", 0), ("layer", 1), ("layer", 2)]
    assert [c for c in calls if c[0] == "mlp"] == [("mlp", 0), ("mlp", 1), ("mlp", 2)]
    assert ("k_proj", 3) in calls and ("o_proj", 3) not in calls and ("norm", -1) not in calls
    assert not any(c[1] > FULL[0] for c in calls)


# -- the reference layer: candidates, refusal, default -----------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 2, 5, 6])
def test_a_linear_attention_layer_is_refused_with_the_valid_ones(layer, backends):
    backend = backends["qwen3_5"]
    visual = backend.encode(qwen3_clip(n_frames=4))
    with pytest.raises(FlexSelectError, match=rf"layer {layer} is a linear-attention layer.* are 3, 7"):
        FlexSelect(backend).select(visual, backend.prompt("What?"), options=SelectOptions(budget=6, layer=layer))
    with pytest.raises(FlexSelectError, match="out of range: this model has layers 0..7"):
        FlexSelect(backend).select(visual, backend.prompt("What?"), options=SelectOptions(budget=6, layer=8))


def test_default_layer_is_the_full_attention_layer_nearest_qwen2_5_vl_depth(backends, caplog):
    # the real shapes: Qwen3.5-9B (32 layers), -27B (64), -35B-A3B (40); interval 4, so layers 3, 7, 11, ...
    for family, n, expected in [
        ("qwen3_5", 32, 23),
        ("qwen3_5", 64, 47),
        ("qwen3_5_moe", 40, 27),
        ("qwen3_5", 24, 19),
        ("qwen3_5", 8, 7),
    ]:
        full = tuple(range(3, n, 4))
        assert reference_layer_for(family, n, full) == expected
        assert abs(expected - 20 / 28 * n) <= 2  # nearest of a grid of step 4
    backend = backends["qwen3_5"]
    visual = backend.encode(qwen3_clip(n_frames=8))
    reference_layer_for.cache_clear()
    with caplog.at_level(logging.WARNING, logger="flexselect"):
        selection = FlexSelect(backend).select(visual, backend.prompt("What?"), options=SelectOptions(budget=6))
    assert selection.layer == 7
    assert "never measured" in caplog.text and "full-attention layer nearest" in caplog.text


def test_layer_scan_scans_only_the_full_attention_layers_and_prints_the_layer_to_use(
    model_dirs, backends, tmp_path, capsys
):
    from flexselect.layer_scan import layer_scores, make_scan_examples, run_layer_scan

    backend = backends["qwen3_5"]
    visual = backend.encode(qwen3_clip(n_frames=8))
    prompt = backend.prompt("What colour is the square?")
    scanned = layer_scores(backend, visual, list(range(visual.num_frames)), prompt)  # one row per full layer
    assert scanned.shape == (len(FULL), visual.num_tokens)
    for row, layer in zip(scanned, FULL):
        torch.testing.assert_close(
            row, backend.score(visual, list(range(4)), prompt, layer, "max").cpu(), rtol=1e-5, atol=1e-7
        )
    examples = make_scan_examples(tmp_path / "examples", 2, num_frames=8, size=(64, 96))
    args = argparse.Namespace(
        model=str(model_dirs["qwen3_5"]),
        examples=str(examples),
        synthetic=2,
        top_k=None,
        aggregate=None,
        out=str(tmp_path / "scan"),
        device="cpu",
        dtype="float32",
    )
    assert run_layer_scan(args) == 0
    out = capsys.readouterr().out
    scanned_lines = [line for line in out.splitlines() if line.startswith("layer ")]
    assert [int(line.split()[1]) for line in scanned_lines] == FULL
    best = int(out.split("best layer: ")[1].split()[0])
    assert best in FULL and f"--layer {best}" in out


# -- planted needle ------------------------------------------------------------------------------------------------
LAYER = 3
FRAMES, GRID = 64, (2, 3)  # 384 visual tokens
KEEP_RATIO = 0.0625  # the paper's: 6.25%


def planted_needle(backend):
    """Layers before LAYER pass their input through (zero output projections of the linear attention and of the MLP
    or experts), so the reference layer sees the embeddings. There, question queries and needle keys share one
    direction on a head dimension past the partial rotary (positions never rotate it); every key also carries a
    constant on another such dimension, so the per-head K norm keeps the needle's share large and the others' zero.
    The noise tokens are orthogonal to the needle direction."""
    from flexselect.backends.hf.qwen3_vl import DeepStackVisualTokens

    lm = backend.text_model
    hidden, head_dim = lm.config.hidden_size, lm.layers[LAYER].self_attn.head_dim
    rotary = int(head_dim * lm.config.rope_parameters["partial_rotary_factor"])
    gen = torch.Generator().manual_seed(0)
    question_dir, needle_dir, base_dir = torch.linalg.qr(torch.randn(hidden, 3, generator=gen))[0].T
    with torch.no_grad():
        for block in lm.layers[:LAYER]:
            for name, p in block.named_parameters():
                if name.endswith(("out_proj.weight", "down_proj.weight", "experts.down_proj")):
                    p.zero_()
        block = lm.layers[LAYER]
        attn = block.self_attn
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        free = head_dim - 1  # not rotated: rotary covers dims 0..rotary-1 only
        assert free - 1 >= rotary
        for head in range(lm.config.num_attention_heads):
            attn.q_proj.weight[head * 2 * head_dim + free] = question_dir  # the query half; the gate half stays
        for head in range(lm.config.num_key_value_heads):
            attn.k_proj.weight[head * head_dim + free] = needle_dir
            attn.k_proj.weight[head * head_dim + free - 1] = base_dir
        lm.embed_tokens.weight.copy_(
            question_dir + base_dir + 0.05 * torch.randn(lm.embed_tokens.weight.shape, generator=gen)
        )
    n_tokens = FRAMES * GRID[0] * GRID[1]
    needle = needle_tokens(FRAMES, GRID[0] * GRID[1], KEEP_RATIO)
    embeds = base_dir + 0.3 * torch.randn(n_tokens, hidden, generator=gen)
    embeds -= (embeds @ needle_dir)[:, None] * needle_dir  # noise: nothing along the needle direction
    embeds[needle] += 1.5 * needle_dir
    visual = DeepStackVisualTokens(
        embeds=embeds,
        num_frames=FRAMES,
        grid=GRID,
        timestamps=np.arange(FRAMES) * 1.0,
        time_interval=1.0,
        frame_size=(64, 96),
        frames_per_unit=2,
        deepstack=torch.zeros(0, n_tokens, hidden),
        label_seconds=np.arange(FRAMES) + 0.25,
    )
    return visual, torch.from_numpy(needle)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_are_the_planted_needle(family, model_dirs):
    backend = load_backend(model_dirs[family], device="cpu", dtype="float32")  # own copy: weights change
    visual, needle = planted_needle(backend)
    prompt = backend.prompt("Where is the needle?")
    for set_frames in (16, 64):
        options = SelectOptions(budget=len(needle), layer=LAYER, set_frames=set_frames)
        selection = FlexSelect(backend).select(visual, prompt, options=options)
        assert len(selection.kept) == len(needle) == int(visual.num_tokens * KEEP_RATIO)
        recall = np.isin(needle.numpy(), selection.kept.numpy()).mean()
        print(f"{family} planted needle, set_frames={set_frames}: recall {recall:.3f}")
        assert recall >= 0.95, f"set_frames={set_frames}: recall {recall:.3f}"
    # the other full-attention layer has random Q/K: it does not find it
    other = FlexSelect(backend).select(visual, prompt, options=SelectOptions(budget=len(needle), layer=7))
    assert np.isin(needle.numpy(), other.kept.numpy()).mean() < 0.5


# -- answer pass -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_answer_pass_equals_uncached_full_forwards(family, backends):
    """Greedy decoding with the hybrid cache (linear layers' conv/recurrent state + full layers' KV) gives the
    tokens that re-running the whole sequence without a cache gives at every step."""
    backend = backends[family]
    visual = backend.encode(qwen3_clip(n_frames=8))
    prompt = backend.prompt("What happens?")
    kept = torch.tensor([0, 4, 5, 13, 20])
    steps = 4
    generated = backend.generate(visual, kept, prompt, GenerationConfig(max_new_tokens=steps))
    inputs = backend.answer_inputs(visual, kept, prompt)
    embeds, positions = inputs.embeds, inputs.position_ids
    expected = []
    with torch.inference_mode():
        for step in range(len(generated.token_ids)):
            hidden = backend.text_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
            token = int(backend.model.lm_head(hidden[:, -1]).argmax())
            expected.append(token)
            embeds = torch.cat([embeds, backend.embed_ids(torch.tensor([token]))[None]], dim=1)
            positions = torch.cat([positions, torch.full((3, 1, 1), inputs.next_position + step)], dim=2)
    assert generated.token_ids == expected
    assert generated.prompt_tokens == inputs.embeds.shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_answers_end_to_end(family, model_dirs, test_video):
    pipe = FlexSelect.load(model_dirs[family], device="cpu", dtype="float32")
    answer = pipe.answer(
        test_video,
        "What colour is the square?",
        generation=GenerationConfig(max_new_tokens=3),
        options=SelectOptions(budget=20, set_frames=4),
    )
    assert answer.selection.layer == 7 and answer.stats["reference_layer"] == 7  # the default
    assert answer.visual.tokens_per_frame == 20
    check_timestamped_answer(pipe, answer, "What colour is the square?", kept=20)
    assert isinstance(answer.text, str) and len(answer.generation.token_ids) <= 3


def test_cli_show_writes_the_sheet_and_refuses_a_linear_attention_layer(model_dirs, test_video, tmp_path, capsys):
    from flexselect.cli import main

    model = str(model_dirs["qwen3_5_moe"])
    base = [
        str(test_video),
        "What colour is the square?",
        "--model",
        model,
        "--frames",
        "8",
        "--budget",
        "20",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    assert main(["answer", *base, "--layer", "5"]) != 0
    assert "layer 5 is a linear-attention layer" in capsys.readouterr().err
    out = tmp_path / "sheet.png"
    assert main(["show", *base, "--layer", "3", "-o", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 0
