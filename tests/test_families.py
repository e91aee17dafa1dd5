"""LLaVA-OneVision, InternVL and Qwen2-VL on tiny random checkpoints: visual tokens, layouts and positions, the
stopped scoring pass against eager attention (Qwen2.5-VL too), and the pipeline end to end."""

import json

import numpy as np
import pytest
import torch

from flexselect.backends import detect_family, load_backend
from flexselect.backends.base import GenerationConfig
from flexselect.errors import FlexSelectError
from flexselect.selection import frame_sets, top_k
from flexselect.video import Clip

FAMILIES = ["llava_onevision", "internvl", "qwen2_vl"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from flexselect.tiny import build_tiny_internvl, build_tiny_llava_onevision, build_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("family-models")
    return {
        "llava_onevision": build_tiny_llava_onevision(root / "llava"),
        "internvl": build_tiny_internvl(root / "internvl"),
        "qwen2_vl": build_tiny_qwen2_vl(root / "qwen2vl"),
    }


@pytest.fixture(scope="module")
def backends(model_dirs):
    return {family: load_backend(path, device="cpu", dtype="float32") for family, path in model_dirs.items()}


def frames_array(n_frames=8, height=56, width=84, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n_frames, height, width, 3), dtype=np.uint8)


def fake_clip(n_frames=8, fps=2.0, seed=0):
    return Clip.from_frames(frames_array(n_frames, seed=seed), fps)


def visual_columns(backend, visual, frames, prompt):
    if hasattr(backend, "scoring_columns"):
        return backend.scoring_columns(visual, frames, prompt)
    start = len(prompt.prefix_ids)
    return torch.arange(start, start + len(frames) * visual.tokens_per_frame)


# -- detection, loading ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_and_loaded(family, model_dirs, backends):
    assert detect_family(model_dirs[family]) == family
    backend = backends[family]
    assert backend.family == family and backend.num_layers == 4 and backend.hidden_size == 64


def test_unsupported_model_type_lists_the_supported_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    supported = "internvl.*llava_onevision.*qwen2_5_vl.*qwen2_vl.*qwen3_vl.*qwen3_vl_moe"
    with pytest.raises(FlexSelectError, match=supported):
        load_backend(tmp_path)


def test_internvl_with_a_qk_normalising_language_model_scores_like_eager_attention(model_dirs):
    """InternVL3.5's Qwen3 language model normalises Q/K per head: the capture sees them after the norms."""
    from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration

    from flexselect.backends.hf.internvl import InternVLBackend
    from flexselect.tiny import TINY_QWEN2_TEXT, TINY_SQUARE_VISION

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["internvl"])
    config = InternVLConfig(
        text_config={**TINY_QWEN2_TEXT, "model_type": "qwen3", "head_dim": 16, "vocab_size": len(tokenizer)},
        vision_config=TINY_SQUARE_VISION,
        downsample_ratio=0.5,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )
    torch.manual_seed(0)
    backend = InternVLBackend(InternVLForConditionalGeneration(config).eval(), tokenizer, {})
    assert hasattr(backend.text_model.layers[0].self_attn, "q_norm")
    visual = backend.encode(fake_clip(n_frames=6))
    prompt = backend.prompt("What color is the car?")
    ours = backend.score(visual, [0, 2, 4], prompt, 2, "max")
    with torch.inference_mode():
        reference = eager_scores(backend, visual, [0, 2, 4], prompt, 2)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    assert torch.equal(top_k(ours, 5), top_k(reference, 5))


# -- visual tokens ---------------------------------------------------------------------------------------------------
def test_llava_tokens_are_transformers_video_features_without_the_newline(backends, monkeypatch):
    from flexselect.backends.hf import common

    backend = backends["llava_onevision"]
    clip = fake_clip(n_frames=5)
    whole = backend.encode(clip)
    assert whole.grid == (4, 4) and whole.tokens_per_frame == 16 and whole.embeds.shape == (5 * 16, 64)
    pixels = common.square_pixels(clip.frames, 112, backend.mean, backend.std)
    with torch.inference_mode():
        hf = backend.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output[0]
    torch.testing.assert_close(whole.embeds, hf[:-1], atol=1e-5, rtol=1e-5)  # hf appends one newline at the end
    torch.testing.assert_close(hf[-1], backend.model.model.image_newline)
    monkeypatch.setattr(common, "ENCODE_CHUNK_FRAMES", 2)
    torch.testing.assert_close(backend.encode(clip).embeds, whole.embeds, atol=1e-5, rtol=1e-5)


def test_internvl_frame_block_is_img_tokens_then_end_img(backends, monkeypatch):
    from flexselect.backends.hf import common

    backend = backends["internvl"]
    clip = fake_clip(n_frames=5)
    visual = backend.encode(clip)
    assert visual.grid == (4, 4) and visual.tokens_per_frame == 18 and visual.num_tokens == 90
    blocks = visual.embeds.view(5, 18, 64)
    start_end = backend.embed_ids(torch.tensor(backend.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])))
    assert torch.equal(blocks[:, 0], start_end[0].expand(5, -1)) and torch.equal(
        blocks[:, -1], start_end[1].expand(5, -1)
    )
    pixels = common.square_pixels(clip.frames, 112, backend.mean, backend.std)
    with torch.inference_mode():
        hf = backend.model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(blocks[:, 1:-1], hf, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(common, "ENCODE_CHUNK_FRAMES", 2)
    torch.testing.assert_close(backend.encode(clip).embeds, visual.embeds, atol=1e-5, rtol=1e-5)


def test_internvl_pixels_match_its_image_processor_without_resizing():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from flexselect.backends.hf.common import square_pixels
    from flexselect.backends.hf.internvl import IMAGENET_MEAN, IMAGENET_STD

    image = frames_array(1, 112, 112)[0]
    processor = GotOcr2ImageProcessorPil(
        size={"height": 112, "width": 112},
        crop_to_patches=False,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    reference = processor(images=[image], return_tensors="pt")["pixel_values"]
    ours = square_pixels(image[None], 112, torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=0)


# -- the scoring pass ------------------------------------------------------------------------------------------------
def eager_scores(backend, visual, frames, prompt, layer):
    inputs = backend.scoring_inputs(visual, frames, prompt)
    lm = backend.text_model
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        out = lm(inputs_embeds=inputs.embeds, position_ids=inputs.position_ids, output_attentions=True)
    finally:
        lm.config._attn_implementation = previous
    rows = len(prompt.suffix_ids)
    columns = visual_columns(backend, visual, frames, prompt)
    return out.attentions[layer][0, :, -rows:, columns].amax(dim=(0, 1))


@pytest.mark.parametrize("family", ["qwen2_5_vl", *FAMILIES])
@pytest.mark.parametrize("layer", [1, 3])
def test_scores_equal_eager_attention_at_the_reference_layer(family, layer, backends, tiny_backend):
    backend = tiny_backend if family == "qwen2_5_vl" else backends[family]
    visual = backend.encode(fake_clip(n_frames=12))
    prompt = backend.prompt("What color is the car?")
    frames = frame_sets(visual.num_frames, 3)[1]
    ours = backend.score(visual, frames, prompt, layer, "max")
    with torch.inference_mode():
        reference = eager_scores(backend, visual, frames, prompt, layer)
    assert ours.shape == (len(frames) * visual.tokens_per_frame,)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    assert torch.equal(top_k(ours, 5), top_k(reference, 5))


@pytest.mark.parametrize("family", ["qwen2_5_vl", *FAMILIES])
def test_scoring_pass_stops_at_the_reference_layer(family, backends, tiny_backend):
    backend = tiny_backend if family == "qwen2_5_vl" else backends[family]
    visual = backend.encode(fake_clip(n_frames=6))
    layers = backend.text_model.layers
    calls = []
    hooks = [layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(("layer", i))) for i in range(4)]
    hooks += [
        layers[i].self_attn.register_forward_hook(lambda m, a, o, i=i: calls.append(("attn", i))) for i in range(4)
    ]
    hooks.append(layers[2].mlp.register_forward_hook(lambda m, a, o: calls.append(("mlp", 2))))
    hooks.append(backend.text_model.norm.register_forward_hook(lambda m, a, o: calls.append(("norm", -1))))
    try:
        backend.score(visual, [0, 1, 2], backend.prompt("Where is it?"), layer=2, aggregate="max")
    finally:
        for h in hooks:
            h.remove()
    assert [c for c in calls if c[0] == "layer"] == [("layer", 0), ("layer", 1)]
    assert ("attn", 2) not in calls and ("mlp", 2) not in calls and ("norm", -1) not in calls
    assert not any(c[1] == 3 for c in calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_pass_longer_than_the_context_is_refused_before_it_runs(family, backends, monkeypatch):
    backend = backends[family]
    visual = backend.encode(fake_clip(n_frames=6))
    prompt = backend.prompt("Where is it?")
    length = backend.scoring_inputs(visual, [0, 1, 2], prompt).embeds.shape[1]
    monkeypatch.setattr(backend.text_model.config, "max_position_embeddings", length - 1)
    monkeypatch.setattr(backend.text_model, "forward", lambda *a, **k: pytest.fail("the pass ran"))
    with pytest.raises(FlexSelectError, match=f"scoring pass of a frame set needs {length} tokens"):
        backend.score(visual, [0, 1, 2], prompt, layer=2, aggregate="max")


# -- answer layouts and positions ------------------------------------------------------------------------------------
def test_llava_answer_pass_is_kept_tokens_then_newline_at_consecutive_positions(backends):
    backend = backends["llava_onevision"]
    visual = backend.encode(fake_clip())
    prompt = backend.prompt("What happens?")
    kept = torch.tensor([3, 4, 20, 41, 100])
    inputs = backend.answer_inputs(visual, kept, prompt)
    p, k, t = len(prompt.prefix_ids), len(kept), len(prompt.suffix_ids)
    n = p + k + 1 + t
    assert inputs.embeds.shape[1] == n and inputs.next_position == n
    assert torch.equal(inputs.position_ids, torch.arange(n)[None])
    expected = torch.cat(
        [
            backend.embed_ids(prompt.prefix_ids),
            visual.embeds[kept],
            backend.model.model.image_newline[None],
            backend.embed_ids(prompt.suffix_ids),
        ]
    )
    assert torch.equal(inputs.embeds[0], expected)


def test_internvl_answer_pass_labels_only_frames_that_keep_tokens(backends):
    backend = backends["internvl"]
    visual = backend.encode(fake_clip())
    prompt = backend.prompt("What happens?")
    tpf = visual.tokens_per_frame  # 18: <img>, 16 tokens, </img>
    kept = torch.tensor([1, 2, 3 * tpf, 3 * tpf + 17, 7 * tpf + 5])  # frames 0, 3, 7; frame 3 keeps <img>, </img>
    inputs = backend.answer_inputs(visual, kept, prompt)

    def ids(text):
        return torch.tensor(backend.tokenizer(text, add_special_tokens=False).input_ids)

    expected = torch.cat(
        [
            backend.embed_ids(prompt.prefix_ids),
            backend.embed_ids(ids("Frame1: ")),
            visual.embeds[kept[:2]],
            backend.embed_ids(ids("\nFrame2: ")),
            visual.embeds[kept[2:4]],
            backend.embed_ids(ids("\nFrame3: ")),
            visual.embeds[kept[4:]],
            backend.embed_ids(prompt.suffix_ids),
        ]
    )
    assert torch.equal(inputs.embeds[0], expected)
    assert torch.equal(inputs.position_ids, torch.arange(len(expected))[None])
    assert inputs.next_position == len(expected)
    assert backend.tokenizer.decode(prompt.suffix_ids).startswith("\nWhat happens?")


def test_internvl_scoring_labels_the_set_as_a_short_video(backends):
    backend = backends["internvl"]
    visual = backend.encode(fake_clip())
    prompt = backend.prompt("Where?")
    columns = backend.scoring_columns(visual, [1, 4, 7], prompt)
    inputs = backend.scoring_inputs(visual, [1, 4, 7], prompt)
    assert torch.equal(inputs.embeds[0, columns], visual.embeds[visual.frame_tokens([1, 4, 7])])
    label_lengths = [
        len(backend.tokenizer(t, add_special_tokens=False).input_ids) for t in ("Frame1: ", "\nFrame2: ", "\nFrame3: ")
    ]
    p = len(prompt.prefix_ids)
    assert columns[0] == p + label_lengths[0]
    assert columns[18] == p + label_lengths[0] + 18 + label_lengths[1]
    assert inputs.embeds.shape[1] == p + sum(label_lengths) + 3 * 18 + len(prompt.suffix_ids)


def test_qwen2_vl_video_positions_step_one_per_unit_as_transformers(backends):
    backend = backends["qwen2_vl"]
    for fps in (1.0, 2.0, 4.0):  # Qwen2-VL has no time scaling: the sampling rate must not matter
        visual = backend.encode(fake_clip(n_frames=8, fps=fps))
        assert visual.time_interval == 1.0
    prompt = backend.prompt("What happens?")
    p, t = len(prompt.prefix_ids), len(prompt.suffix_ids)
    rows, cols = visual.grid
    n_video = visual.num_tokens
    # transformers' own rope index over [prefix, video pads, suffix] for the same video grid
    hf = backend.model.model
    input_ids = torch.cat([prompt.prefix_ids, torch.full((n_video,), hf.config.video_token_id), prompt.suffix_ids])
    types = torch.cat([torch.zeros(p), torch.full((n_video,), 2), torch.zeros(t)]).int()
    positions, _ = hf.get_rope_index(
        input_ids[None], types[None], video_grid_thw=torch.tensor([[visual.num_frames, rows * 2, cols * 2]])
    )
    everything = torch.arange(n_video)
    ours = backend.answer_inputs(visual, everything, prompt).position_ids
    assert torch.equal(ours[:, 0, : p + n_video], positions[:, 0, : p + n_video])
    assert ours[0, 0, p : p + n_video].unique().tolist() == [p + u for u in range(visual.num_frames)]


# -- the pipeline end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_answers_with_selection(family, backends):
    from flexselect import video
    from flexselect.pipeline import FlexSelect, SelectOptions

    backend = backends[family]
    fps = 2.0
    frames = frames_array(16)
    info = video.VideoInfo(path="hand-made", num_frames=16, fps=fps, duration=16 / fps, width=84, height=56)
    clip = video.Clip(frames=frames, timestamps=np.arange(16) / fps, source="hand-made", info=info)
    pipe = FlexSelect(backend)
    answer = pipe.answer(
        clip,
        "What happens in the video?",
        generation=GenerationConfig(max_new_tokens=3),
        options=SelectOptions(budget=2 * 18 if family == "internvl" else 32, set_frames=4, layer=2),
    )
    visual, selection = answer.visual, answer.selection
    tpf = visual.tokens_per_frame
    assert len(selection.sets) > 1 and selection.layer == 2
    assert len(selection.kept) == selection.budget < visual.num_tokens
    assert torch.equal(selection.kept, torch.sort(selection.kept).values)  # time order
    assert len(torch.unique(selection.kept)) == len(selection.kept)
    assert answer.stats["kept_tokens"] == len(selection.kept) and answer.stats["tokens_per_frame"] == tpf
    assert len(answer.generation.token_ids) <= 3
    # each set's share is its top scores
    for frames_in_set in selection.sets:
        tokens = visual.frame_tokens(frames_in_set)
        kept_here = tokens[torch.isin(tokens, selection.kept)]
        share = len(kept_here)
        if share < len(tokens):
            assert torch.equal(kept_here, tokens[top_k(selection.scores[tokens], share)])
    # the answer pass puts the kept tokens in that order at the family's positions
    prompt = backend.prompt("What happens in the video?")
    inputs = backend.answer_inputs(visual, selection.kept, prompt)
    assert answer.generation.prompt_tokens == inputs.embeds.shape[1]
    if family == "qwen2_vl":
        from flexselect.mrope import video_positions

        full = video_positions(visual.num_frames, visual.grid, visual.time_interval)
        p = len(prompt.prefix_ids)
        assert torch.equal(inputs.position_ids[:, 0, p : p + len(selection.kept)], full[:, selection.kept] + p)
    else:
        assert torch.equal(inputs.position_ids, torch.arange(inputs.embeds.shape[1])[None])
