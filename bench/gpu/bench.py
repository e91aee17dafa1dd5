"""Time to first token and peak GPU memory at the real shapes: full tokens vs FlexSelect vs Lite, on a lent GPU.

The text stacks of Qwen2.5-VL-7B and Qwen3-VL-8B have their published configs' shapes, random weights in bf16
(random weights of the real shape cost the same as trained ones). The vision tower is left out, as in bench/ttft.py:
it costs every arm alike, so the visual tokens are random embeddings of the real count (a 308x560 frame pair ->
11 x 20 = 220 tokens; Qwen3-VL also gets its three DeepStack levels). Each arm is one function timing one question:
the pipeline's `select` + the backend's `generate` with max_new_tokens=1. Each family runs in its own process (its
model is built once there); arms stream one JSON line each, so a process killed at the time budget loses only the arm
in flight. Before an arm runs, its time is predicted from its last measured frame count scaled by the cost model's
FLOPs (`flexselect.plan`); an arm predicted past the per-arm limit or the time left is skipped and recorded so.

    bash bench/gpu/run.sh                    # on the GPU machine: writes $OUT/gpu_bench.{json,png}
    python bench/gpu/bench.py --dry-run --out /tmp/b   # the same code on CPU, tiny shapes, a few tens of seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

GRID = (11, 20)  # merged tokens per frame pair at 308x560
QUESTION = "What does the presenter write on the whiteboard after the break?"
FOLLOWUP = "And what colour is the marker she uses?"

# Text stacks as published (Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct config.json, text_config).
FAMILIES = {
    "qwen2_5_vl": dict(
        label="Qwen2.5-VL-7B",
        layer=20,
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
    ),
    "qwen3_vl": dict(
        label="Qwen3-VL-8B",
        layer=26,
        text=dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
    ),
}
# --dry-run: the same architectures at toy width and depth (the vocabulary stays: the prompt's ids must fit).
# Heads of the real 128 width, so the M-RoPE sections still fit.
TINY_TEXT = dict(
    hidden_size=256,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
)
TINY_LAYER = 2
TINY_RANKER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)
ARMS = ("baseline", "flexselect", "lite", "followup_indexed")
PENDING: dict[str, str] = {}  # arms whose code is not in this tree yet: recorded as skipped, with the reason


# -- the model ----------------------------------------------------------------------------------------------------
def build_backend(family: str, dry_run: bool, device: str):
    import torch
    from transformers import AutoTokenizer

    from flexselect.demo import demo_model

    tokenizer = AutoTokenizer.from_pretrained(demo_model())  # only its tokenizer: the ids fit the real vocabularies
    text = {**FAMILIES[family]["text"], **(TINY_TEXT if dry_run else {})}
    hidden = text["hidden_size"]
    video_token = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    dtype = torch.float32 if dry_run else torch.bfloat16
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        from flexselect.backends.hf.qwen3_vl import Qwen3VLBackend as Backend

        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1, 2],
        )
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend as Backend

        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            fullatt_block_indexes=[0],
        )
    config = Config(text_config=text, vision_config=vision, video_token_id=video_token)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: an 8B model in fp32 first would double the build
    try:
        with torch.device(device):
            model = Model(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return Backend(model, tokenizer, {})


def visual_tokens(backend, family: str, frames: int):
    import numpy as np
    import torch

    units = frames // 2
    n = units * GRID[0] * GRID[1]

    def features():
        return torch.randn(n, backend.hidden_size, device=backend.device, dtype=backend.model.dtype) * 0.02

    common = dict(
        embeds=features(),
        num_frames=units,
        grid=GRID,
        timestamps=np.arange(units) * 1.0,
        time_interval=2.0,
        frame_size=(GRID[0] * 28, GRID[1] * 28),
    )
    if family == "qwen3_vl":
        from flexselect.backends.hf.qwen3_vl import DeepStackVisualTokens

        return DeepStackVisualTokens(
            **common, deepstack=torch.stack([features() for _ in range(3)]), label_seconds=np.arange(units) * 1.0 + 0.25
        )
    from flexselect.backends.base import VisualTokens

    return VisualTokens(**common)


def lite_ranker(backend, dry_run: bool):
    """A FlexSelect-Lite ranker of its default (Qwen2-0.5B) shape, random weights, on the host's device and dtype.
    Its `host_embeds` layout reads the host's visual tokens: this benchmark feeds those without a vision tower, so
    the authors' layouts (which read the tower's pre-merger features) have nothing to read here."""
    from flexselect.lite.host import host_info
    from flexselect.lite.ranker import LiteRanker, decoder_config

    host = host_info(backend, "embeds")
    config = decoder_config("host_embeds", TINY_RANKER if dry_run else None, host.vocab_size)
    ranker = LiteRanker(config, host, "host_embeds", backend.hidden_size)
    return ranker.to(device=backend.device, dtype=backend.model.dtype).eval()


# -- the arms: each times one question, scoring + answer prefill ---------------------------------------------------
def _question(pipe, backend, visual, options) -> dict:
    import torch

    from flexselect.backends.base import GenerationConfig

    prompt = backend.prompt(QUESTION)
    t0 = time.perf_counter()
    selection = pipe.select(visual, prompt, options=options)
    t1 = time.perf_counter()
    backend.generate(visual, selection.kept, prompt, GenerationConfig(max_new_tokens=1))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"select_s": t1 - t0, "answer_s": t2 - t1, "ttft_s": t2 - t0, "kept_tokens": len(selection.kept)}


def arm_baseline(ctx: dict, visual, budget: int, layer: int, set_frames: int) -> dict:
    from flexselect.pipeline import SelectOptions

    return _question(ctx["pipe"], ctx["backend"], visual, SelectOptions(selector="none"))


def arm_flexselect(ctx: dict, visual, budget: int, layer: int, set_frames: int) -> dict:
    from flexselect.pipeline import SelectOptions

    options = SelectOptions(budget=budget, layer=layer, set_frames=set_frames, selector="reference")
    return _question(ctx["pipe"], ctx["backend"], visual, options)


def arm_lite(ctx: dict, visual, budget: int, layer: int, set_frames: int) -> dict:
    from flexselect.pipeline import FlexSelect, SelectOptions

    if "lite_pipe" not in ctx:  # built once per family; its weights count in this arm's peak, not the others'
        ctx["lite_pipe"] = FlexSelect(ctx["backend"], lite_ranker(ctx["backend"], ctx["dry_run"]))
    options = SelectOptions(budget=budget, set_frames=set_frames, selector="lite")
    return _question(ctx["lite_pipe"], ctx["backend"], visual, options)


def arm_followup_indexed(ctx: dict, visual, budget: int, layer: int, set_frames: int) -> dict:
    """A second question about the same video: a first, untimed question builds the video index, the timed one runs
    only its own rows through layers 0..L-1 against it."""
    from flexselect.pipeline import FlexSelect, SelectOptions

    options = SelectOptions(budget=budget, layer=layer, set_frames=set_frames, selector="reference")
    pipe = FlexSelect(ctx["backend"])  # its own index store, freed with it after this arm
    first = pipe.select(visual, ctx["backend"].prompt("What happens first?"), options=options)
    result = _question(pipe, ctx["backend"], visual, options)
    result["index_built_sets"] = first.index.get("built_sets", 0)
    return result


ARM_FUNCTIONS: dict[str, Callable] = {
    "baseline": arm_baseline,
    "flexselect": arm_flexselect,
    "lite": arm_lite,
    "followup_indexed": arm_followup_indexed,
}


# -- one family in this process ------------------------------------------------------------------------------------
def predicted_flops(shape, arm: str, frames: int, budget: int, layer: int, set_frames: int) -> float:
    """The cost model's FLOPs of an arm without the (left out) vision encode; Lite scaled like FlexSelect."""
    from flexselect import plan

    req = plan.request(shape, frames, GRID[1] * 28, GRID[0] * 28, budget, set_frames, layer, max_new_tokens=1)
    f = plan.estimate(shape, req, 2, materialised_attention=False).flops
    encode = plan.vision_flops(shape, req)
    if arm == "followup_indexed":  # the cost model counts no encode for a follow-up: the tokens are cached
        return f["followup_indexed"]
    return f["baseline" if arm == "baseline" else "flexselect"] - encode


def run_family(args: argparse.Namespace) -> None:
    import torch

    from flexselect import plan
    from flexselect.pipeline import FlexSelect

    deadline = time.monotonic() + args.time_left
    device = "cpu" if args.dry_run else "cuda"
    t0 = time.perf_counter()
    backend = build_backend(args.family, args.dry_run, device)
    shape = plan.shape_of(backend.model)
    ctx = {"backend": backend, "pipe": FlexSelect(backend), "dry_run": args.dry_run}
    layer = TINY_LAYER if args.dry_run else FAMILIES[args.family]["layer"]
    emit(
        {
            "event": "built",
            "family": args.family,
            "build_s": time.perf_counter() - t0,
            "params": shape.total_params,
            "weights_mb": shape.total_params * backend.model.dtype.itemsize / 2**20,
        }
    )
    # warm-up (kernels, cuBLAS handles, the tokenizer) on two frame pairs, untimed
    for arm in args.arms:
        if arm in ARM_FUNCTIONS:
            ARM_FUNCTIONS[arm](ctx, visual_tokens(backend, args.family, 4), GRID[0] * GRID[1], layer, 1)
    last: dict[str, tuple[int, float]] = {}  # arm -> (frames, seconds) of its last measurement
    for frames in args.frames:
        visual = visual_tokens(backend, args.family, frames)
        budget = min(args.budget, visual.num_tokens)
        for arm in args.arms:
            row = {
                "family": args.family,
                "arm": arm,
                "frames": frames,
                "visual_tokens": visual.num_tokens,
                "budget": budget,
                "layer": layer,
                "set_frames": args.set_frames,
            }
            if arm in PENDING:
                emit({**row, "skipped": "pending: " + PENDING[arm]})
                continue
            left = deadline - time.monotonic()
            if arm in last:
                f0, s0 = last[arm]
                guess = s0 * (
                    predicted_flops(shape, arm, frames, budget, layer, args.set_frames)
                    / predicted_flops(shape, arm, f0, budget, layer, args.set_frames)
                )
                row["predicted_s"] = guess
                if guess > min(args.arm_limit, left):
                    emit(
                        {**row, "skipped": f"predicted {guess:.0f}s > the {min(args.arm_limit, left):.0f}s left for it"}
                    )
                    continue
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                result = ARM_FUNCTIONS[arm](ctx, visual, budget, layer, args.set_frames)
            except torch.OutOfMemoryError:
                emit({**row, "error": "out of memory"})
                continue
            last[arm] = (frames, result["ttft_s"])
            emit({**row, **result, "peak_memory_mb": peak_mb(device)})


def peak_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # the process's peak RSS (Linux kB)


def emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


# -- the driver: a process per family inside the time budget, then the table, the JSON and the PNG ------------------
def run_all(args: argparse.Namespace) -> dict:
    start = time.monotonic()
    rows, families = [], {}
    for i, family in enumerate(args.families):
        left = args.time_budget - (time.monotonic() - start)
        share = left / (len(args.families) - i)  # what is left, shared by the families still to run
        cmd = [
            sys.executable,
            __file__,
            "--one-family",
            family,
            "--time-left",
            str(share),
            "--frames",
            *map(str, args.frames),
            "--arms",
            *args.arms,
            "--budget",
            str(args.budget),
            "--set-frames",
            str(args.set_frames),
            "--arm-limit",
            str(args.arm_limit),
        ] + (["--dry-run"] if args.dry_run else [])
        print(f"[{time.monotonic() - start:5.0f}s] {family}: {share:.0f}s", file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=share + 15)  # + the build's grace: arms stop by `share` themselves
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: " + last_line(err)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            status = f"killed at its {share:.0f}s share of the time budget"
        family_rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
        built = [r for r in family_rows if r.get("event") == "built"]
        families[family] = {"label": FAMILIES[family]["label"], "status": status, **(built[0] if built else {})}
        families[family].pop("event", None)
        measured = [r for r in family_rows if "event" not in r]
        done = {(r["arm"], r["frames"]) for r in measured}
        for frames in args.frames:  # what never got its turn is recorded too
            for arm in args.arms:
                if (arm, frames) not in done:
                    measured.append({"family": family, "arm": arm, "frames": frames, "skipped": status})
        rows += measured
        print(f"[{time.monotonic() - start:5.0f}s] {family}: {status}", file=sys.stderr, flush=True)
    add_ratios(rows)
    return {"meta": meta(args, time.monotonic() - start), "families": families, "rows": rows}


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[-1][:300]


def add_ratios(rows: list[dict]) -> None:
    """Each arm against the full-token baseline of the same family and frame count: TTFT and peak memory."""
    base = {(r["family"], r["frames"]): r for r in rows if r["arm"] == "baseline" and "ttft_s" in r}
    for r in rows:
        b = base.get((r["family"], r["frames"]))
        if b is not None and "ttft_s" in r and r["arm"] != "baseline":
            r["speedup"] = b["ttft_s"] / r["ttft_s"]
            r["memory_ratio"] = b["peak_memory_mb"] / r["peak_memory_mb"]


def meta(args: argparse.Namespace, seconds: float) -> dict:
    import torch

    info = {
        "dry_run": args.dry_run,
        "grid": GRID,
        "frames": args.frames,
        "budget": args.budget,
        "set_frames": args.set_frames,
        "arms": args.arms,
        "pending": PENDING,
        "time_budget_s": args.time_budget,
        "arm_limit_s": args.arm_limit,
        "wall_s": seconds,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "memory": "peak GPU memory allocated by torch" if not args.dry_run else "process peak RSS (not per arm)",
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(result: dict) -> None:
    print(
        f"{'model':<14} {'frames':>6} {'tokens':>7} {'arm':<17} {'select':>8} {'answer':>8} {'TTFT':>8} "
        f"{'speed-up':>8} {'peak MiB':>9} {'mem ratio':>9}"
    )
    for r in result["rows"]:
        label = result["families"][r["family"]]["label"]
        head = f"{label:<14} {r['frames']:>6} {r.get('visual_tokens', 0):>7} {r['arm']:<17}"
        if "ttft_s" not in r:
            print(f"{head} {r.get('error') or r.get('skipped')}")
            continue
        ratio = (
            f"{r['speedup']:>7.2f}x {r['peak_memory_mb']:>9.0f} {r['memory_ratio']:>8.2f}x"
            if "speedup" in r
            else f"{'':>8} {r['peak_memory_mb']:>9.0f} {'':>9}"
        )
        print(f"{head} {r['select_s']:>7.2f}s {r['answer_s']:>7.2f}s {r['ttft_s']:>7.2f}s {ratio}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(result["families"])
    fig, axes = plt.subplots(2, len(families), figsize=(5 * len(families), 7), squeeze=False)
    for col, family in enumerate(families):
        for arm in result["meta"]["arms"]:
            pts = [r for r in result["rows"] if r["family"] == family and r["arm"] == arm and "ttft_s" in r]
            if pts:
                frames = [r["frames"] for r in pts]
                axes[0][col].plot(frames, [r["ttft_s"] for r in pts], marker="o", label=arm)
                axes[1][col].plot(frames, [r["peak_memory_mb"] / 1024 for r in pts], marker="o", label=arm)
        axes[0][col].set_title(
            result["families"][family]["label"] + (" (dry run)" if result["meta"]["dry_run"] else "")
        )
        axes[0][col].set_ylabel("time to first token (s)")
        axes[1][col].set_ylabel("peak memory (GiB)")
        for ax in axes[:, col]:
            ax.set_xlabel("sampled frames")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", "bench/results/gpu")),
        help="folder for gpu_bench.json and gpu_bench.png (default: $OUT, else bench/results/gpu)",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, toy width and depth, small frame counts")
    p.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    p.add_argument("--frames", type=int, nargs="+", help="default 256 512 1024 (dry run: 8 16)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--budget", type=int, default=7040, help="kept tokens (the paper's 7040 = 32 frame pairs at 11x20)")
    p.add_argument("--set-frames", type=int, help="units per frame set (default: the pipeline's 64; dry run: 2)")
    p.add_argument("--time-budget", type=float, default=400, help="seconds for all measurements (default 400)")
    p.add_argument("--arm-limit", type=float, default=60, help="skip an arm predicted to take longer (seconds)")
    p.add_argument("--one-family", choices=sorted(FAMILIES), help=argparse.SUPPRESS)
    p.add_argument("--time-left", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.frames = args.frames or ([8, 16] if args.dry_run else [256, 512, 1024])
    args.set_frames = args.set_frames or (2 if args.dry_run else 64)
    if args.dry_run:
        args.budget = min(args.budget, 2 * GRID[0] * GRID[1])  # several sets to score at toy frame counts
    if args.one_family:
        args.family = args.one_family
        run_family(args)
        return 0
    if args.out.exists() and not args.out.is_dir():
        print(f"--out {args.out} is a file: give a folder", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_all(args)
    print_table(result)
    json_path, png_path = args.out / "gpu_bench.json", args.out / "gpu_bench.png"
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path} in {result['meta']['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
