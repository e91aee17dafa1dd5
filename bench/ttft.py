"""Time to first token and peak memory: full-token baseline vs FlexSelect, side by side, on a random model.

The language model has the real shape of Qwen2.5-VL-3B's little sibling (a Qwen2-0.5B-sized LM: 24 layers, hidden
896, 14 heads, 2 KV heads); random weights cost the same as real ones. Visual tokens are random embeddings of the
real count (a 308x560 frame pair -> 11 x 20 = 220 tokens): the vision tower's cost is the same in both arms, so it is
left out of the comparison. Each measurement runs in its own process, so its peak memory is its own.

    python bench/ttft.py                          # 64/128/256/512 frames, writes bench/results/ttft.{json,png}
    python bench/ttft.py --frames 64 128 --grid 6 9 --time-limit 300
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


def bench_config(video_token_id: int = 151656):
    """The benchmark model's config (a 1-block stand-in vision tower: its cost is left out); 151656 = <|video_pad|>."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=LM_SHAPE,
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=896, fullatt_block_indexes=[0]
        ),
        video_token_id=video_token_id,
    )


def build_backend(device: str, dtype: str):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend
    from flexselect.backends.hf.shared import resolve_device, resolve_dtype
    from flexselect.demo import demo_model

    # only its tokenizer: the prompt's ids fit in the big vocab
    tokenizer = AutoTokenizer.from_pretrained(demo_model())
    dev = resolve_device(device)
    config = bench_config(tokenizer.convert_tokens_to_ids("<|video_pad|>"))
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2_5_VLForConditionalGeneration(config).to(resolve_dtype(dtype, dev)).eval()
    return Qwen25VLBackend(model, tokenizer, {})


def measure(
    arm: str,
    frames: int,
    grid: tuple[int, int],
    budget: int,
    layer: int,
    device: str,
    dtype: str,
    set_frames: int | None = None,
) -> dict:
    """One measurement in this process: TTFT (and selection time) of one arm at one frame count."""
    import numpy as np
    import torch

    from flexselect.backends.base import GenerationConfig, VisualTokens
    from flexselect.pipeline import FlexSelect, SelectOptions, peak_memory_mb

    start_rss_mb = peak_memory_mb()["process_rss"]  # the process's own: the weights and the run come on top
    backend = build_backend(device, dtype)
    units = frames // 2
    n_tokens = units * grid[0] * grid[1]
    visual = VisualTokens(
        embeds=torch.randn(n_tokens, backend.hidden_size, device=backend.device, dtype=backend.model.dtype) * 0.02,
        num_frames=units,
        grid=grid,
        timestamps=np.arange(units) * 1.0,
        time_interval=2.0,
        frame_size=(grid[0] * 28, grid[1] * 28),
    )
    pipe = FlexSelect(backend)
    prompt = backend.prompt("What does the presenter write on the whiteboard after the break?")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    options = SelectOptions(
        budget=min(budget, n_tokens),
        layer=layer,
        set_frames=set_frames,
        selector="none" if arm == "baseline" else "reference",
    )
    selection = pipe.select(visual, prompt, options=options)
    backend.generate(visual, selection.kept, prompt, GenerationConfig(max_new_tokens=1))
    ttft = time.perf_counter() - t0
    return {
        "arm": arm,
        "frames": frames,
        "visual_tokens": n_tokens,
        "kept_tokens": len(selection.kept),
        "ttft_s": ttft,
        "select_s": selection.seconds if arm == "flexselect" else 0.0,
        "peak_memory_mb": peak_memory_mb(),
        "start_rss_mb": start_rss_mb,
    }


def run_isolated(args: argparse.Namespace, arm: str, frames: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        arm,
        "--frames",
        str(frames),
        "--grid",
        *map(str, args.grid),
        "--budget",
        str(args.budget),
        "--layer",
        str(args.layer),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    if getattr(args, "set_frames", None):
        cmd += ["--set-frames", str(args.set_frames)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        return {"arm": arm, "frames": frames, "error": f"over the {args.time_limit:.0f}s time limit"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"arm": arm, "frames": frames, "error": "out of memory" if "memory" in last.lower() else last}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ("baseline", "flexselect"):
        pts = [(r["frames"], r["ttft_s"]) for r in rows if r["arm"] == arm and "ttft_s" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=arm)
    ax.set_xlabel("sampled frames")
    ax.set_ylabel("time to first token (s)")
    ax.set_xscale("log", base=2)
    ax.set_title("FlexSelect vs full tokens (random 0.5B-LM Qwen2.5-VL)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--grid", type=int, nargs=2, default=[11, 20], help="merged tokens per frame pair (rows cols)")
    p.add_argument(
        "--budget",
        type=int,
        help="kept tokens (default: 32 frame pairs' worth, the paper's 7040 at 11x20, i.e. 6.25%% of 1024 frames)",
    )
    p.add_argument("--layer", type=int, default=17, help="reference layer (20/28 relative depth of 24 layers)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--time-limit", type=float, default=900, help="seconds per measurement before giving up")
    p.add_argument("--set-frames", type=int, help="units per frame set (default: the pipeline's)")
    p.add_argument("--one", choices=["baseline", "flexselect"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.budget = args.budget or 32 * args.grid[0] * args.grid[1]
    if args.one:
        print(
            json.dumps(
                measure(
                    args.one,
                    args.frames[0],
                    tuple(args.grid),
                    args.budget,
                    args.layer,
                    args.device,
                    args.dtype,
                    args.set_frames,
                )
            )
        )
        return

    rows = []
    for frames in args.frames:
        for arm in ("baseline", "flexselect"):
            rows.append(run_isolated(args, arm, frames))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"{'frames':>6} {'tokens':>7} {'kept':>6} {'base TTFT':>10} {'FS TTFT':>9} {'speed-up':>8} "
        f"{'select share':>12} {'base MiB':>9} {'FS MiB':>8} {'mem ratio':>9}"
    )
    for frames in args.frames:
        base = next(r for r in rows if r["arm"] == "baseline" and r["frames"] == frames)
        fs = next(r for r in rows if r["arm"] == "flexselect" and r["frames"] == frames)
        if "error" in fs:
            print(f"{frames:>6} FlexSelect did not run: {fs['error']}")
            continue
        mem_key = "gpu" if "gpu" in fs["peak_memory_mb"] else "process_rss"
        fs_mem = fs["peak_memory_mb"][mem_key]
        if "error" in base:
            base_txt = f"{'-':>10} {'-':>8}"
            mem_txt = f"{'-':>9} {fs_mem:>8.0f} {'-':>9}  (baseline: {base['error']})"
        else:
            base_mem = base["peak_memory_mb"][mem_key]
            base_txt = f"{base['ttft_s']:>9.2f}s {base['ttft_s'] / fs['ttft_s']:>7.2f}x"
            mem_txt = f"{base_mem:>9.0f} {fs_mem:>8.0f} {base_mem / fs_mem:>8.2f}x"
        print(
            f"{frames:>6} {fs['visual_tokens']:>7} {fs['kept_tokens']:>6} {base_txt.split()[0]:>10} "
            f"{fs['ttft_s']:>8.2f}s {base_txt.split()[-1]:>8} {fs['select_s'] / fs['ttft_s']:>11.0%} {mem_txt}"
        )
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "lm_shape": LM_SHAPE,
        "grid": args.grid,
        "budget": args.budget,
        "layer": args.layer,
        "device": args.device,
        "dtype": args.dtype,
        "cpu_count": os.cpu_count(),
    }
    (RESULTS / "ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, RESULTS / "ttft.png")
    print(f"wrote {RESULTS / 'ttft.json'} and {RESULTS / 'ttft.png'}")


if __name__ == "__main__":
    main()
