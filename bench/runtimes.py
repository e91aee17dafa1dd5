"""The three runtimes on the same random Qwen2.5-VL and video: C++ CLI vs Python llama.cpp vs Python transformers.

Each run is one fresh process of a command line tool, all three given the same arguments and printing the same
`--json` stats: `flexselect-cli` (the C++ runtime), `flexselect answer --gguf` and `flexselect answer --model`. Each
runs with all visual tokens ("full": a budget of every token, so no set is scored) and with FlexSelect keeping
`--keep` of them. The model is bench/gguf_vs_torch.py's mid-sized random one (8 layers x 512 by default).

    cmake --build build -j && python bench/runtimes.py      # 64 frames 224x336, 25% kept, sets of 8 pairs

Printed: seconds per stage (decode, encode, select, first answer token, total, and process wall time with model
loading), each runtime's ratio to the C++ CLI, FlexSelect's speed-up in each runtime, and whether the runtimes kept
the same tokens. Written to bench/results/runtimes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("decode", "encode", "select", "ttft_answer", "total")


def run_json(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stats"]["seconds"]["process_wall"] = wall
    return out


def main() -> int:
    sys.path.insert(0, str(HERE))
    from gguf_vs_torch import add_shape_arguments, build_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(ap)
    ap.add_argument("--cli", default=str(HERE.parent / "build" / "bin" / "flexselect-cli"))
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest counts")
    ap.add_argument("--out", default=str(HERE / "results" / "runtimes.json"))
    args = ap.parse_args()
    if not Path(args.cli).is_file():
        sys.exit(f"{args.cli} not found: build the C++ runtime first (cmake -S . -B build && cmake --build build)")

    from flexselect.video import write_test_video

    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    model_dir, gguf, mmproj = build_model(root, args.layers, args.hidden, args.heads, args.outtype)
    video = write_test_video(
        root / f"runtimes-{args.frames}.mp4",
        num_frames=args.frames,
        fps=2.0,
        width=336,
        height=224,
        needle_frames=(args.frames // 3,),
    )
    tokens = args.frames // 2 * 96  # 224x336 -> 8x12 merged tokens per frame pair
    budgets = {"full": tokens, "flexselect": int(tokens * args.keep)}
    n_ctx = str(tokens + 512)
    question = "What is the red square next to?"
    common = ["--frames", str(args.frames), "--set-frames", str(args.set_frames), "--max-new-tokens", "8", "--json"]
    flex = [sys.executable, "-m", "flexselect.cli", "answer", str(video), question]
    commands = {
        "C++ CLI": [
            args.cli,
            "-m",
            str(gguf),
            "--mmproj",
            str(mmproj),
            "--video",
            str(video),
            "-p",
            question,
            "-c",
            n_ctx,
            "-ngl",
            "0",
            "-t",
            str(os.cpu_count()),
        ],  # Python's llama.cpp threads
        "Python llama.cpp": flex + ["--gguf", str(gguf), "--mmproj", str(mmproj), "--n-ctx", n_ctx, "-ngl", "0"],
        "Python transformers": flex + ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32"],
    }
    results: dict[str, dict[str, dict]] = {}
    for runtime, cmd in commands.items():
        for mode, budget in budgets.items():
            runs = [run_json(cmd + common + ["--budget", str(budget)]) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["stats"]["seconds"]["total"])
            results.setdefault(runtime, {})[mode] = best
            print(f"{runtime:20s} {mode:10s} total {best['stats']['seconds']['total']:.2f} s", file=sys.stderr)

    runtimes = list(commands)
    print(
        f"random Qwen2.5-VL, LM {args.layers} layers x {args.hidden} (GGUF {args.outtype}; transformers float32), "
        f"CPU, {os.cpu_count()} threads; {args.frames} frames 224x336 -> {tokens} visual tokens; FlexSelect keeps "
        f"{budgets['flexselect']} from sets of {args.set_frames} pairs"
    )
    for mode in budgets:
        print(f"\n{mode}: seconds per stage (best of {args.repeats}) and ratio to the C++ CLI")
        print(f"{'stage':16s}" + "".join(f"{r:>22s}" for r in runtimes))
        for stage in STAGES + ("process_wall",):
            cells = []
            base = results[runtimes[0]][mode]["stats"]["seconds"][stage]
            for r in runtimes:
                s = results[r][mode]["stats"]["seconds"][stage]
                cells.append(f"{s:9.3f}" + (f" ({s / base:5.2f}x)" if r != runtimes[0] and base > 0 else " " * 9))
            print(f"{stage:16s}" + "".join(f"{c:>22s}" for c in cells))
    print("\nFlexSelect vs full, per runtime: answer-pass first token / total (with selection)")
    for r in runtimes:
        full, sel = (results[r][m]["stats"]["seconds"] for m in ("full", "flexselect"))
        print(f"  {r:20s} {full['ttft_answer'] / sel['ttft_answer']:5.2f}x / {full['total'] / sel['total']:5.2f}x")
    kept = {r: set(results[r]["flexselect"]["kept_token_indices"]) for r in runtimes}
    answers = {r: results[r]["flexselect"]["answer_token_ids"] for r in runtimes}
    for r in runtimes[1:]:
        overlap = len(kept[r] & kept[runtimes[0]]) / max(1, len(kept[runtimes[0]]))
        print(
            f"kept-token overlap {r} vs C++: {overlap:.3f}; same greedy answer tokens: "
            f"{answers[r] == answers[runtimes[0]]}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "config": vars(args) | {"visual_tokens": tokens, "budgets": budgets},
        "seconds": {r: {m: results[r][m]["stats"]["seconds"] for m in budgets} for r in runtimes},
        "kept_overlap_vs_cpp": {
            r: len(kept[r] & kept[runtimes[0]]) / max(1, len(kept[runtimes[0]])) for r in runtimes[1:]
        },
    }
    out.write_text(json.dumps(table, indent=1, default=str))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
