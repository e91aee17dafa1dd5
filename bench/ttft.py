"""Time to first token and peak memory: full-token baseline vs FlexSelect, side by side, on random models.

Three architectures at about the same small size, so that what differs is the architecture, not the scale:
- `qwen2_5_vl`: the real shape of a Qwen2-0.5B-sized LM (24 layers, hidden 896, 14 heads, 2 KV heads of 64);
- `qwen3_vl`: Qwen3-VL-8B's architecture scaled the same way (a Qwen3-0.6B-sized LM: 28 layers, hidden 1024, 16
  heads of 128, 8 KV heads, per-head Q/K norms, interleaved M-RoPE, three DeepStack levels fed random features);
- `qwen3_5`: the hybrid Qwen3.5 stack at the depth, width and FFN of the first (3 of every 4 layers Gated DeltaNet
  linear attention, every 4th softmax attention with its output gate and a quarter rotary; 8 query / 2 KV heads of
  128; 8 key / 16 value linear heads of 64). On a machine without `flash-linear-attention` / `causal-conv1d`
  transformers runs the linear layers with its reference PyTorch code, so those times are an upper bound.
The reference layer sits at Qwen2.5-VL's measured relative depth 20/28 (Qwen3.5: the full-attention layer nearest
it). Random weights cost the same as real ones. Visual tokens are random embeddings of the real count (a 308x560
frame pair -> 11 x 20 = 220 tokens): the vision tower's cost is the same in both arms, so it is left out of the
comparison. Each measurement runs in its own process, so its peak memory is its own.

    python bench/ttft.py                          # all families at 64/128/256/512 frames -> results/ttft.{json,png}
    python bench/ttft.py --frames 64 128 --grid 4 6 --families qwen2_5_vl qwen3_5 --time-limit 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LM_SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=131072,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
)  # head_dim 64
QWEN3_VL_LM_SHAPE = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=262144,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
QWEN3_5_LM_SHAPE = dict(
    hidden_size=LM_SHAPE["hidden_size"],
    intermediate_size=LM_SHAPE["intermediate_size"],
    num_hidden_layers=LM_SHAPE["num_hidden_layers"],
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    linear_num_key_heads=8,
    linear_num_value_heads=16,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    vocab_size=LM_SHAPE["vocab_size"],
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    },
)
LM_SHAPES = {"qwen2_5_vl": LM_SHAPE, "qwen3_vl": QWEN3_VL_LM_SHAPE, "qwen3_5": QWEN3_5_LM_SHAPE}
DEEPSTACK_LEVELS = {"qwen3_vl": 3}


QWEN_SPECIAL_IDS = {"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|video_pad|>": 151656}


def bench_config(family: str = "qwen2_5_vl", ids: dict[str, int] = QWEN_SPECIAL_IDS):
    """The benchmark model's config; a small stand-in vision tower, whose cost is left out."""
    import transformers

    shape = LM_SHAPES[family]
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=shape["hidden_size"])
    tokens = dict(video_token_id=ids["<|video_pad|>"])
    if family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLConfig(
            text_config=shape, vision_config=dict(vision, fullatt_block_indexes=[0]), **tokens
        )
    vision["num_position_embeddings"] = 64
    tokens.update(vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen3_vl":
        levels = DEEPSTACK_LEVELS[family]
        vision.update(depth=levels, deepstack_visual_indexes=list(range(levels)))
        return transformers.Qwen3VLConfig(text_config=shape, vision_config=vision, **tokens)
    return transformers.Qwen3_5Config(text_config=shape, vision_config=vision, **tokens)


def build_backend(device: str, dtype: str, family: str = "qwen2_5_vl"):
    import torch
    import transformers

    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend
    from flexselect.backends.hf.qwen3_5 import Qwen35Backend
    from flexselect.backends.hf.qwen3_vl import Qwen3VLBackend
    from flexselect.backends.hf.shared import resolve_device, resolve_dtype
    from flexselect.demo import demo_model

    model_class, backend_class = {
        "qwen2_5_vl": (transformers.Qwen2_5_VLForConditionalGeneration, Qwen25VLBackend),
        "qwen3_vl": (transformers.Qwen3VLForConditionalGeneration, Qwen3VLBackend),
        "qwen3_5": (transformers.Qwen3_5ForConditionalGeneration, Qwen35Backend),
    }[family]
    # only its tokenizer: the prompt's ids fit in the big vocab
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_model())
    dev = resolve_device(device)
    config = bench_config(family, {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_IDS})
    torch.manual_seed(0)
    with torch.device(dev):
        model = model_class(config).to(resolve_dtype(dtype, dev)).eval()
    return backend_class(model, tokenizer, {})


def measure(
    family: str,
    arm: str,
    frames: int,
    grid: tuple[int, int],
    budget: int,
    layer: int | None,
    device: str,
    dtype: str,
    set_frames: int | None = None,
    repeats: int = 1,
) -> dict:
    """One measurement in this process: TTFT (and selection time) of one arm of one family at one frame count; with
    `repeats` > 1 the arm runs that many times (each with a fresh pipeline, so FlexSelect indexes anew: a first
    question each time) and the fastest counts (the first run also pays the process's one-time costs); the peak
    memory is the first run's."""
    import numpy as np
    import torch

    from flexselect.backends.base import GenerationConfig, VisualTokens, attention_layers
    from flexselect.backends.hf.qwen3_vl import DeepStackVisualTokens
    from flexselect.defaults import reference_layer_for
    from flexselect.pipeline import FlexSelect, SelectOptions, peak_memory_mb

    start_rss_mb = peak_memory_mb()["process_rss"]  # the process's own: the weights and the run come on top
    backend = build_backend(device, dtype, family)
    units = frames // 2
    n_tokens = units * grid[0] * grid[1]

    def features() -> torch.Tensor:
        return torch.randn(n_tokens, backend.hidden_size, device=backend.device, dtype=backend.model.dtype) * 0.02

    common = dict(
        embeds=features(),
        num_frames=units,
        grid=grid,
        timestamps=np.arange(units) * 1.0,
        time_interval=2.0,
        frame_size=(grid[0] * 28, grid[1] * 28),
    )
    if family == "qwen2_5_vl":
        visual = VisualTokens(**common)
    else:  # a `<t seconds>` label per unit, and Qwen3-VL's DeepStack slices
        levels = DEEPSTACK_LEVELS.get(family, 0)
        deepstack = (
            torch.stack([features() for _ in range(levels)])
            if levels
            else common["embeds"].new_zeros((0, n_tokens, backend.hidden_size))
        )
        visual = DeepStackVisualTokens(**common, deepstack=deepstack, label_seconds=np.arange(units) + 0.5)
    if layer is None:  # Qwen2.5-VL's relative depth; Qwen3.5: the full-attention layer nearest it
        layer = reference_layer_for("qwen2_5_vl", backend.num_layers, tuple(attention_layers(backend)))
    prompt = backend.prompt("What does the presenter write on the whiteboard after the break?")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    options = SelectOptions(
        budget=min(budget, n_tokens),
        layer=layer,
        set_frames=set_frames,
        selector="none" if arm == "baseline" else "reference",
    )
    runs = []
    for _ in range(repeats):
        pipe = FlexSelect(backend)
        t0 = time.perf_counter()
        selection = pipe.select(visual, prompt, options=options)
        backend.generate(visual, selection.kept, prompt, GenerationConfig(max_new_tokens=1))
        runs.append((time.perf_counter() - t0, selection.seconds))
        del pipe  # its index
        if len(runs) == 1:  # the later runs only add what the allocator kept of the earlier ones
            peak = peak_memory_mb()
    ttft, select_s = min(runs)
    return {
        "family": family,
        "arm": arm,
        "frames": frames,
        "layer": layer,
        "visual_tokens": n_tokens,
        "kept_tokens": len(selection.kept),
        "ttft_s": ttft,
        "select_s": select_s if arm == "flexselect" else 0.0,
        "ttft_runs_s": [t for t, _ in runs],
        "peak_memory_mb": peak,
        "start_rss_mb": start_rss_mb,
    }


def run_isolated(args: argparse.Namespace, arm: str, frames: int, family: str = "qwen2_5_vl") -> dict:
    cmd = [sys.executable, __file__, "--one", family, arm, "--frames", str(frames), "--grid", *map(str, args.grid)]
    cmd += ["--budget", str(args.budget), "--device", args.device, "--dtype", args.dtype]
    if args.layer is not None:
        cmd += ["--layer", str(args.layer)]
    if args.set_frames:
        cmd += ["--set-frames", str(args.set_frames)]
    cmd += ["--repeats", str(getattr(args, "repeats", 1))]
    failed = {"family": family, "arm": arm, "frames": frames}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"over the {args.time_limit:.0f}s time limit"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {**failed, "error": "out of memory" if "memory" in last.lower() else last}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family in dict.fromkeys(r["family"] for r in rows):
        for arm, style in (("baseline", "--"), ("flexselect", "-")):
            pts = [
                (r["frames"], r["ttft_s"]) for r in rows if (r["family"], r["arm"]) == (family, arm) and "ttft_s" in r
            ]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{family} {arm}")
    ax.set_xlabel("sampled frames")
    ax.set_ylabel("time to first token (s)")
    ax.set_xscale("log", base=2)
    ax.set_title("FlexSelect vs full tokens (random ~0.5B LMs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> list[str]:
    lines = [
        f"{'family':>10} {'frames':>6} {'tokens':>7} {'kept':>6} {'layer':>5} {'base TTFT':>10} {'FS TTFT':>9} "
        f"{'speed-up':>8} {'select':>8} {'select share':>12} {'base MiB':>9} {'FS MiB':>8} {'mem ratio':>9}"
    ]
    for family, frames in dict.fromkeys((r["family"], r["frames"]) for r in rows):
        base, fs = (
            next(r for r in rows if (r["family"], r["frames"], r["arm"]) == (family, frames, arm))
            for arm in ("baseline", "flexselect")
        )
        if "error" in fs or "error" in base:
            lines.append(f"{family:>10} {frames:>6} did not run: {fs.get('error') or base.get('error')}")
            continue
        mem_key = "gpu" if "gpu" in fs["peak_memory_mb"] else "process_rss"
        base_mem, fs_mem = base["peak_memory_mb"][mem_key], fs["peak_memory_mb"][mem_key]
        lines.append(
            f"{family:>10} {frames:>6} {fs['visual_tokens']:>7} {fs['kept_tokens']:>6} {fs['layer']:>5} "
            f"{base['ttft_s']:>9.2f}s {fs['ttft_s']:>8.2f}s {base['ttft_s'] / fs['ttft_s']:>7.2f}x "
            f"{fs['select_s']:>7.2f}s {fs['select_s'] / fs['ttft_s']:>11.0%} "
            f"{base_mem:>9.0f} {fs_mem:>8.0f} {base_mem / fs_mem:>8.2f}x"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=sorted(LM_SHAPES), default=list(LM_SHAPES))
    p.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--grid", type=int, nargs=2, default=[11, 20], help="merged tokens per frame pair (rows cols)")
    p.add_argument(
        "--budget",
        type=int,
        help="kept tokens (default: 32 frame pairs' worth, the paper's 7040 at 11x20, i.e. 6.25%% of 1024 frames)",
    )
    p.add_argument("--layer", type=int, help="reference layer (default: 20/28 relative depth of each family)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--time-limit", type=float, default=900, help="seconds per measurement before giving up")
    p.add_argument("--set-frames", type=int, help="units per frame set (default: the pipeline's)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each arm in its process; the fastest counts")
    p.add_argument("--one", nargs=2, metavar=("FAMILY", "ARM"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "ttft", help="results stem: writes STEM.json and STEM.png")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.budget = args.budget or 32 * args.grid[0] * args.grid[1]
    if args.one:
        family, arm = args.one
        row = measure(
            family,
            arm,
            args.frames[0],
            tuple(args.grid),
            args.budget,
            args.layer,
            args.device,
            args.dtype,
            args.set_frames,
            args.repeats,
        )
        print(json.dumps(row))
        return

    rows = []
    for frames in args.frames:
        for family in args.families:
            for arm in ("baseline", "flexselect"):
                rows.append(run_isolated(args, arm, frames, family))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("\n".join(table(rows)))
    meta = {
        "lm_shapes": {family: LM_SHAPES[family] for family in args.families},
        "grid": args.grid,
        "budget": args.budget,
        "device": args.device,
        "dtype": args.dtype,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
