"""Plain helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np
import torch

from flexselect.selection import frame_sets, top_k
from flexselect.video import Clip


def random_clip(n_frames: int = 8, height: int = 56, width: int = 84, fps: float = 2.0, seed: int = 0) -> Clip:
    """Random frames sampled at `fps` from the start: a `Clip` as `load_clip` returns one, without a video file."""
    frames = np.random.default_rng(seed).integers(0, 256, size=(n_frames, height, width, 3), dtype=np.uint8)
    return Clip.from_frames(frames, fps, source="random")


def needle_tokens(
    num_frames: int, tokens_per_frame: int, keep_ratio: float, set_frames: int = 16, seed: int = 0
) -> np.ndarray:
    """The sorted token indices of a planted needle: the same number in every frame set (the budget is split in
    equal shares per set), scattered over the set's frames; `keep_ratio` of all tokens in all."""
    rng = np.random.default_rng(seed)
    sets = frame_sets(num_frames, set_frames)
    per_set = int(num_frames * tokens_per_frame * keep_ratio) // len(sets)
    tokens = np.arange(tokens_per_frame)
    in_set = [(np.array(s)[:, None] * tokens_per_frame + tokens).ravel() for s in sets]
    picks = [rng.choice(candidates, size=per_set, replace=False) for candidates in in_set]
    return np.sort(np.concatenate(picks))


def check_timestamped_answer(pipe, answer, question: str, kept: int) -> None:
    """What a Qwen3-VL / Qwen3.5 pipeline answer must show: `kept` tokens in time order, each frame set's share its
    top scores, and a prompt of the kept tokens plus all the text (every unit keeps its timestamp and delimiters)."""
    visual, selection = answer.visual, answer.selection
    assert len(selection.kept) == kept
    assert torch.equal(selection.kept, torch.sort(selection.kept).values)
    for frames_in_set in selection.sets:
        tokens = visual.frame_tokens(frames_in_set)
        kept_here = tokens[torch.isin(tokens, selection.kept)]
        assert torch.equal(kept_here, tokens[top_k(selection.scores[tokens], len(kept_here))])
    prompt = pipe.backend.prompt(question)
    labels = sum(len(pipe.backend._label_ids(s)) + 2 for s in visual.label_seconds)
    assert answer.generation.prompt_tokens == len(prompt.prefix_ids) + labels + kept + len(prompt.suffix_ids)


def save_tiny_ranker(backend, path) -> None:
    """A tiny random `host_embeds` Lite ranker for `backend`, saved as a bundle at `path` (what the ComfyUI ranker
    dropdown and loader list and load)."""
    from flexselect.lite.bundle import save_bundle
    from flexselect.lite.host import host_info
    from flexselect.lite.ranker import LiteRanker, decoder_config

    host = host_info(backend)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = decoder_config("host_embeds", {**shape, "num_key_value_heads": 2}, host.vocab_size)
    torch.manual_seed(0)
    save_bundle(LiteRanker(config, host, "host_embeds", backend.hidden_size), path)


def cpu_backends(model_dirs: dict) -> dict:
    """A float32 CPU backend per family in `model_dirs` (family -> checkpoint folder)."""
    from flexselect.backends import load_backend

    return {family: load_backend(path, device="cpu", dtype="float32") for family, path in model_dirs.items()}


def qwen3_clip(n_frames: int = 8) -> Clip:
    """Random 64 x 96 frames: 2 x 3 merged tokens per unit of the tiny Qwen3-VL / Qwen3.5 checkpoints (16-pixel
    patches, merged 2 x 2)."""
    return random_clip(n_frames, height=64, width=96)
