"""The embedded default: a tiny Qwen2.5-VL arranged to find red, and a generated video with a red square, built on
first use.

It runs the real pipeline end to end on any machine with no download. The model is random except for its
reference layer, whose weights are set (as in the planted-needle test) so that the question attends to visual
tokens that look like the red square: the selection then visibly finds the moment the question is about. The
answer itself is still the output of random weights. `--model /path/to/Qwen2.5-VL-7B-Instruct` is the real use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_QUESTION = "When does the red square appear?"
DEMO_NOTICE = (
    "DEMO: a tiny model whose only trained-like part is a red-square finder, on a generated video. "
    'Real use: flexselect answer VIDEO "QUESTION" --model /path/to/Qwen2.5-VL-7B-Instruct'
)
VIDEO_FPS, VIDEO_FRAMES = 8.0, 240  # 30 s
NEEDLE_FRAMES = range(152, 168)  # the red square: 19.0-21.0 s
VIDEO_SIZE = (224, 168)  # width, height
# The CLI's demo settings: 60 temporal units in 4 frame sets, 48 of 2880 tokens kept (1.7%; budgets round up to
# whole units of 48 tokens), about what the red square covers; the reference layer is the tiny model's last (of 4),
# the one arranged below.
DEMO_FRAMES, DEMO_BUDGET, DEMO_SET_FRAMES, DEMO_LAYER = 120, 48, 16, 3
LOGIT_GAP = 12.0  # how much more a red token's key scores than the video's average token: a decisive softmax


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXSELECT_CACHE", Path.home() / ".cache" / "flexselect"))


def demo_root() -> Path:
    # Versioned: assets cached by an older demo (other tokenizer, video or arrangement) must not be reused.
    return cache_dir() / "demo-v3"


def demo_model() -> Path:
    """The plain tiny random checkpoint (benchmarks borrow its tokenizer)."""
    from .tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(demo_root() / "tiny-qwen2_5_vl")


def needle_seconds() -> tuple[float, float]:
    return NEEDLE_FRAMES.start / VIDEO_FPS, NEEDLE_FRAMES.stop / VIDEO_FPS


def demo_assets() -> tuple[Path, Path]:
    """(model folder, video file) of the demo, created once in the cache folder."""
    from .video import write_test_video

    root = demo_root()
    model = red_finder(root / "red-finder")
    video = root / "red-square.mp4"
    if not video.is_file():
        partial = root / "red-square.partial.mp4"
        write_test_video(
            partial,
            num_frames=VIDEO_FRAMES,
            fps=VIDEO_FPS,
            width=VIDEO_SIZE[0],
            height=VIDEO_SIZE[1],
            needle_frames=NEEDLE_FRAMES,
        )
        partial.rename(video)
    return model, video


def red_finder(out: Path) -> Path:
    """The tiny checkpoint with its reference layer arranged to attend to red-square tokens (built once)."""
    import torch

    from .backends.hf.qwen2_5_vl import Qwen25VLBackend
    from .tiny import plant_attention

    if (out / "config.json").is_file():
        return out
    base = demo_model()
    backend = Qwen25VLBackend.load(base, device="cpu", dtype="float32")
    lm = backend.text_model
    layer = DEMO_LAYER
    red, plain = _calibration_tokens(backend)
    normed = lm.layers[layer].input_layernorm
    with torch.no_grad():
        normed.weight.fill_(1.0)
        direction = normed(red).mean(0) - normed(plain).mean(0)  # what red-square tokens have and others lack
        direction /= direction.norm()
        gap = float((normed(red) @ direction).mean() - (normed(plain) @ direction).mean())
    # every question token asks the same ("red?"): a query bias only, no query weights
    scale = (LOGIT_GAP * lm.layers[layer].self_attn.head_dim ** 0.5 / gap) ** 0.5
    plant_attention(lm, layer, key=scale * direction, query_bias=scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".partial-"))
    try:
        backend.model.save_pretrained(staging)
        for f in base.iterdir():  # tokenizer and preprocessor files
            if not (staging / f.name).exists() and f.is_file():
                shutil.copy2(f, staging / f.name)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _calibration_tokens(backend):
    """Visual tokens of a calibration unit (another seed than the demo video) with and without the red square:
    those the square changed, and the rest."""
    import torch

    from .video import load_clip, write_test_video

    with tempfile.TemporaryDirectory() as tmp:
        embeds = []
        for name, needle in (("plain.mp4", ()), ("red.mp4", (0, 1))):
            path = write_test_video(
                Path(tmp) / name,
                num_frames=2,
                fps=VIDEO_FPS,
                width=VIDEO_SIZE[0],
                height=VIDEO_SIZE[1],
                seed=1,
                needle_frames=needle,
            )
            embeds.append(backend.encode(load_clip(path, num_frames=2)).embeds.float())
    plain, red = embeds
    changed = (red - plain).norm(dim=1)
    square = changed > changed.median()
    return red[square], torch.cat([plain, red[~square]])


def write_heatmap(result) -> Path:
    """The demo's kept tokens as a contact sheet beside its video (replaced atomically)."""
    from PIL import Image

    from .show import selection_sheet
    from .video import load_clip

    clip = load_clip(result.visual.source, num_frames=result.stats["frames"])
    sheet = selection_sheet(clip.frames, result.visual, result.selection, max_frames=20, timestamps=clip.timestamps)
    out = demo_root() / "heatmap.png"
    partial = out.with_name("heatmap.partial.png")
    Image.fromarray(sheet).save(partial)
    partial.replace(out)
    return out


def report(result, evidence: str, heatmap: Path) -> str:
    """What the demo shows, in plain words."""
    s = result.stats
    start, end = needle_seconds()
    found = result.evidence and result.evidence[0].start_s < end and result.evidence[0].end_s > start
    verdict = f"the red square is on screen at {start:.1f}-{end:.1f} s: " + (
        "FlexSelect found it." if found else "FlexSelect missed it."
    )
    # Random weights decode to arbitrary bytes; drop the undecodable ones rather than print U+FFFD.
    text = result.text.replace("\ufffd", "").strip() or "(nothing printable)"
    return "\n".join(
        [
            f"video: {Path(result.visual.source).name}, {s['frames']} frames sampled -> {s['frame_units']} units x "
            f"{s['tokens_per_frame']} tokens = {s['visual_tokens']} visual tokens in {s['frame_sets']} frame sets",
            f"selection: {evidence}",
            verdict,
            f"heatmap of the kept tokens: {heatmap}",
            f"answer (random weights, so not meaningful): {text}",
        ]
    )
