"""`flexselect layer-scan`: measure which layer's question-to-video attention finds the relevant tokens best.

For each example (a video, a question, and the tokens that matter: a time range, a frame range or an explicit token
set R), one forward pass over [prompt prefix + all the example's visual tokens + question] captures every layer's
query and key states through the same attention capture as the stopped scoring pass, and the reference-layer score
formula (question rows, max over heads and rows) scores every visual token at every layer. Recall@K of layer l is
the paper's |TopK(l) ∩ R| / |R|. K defaults to |R| per example, which makes recall equal precision and puts examples
with different |R| on one scale (the paper's needle analysis fixed K = 200 against one needle frame of ~200 tokens,
i.e. about |R|); `--top-k` fixes K instead. The best layer is the one with the highest mean recall over the examples.

An example's frames are scored as one frame set, as the pipeline does for videos of up to 64 frame units.
`make_scan_examples` writes synthetic examples: a coloured square shown in a few known frames of a textured
background, and a question about it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends.base import Prompt, VisualTokens, attention_layers
from .backends.hf.shared import HFBackend
from .defaults import AGGREGATE, SET_FRAMES, family_defaults, reference_layer_for
from .errors import FlexSelectError
from .selection import Aggregate, top_k
from .video import write_video

log = logging.getLogger("flexselect")

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 60),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 40, 200),
    "cyan": (40, 210, 220),
}


@dataclass
class ScanExample:
    """A video and question with the relevant part given by exactly one of the three `relevant_*` fields."""

    video: Any  # a video path, or an in-memory clip (frames, timestamps, source, sample_fps)
    question: str
    relevant_seconds: tuple[float, float] | None = None  # sampled frames with a timestamp in [start, end]
    relevant_frames: tuple[int, int] | None = None  # sampled frame indices, inclusive
    relevant_tokens: list[int] | None = None  # global visual token indices
    frames: int | None = None  # frames to sample uniformly (default: the family's fps)
    answer: str | None = None  # informative only


@dataclass
class ScanResult:
    family: str
    num_layers: int
    recall: list[float]  # mean over examples, per layer
    per_example: list[list[float]]
    layers: list[int]  # the scanned layers (`recall` is per entry): all but a hybrid model's linear-attention ones
    best_layer: int
    default_layer: int  # the paper's reference layer for the family (scaled to this depth)
    top_k: int | None  # None: K = |R| per example
    aggregate: str
    examples: list[dict] = field(default_factory=list)  # per example: question, |R|, K, visual tokens


@torch.inference_mode()
def layer_scores(
    backend: HFBackend, visual: VisualTokens, frames: list[int], prompt: Prompt, aggregate: Aggregate = "max"
) -> torch.Tensor:
    """Scores [layers, tokens of `frames`] of every layer that can be a reference layer (`attention_layers`: all
    but a hybrid model's linear-attention ones), from ONE forward pass (the last one's attention is never run): the
    same capture as the stopped scoring pass, asked for every such layer."""
    if not isinstance(backend, HFBackend):
        raise FlexSelectError("layer-scan needs a transformers checkpoint (--model), not the llama.cpp backend")
    inputs = backend.scoring_inputs(visual, frames, prompt)
    layers = attention_layers(backend)
    scores = backend.layer_scores(inputs, layers, len(prompt.suffix_ids), aggregate)
    return torch.stack([scores[layer].float().cpu() for layer in layers])


def recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """|TopK(l) ∩ R| / |R| for each row l of `scores` [layers, tokens]; K = |R| when not given."""
    if len(relevant) == 0:
        raise FlexSelectError("an example has no relevant tokens: its relevant range covers no sampled frame")
    k = len(relevant) if k is None else min(k, scores.shape[1])
    return torch.tensor(
        [float(np.isin(top_k(row, k).numpy(), relevant.numpy()).sum()) / len(relevant) for row in scores]
    )


def relevant_token_set(example: ScanExample, visual: VisualTokens, timestamps: Sequence[float]) -> torch.Tensor:
    """Global token indices of R. Sampled frame i belongs to unit i * units // frames (Qwen2.5-VL: pairs)."""
    given = [example.relevant_seconds, example.relevant_frames, example.relevant_tokens]
    if sum(g is not None for g in given) != 1:
        raise FlexSelectError(
            "each layer-scan example needs exactly one of relevant_seconds, relevant_frames, relevant_tokens"
        )
    if example.relevant_tokens is not None:
        tokens = torch.tensor(sorted(set(example.relevant_tokens)), dtype=torch.long)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= visual.num_tokens):
            raise FlexSelectError(f"relevant_tokens must lie in 0..{visual.num_tokens - 1}")
        return tokens
    n = len(timestamps)
    if example.relevant_seconds is not None:
        t0, t1 = example.relevant_seconds
        picked = [i for i, t in enumerate(timestamps) if t0 <= t <= t1]
    else:
        a, b = example.relevant_frames
        picked = [i for i in range(max(a, 0), min(b, n - 1) + 1)]
    units = sorted({i * visual.num_frames // n for i in picked})
    return visual.frame_tokens(units) if units else torch.zeros(0, dtype=torch.long)


def scan(
    backend: HFBackend,
    examples: Sequence[ScanExample],
    top_k_tokens: int | None = None,
    aggregate: Aggregate | None = None,
) -> ScanResult:
    """Recall@K per layer, averaged over the examples."""
    if not examples:
        raise FlexSelectError("layer-scan needs at least one example")
    aggregate = aggregate or AGGREGATE
    d = family_defaults(backend.family)
    per_example, info = [], []
    for i, ex in enumerate(examples):
        clip = _clip_of(ex, d)
        visual = backend.encode(clip)
        if visual.num_frames > SET_FRAMES:
            log.warning(
                "layer-scan example %d has %d frame units, more than one frame set (%d) in the pipeline",
                i,
                visual.num_frames,
                SET_FRAMES,
            )
        relevant = relevant_token_set(ex, visual, list(clip.timestamps))
        scores = layer_scores(backend, visual, list(range(visual.num_frames)), backend.prompt(ex.question), aggregate)
        per_example.append(recall_at_k(scores, relevant, top_k_tokens).tolist())
        info.append(
            {
                "question": ex.question,
                "relevant_tokens": len(relevant),
                "visual_tokens": visual.num_tokens,
                "k": len(relevant) if top_k_tokens is None else min(top_k_tokens, visual.num_tokens),
            }
        )
    recall = np.mean(np.asarray(per_example), axis=0)
    layers = attention_layers(backend)
    return ScanResult(
        family=backend.family,
        num_layers=backend.num_layers,
        recall=recall.tolist(),
        per_example=per_example,
        layers=layers,
        best_layer=layers[int(np.argmax(recall))],
        default_layer=reference_layer_for(backend.family, backend.num_layers, tuple(layers)),
        top_k=top_k_tokens,
        aggregate=aggregate,
        examples=info,
    )


def _clip_of(example: ScanExample, d):
    if not isinstance(example.video, (str, os.PathLike)):
        return example.video
    from .video import load_clip

    path = Path(example.video)
    if not path.is_file():
        raise FlexSelectError(f"layer-scan example video not found: {path}")
    return load_clip(
        path,
        num_frames=example.frames,
        fps=None if example.frames else d.fps,
        max_frames=d.max_frames,
        max_side=d.max_side,
    )


# -- examples ------------------------------------------------------------------------------------------------------
def load_examples(path: str | os.PathLike) -> list[ScanExample]:
    """A JSON list of examples (or {"examples": [...]}); video paths are relative to the file's folder."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlexSelectError(f"cannot read layer-scan examples {path}: {e}") from None
    raw = raw["examples"] if isinstance(raw, dict) else raw
    known = set(ScanExample.__dataclass_fields__)
    examples = []
    for i, item in enumerate(raw):
        unknown = set(item) - known
        if unknown or "video" not in item or "question" not in item:
            raise FlexSelectError(
                f"{path}: example {i} needs video and question (and one relevant_* field); unknown keys: "
                f"{sorted(unknown)}"
            )
        item = {**item, "video": str(path.parent / item["video"])}
        examples.append(ScanExample(**item))
    return examples


def make_scan_examples(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    num_frames: int = 16,
    fps: float = 4.0,
    size: tuple[int, int] = (112, 168),
    shown_frames: int = 2,
) -> Path:
    """Write `n` synthetic videos and `examples.json` (returned): a coloured square on a textured grey background
    in `shown_frames` consecutive frames at a random place and time, and the question about its colour."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    side = min(height, width) // 2
    examples = []
    for i in range(n):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        first = int(rng.integers(0, num_frames - shown_frames + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        texture = rng.integers(70, 150, size=(height // 8 + 1, width // 8 + 1, 1), dtype=np.uint8)
        frames = []
        for f in range(num_frames):
            frame = np.repeat(np.repeat(np.roll(texture, f, axis=1), 8, 0), 8, 1)[:height, :width].repeat(3, 2)
            if first <= f < first + shown_frames:
                frame[top : top + side, left : left + side] = COLOURS[colour]
            frames.append(frame)
        name = f"scan_{i:03d}.mp4"
        write_video(out / name, frames, fps, (width, height), crf=10)  # near-lossless: colours survive
        # Half a frame of slack either side, so the range does not depend on the decoder's timestamp rounding.
        examples.append(
            {
                "video": name,
                "question": "What colour is the square in the video?",
                "answer": colour,
                "frames": num_frames,
                "relevant_seconds": [(first - 0.5) / fps, (first + shown_frames - 0.5) / fps],
            }
        )
    path = out / "examples.json"
    path.write_text(json.dumps(examples, indent=1))
    return path


# -- report --------------------------------------------------------------------------------------------------------
def write_report(result: ScanResult, out_dir: str | os.PathLike, model: str = "") -> tuple[Path, Path]:
    """layer_scan.json and layer_scan.png (recall by layer) in `out_dir`."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's matplotlib backend alone
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "layer_scan.json", out / "layer_scan.png"
    json_path.write_text(json.dumps({"model": model, **asdict(result)}, indent=1))
    layers = np.asarray(result.layers)
    fig = Figure(figsize=(7, 3.6), dpi=120)
    ax = fig.subplots()
    for row in result.per_example:
        ax.plot(layers, row, color="0.8", linewidth=0.8)
    ax.plot(layers, result.recall, marker="o", color="C0", label="mean over examples")
    ax.axvline(result.best_layer, color="C3", linestyle="-", label=f"best: layer {result.best_layer}")
    ax.axvline(result.default_layer, color="C2", linestyle="--", label=f"default: layer {result.default_layer}")
    k = "|R|" if result.top_k is None else str(result.top_k)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="layer (0-based)",
        ylabel=f"Recall@{k}",
        ylim=(0, 1.02),
        title=f"{Path(model).name or result.family}: {len(result.per_example)} examples, "
        f"{result.aggregate} over heads and question tokens",
    )
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    return json_path, png_path


# -- CLI -----------------------------------------------------------------------------------------------------------
def add_layer_scan_command(sub) -> None:
    """Register `flexselect layer-scan` on the CLI's subparsers."""
    p = sub.add_parser(
        "layer-scan",
        help="find the reference layer: Recall@K of every layer's question-to-video attention",
        description="Score every layer of a transformers checkpoint on examples with known relevant frames and "
        "report Recall@K by layer (JSON + PNG) and the best layer.",
    )
    p.add_argument("--model", required=True, help="transformers checkpoint folder")
    p.add_argument("--examples", help="examples JSON (default: generate synthetic ones into OUT/examples)")
    p.add_argument("--synthetic", type=int, default=8, help="synthetic examples to generate without --examples")
    p.add_argument("--top-k", type=int, help="K of Recall@K (default: |R|, the relevant tokens' count)")
    p.add_argument("--aggregate", choices=["max", "mean"], help="over heads and question tokens (default max)")
    p.add_argument("--out", default="layer_scan", help="output folder (default ./layer_scan)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: bf16 on GPU)")
    p.set_defaults(run=run_layer_scan)


def run_layer_scan(args: argparse.Namespace) -> int:
    from .backends import load_backend

    if args.top_k is not None and args.top_k <= 0:
        raise FlexSelectError(f"--top-k must be positive, got {args.top_k}")
    examples_file = args.examples or make_scan_examples(Path(args.out) / "examples", args.synthetic)
    backend = load_backend(args.model, device=args.device, dtype=args.dtype)
    result = scan(backend, load_examples(examples_file), args.top_k, args.aggregate)
    json_path, png_path = write_report(result, args.out, model=str(args.model))
    for layer, r in zip(result.layers, result.recall):
        print(f"layer {layer:3d}  recall {r:.3f}{'  <- best' if layer == result.best_layer else ''}")
    print(f"best layer: {result.best_layer} (default {result.default_layer}); wrote {json_path} and {png_path}")
    print(
        f"to use it: --layer {result.best_layer}   (e.g. flexselect answer VIDEO QUESTION --model {args.model} "
        f"--layer {result.best_layer})"
    )
    return 0
