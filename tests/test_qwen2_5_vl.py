"""The Qwen2.5-VL backend on a tiny random checkpoint: patches, encoding, positions, generation (its scoring pass is
checked with the other families in test_families.py)."""

import numpy as np
import torch

from flexselect.backends.base import GenerationConfig
from flexselect.backends.hf.qwen2_5_vl import patchify
from flexselect.mrope import layout_positions, video_positions
from helpers import random_clip


def test_patchify_matches_qwen_image_processor(tiny_backend):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = np.random.default_rng(1).integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    reference = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 84 * 4)(
        images=[image], return_tensors="pt"
    )
    # an image is a video of one repeated frame for the processor
    ours, grid = patchify(tiny_backend.pixels(np.stack([image, image])), 14, 2, 2)
    assert list(reference["image_grid_thw"][0]) == list(grid)
    torch.testing.assert_close(ours, reference["pixel_values"].float(), atol=2e-3, rtol=0)


def test_video_positions_match_transformers_vision_block(tiny_backend):
    hf = tiny_backend.model.model
    grid_thw = torch.tensor([5, 4, 6])  # 5 units of 2x3 merged tokens
    for interval in (1.0, 2.0, 0.7, 14.3):
        expected = hf.get_vision_position_ids(7, grid_thw, 1, 2, interval)
        assert torch.equal(video_positions(5, (2, 3), interval) + 7, expected)


def test_text_after_video_resumes_after_the_largest_video_position():
    offsets = video_positions(4, (2, 3), 2.0)  # t offsets 0,2,4,6
    positions, next_position = layout_positions(5, offsets, int(offsets.max()), 3)
    assert positions[:, :5].tolist() == [list(range(5))] * 3
    assert positions[:, -3:].tolist() == [[12, 13, 14]] * 3  # 5 + 6 + 1
    assert next_position == 15


def test_encoding_in_chunks_equals_one_pass_over_the_whole_video(tiny_backend, monkeypatch):
    import flexselect.backends.hf.qwen2_5_vl as qwen

    clip = random_clip(n_frames=11)  # odd: the last frame is repeated into the last temporal patch
    whole = tiny_backend.encode(clip)
    monkeypatch.setattr(qwen, "ENCODE_CHUNK_UNITS", 1)
    chunked = tiny_backend.encode(clip)
    assert whole.num_frames == 6 and whole.grid == (2, 3) and whole.embeds.shape == (36, 64)
    torch.testing.assert_close(chunked.embeds, whole.embeds, atol=1e-5, rtol=1e-5)
    # and both equal transformers' own video feature path
    patches, (t, gh, gw) = patchify(tiny_backend.pixels(clip.frames), 14, 2, 2)
    hf = tiny_backend.model.model.get_video_features(patches, torch.tensor([[t, gh, gw]])).pooler_output[0]
    torch.testing.assert_close(whole.embeds, hf, atol=1e-5, rtol=1e-5)


def test_generation_is_deterministic_and_uses_full_video_positions(tiny_backend):
    visual = tiny_backend.encode(random_clip(n_frames=16))
    prompt = tiny_backend.prompt("What happens?")
    kept = torch.tensor([3, 4, 20, 41, 45])
    inputs = tiny_backend.answer_inputs(visual, kept, prompt)
    full = video_positions(visual.num_frames, visual.grid, visual.time_interval)
    p = len(prompt.prefix_ids)
    assert torch.equal(inputs.position_ids[:, 0, p : p + 5].cpu(), full[:, kept] + p)
    assert int(inputs.position_ids[0, 0, p + 5]) == p + int(full.max()) + 1
    config = GenerationConfig(max_new_tokens=6)
    a = tiny_backend.generate(visual, kept, prompt, config)
    b = tiny_backend.generate(visual, kept, prompt, config)
    assert a.token_ids == b.token_ids and a.prompt_tokens == p + 5 + len(prompt.suffix_ids)
    assert len(a.token_ids) <= 6
