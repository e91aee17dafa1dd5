"""Follow-up questions with the video index, side by side: what a second question about the same video costs.

Part 1 (transformers, the random 0.5B-LM Qwen2.5-VL of bench/ttft.py, random visual tokens of the real count), per
frame count, all arms in one process on the same model and tokens:
  baseline     all visual tokens, no selection: time to first token
  first        FlexSelect's first question: every set's scoring pass (which also builds the index) + answer pass
  follow-up    another question about the same video: only the question rows of each set + answer pass
  answer only  the answer pass alone on the follow-up's kept tokens: the floor once the index exists
Ratios: follow-up / answer-only (goal <= 1.3) and baseline / follow-up (goal >= 8 at 512 frames).

Part 2 (the C++ CLI, bench/gguf_vs_torch.py's random 8-layer GGUF, a generated video): two single-question runs
against one run with both questions (-p twice): the second question's selection and total in each.

    python bench/followup.py                                   # 128 256 512 frames; C++ if build/bin exists
    python bench/followup.py --frames 128 --grid 6 9 --skip-cpp
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
RESULTS = HERE / "results"
QUESTIONS = (
    "What does the presenter write on the whiteboard after the break?",
    "How many people are in the room when the lights go out?",
)


_BACKEND = []


def measure(frames: int, grid: tuple[int, int], budget: int, layer: int) -> dict:
    """All arms at one frame count, on one model built once per process (its random init costs more than a run)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from ttft import build_backend

    from flexselect.backends.base import GenerationConfig, VisualTokens
    from flexselect.pipeline import FlexSelect, SelectOptions

    if not _BACKEND:
        _BACKEND.append(build_backend("cpu", "float32"))
    backend = _BACKEND[0]
    units = frames // 2
    n_tokens = units * grid[0] * grid[1]
    torch.manual_seed(0)
    visual = VisualTokens(
        embeds=torch.randn(n_tokens, backend.hidden_size) * 0.02,
        num_frames=units,
        grid=grid,
        timestamps=np.arange(units) * 1.0,
        time_interval=2.0,
        frame_size=(grid[0] * 28, grid[1] * 28),
    )
    one = GenerationConfig(max_new_tokens=1)
    first_prompt, follow_prompt = (backend.prompt(q) for q in QUESTIONS)
    options = SelectOptions(budget=min(budget, n_tokens), layer=layer)

    def ttft(pipe, prompt, opts):
        t0 = time.perf_counter()
        selection = pipe.select(visual, prompt, opts)
        backend.generate(visual, selection.kept, prompt, one)
        return time.perf_counter() - t0, selection

    baseline, _ = ttft(FlexSelect(backend, auto_index=False), first_prompt, SelectOptions(selector="none"))
    pipe = FlexSelect(backend)
    first, sel_first = ttft(pipe, first_prompt, options)
    follow, sel_follow = ttft(pipe, follow_prompt, options)
    t0 = time.perf_counter()
    backend.generate(visual, sel_follow.kept, follow_prompt, one)
    answer_only = time.perf_counter() - t0
    index = pipe.index(visual, options=options)  # built by the first question: returned as it is
    return {
        "frames": frames,
        "visual_tokens": n_tokens,
        "kept": len(sel_follow.kept),
        "sets": len(sel_follow.sets),
        "baseline_s": baseline,
        "first_s": first,
        "follow_up_s": follow,
        "answer_only_s": answer_only,
        "index_bytes": sel_first.index["bytes"],
        "index_build_s": index.build_s,
        "follow_up_select_s": sel_follow.seconds,
        "reused_sets": sel_follow.index["reused_sets"],
    }


def cpp_part(args) -> dict | None:
    cli = HERE.parent / "build" / "bin" / "flexselect-cli"
    if args.skip_cpp or not cli.is_file():
        print(f"C++ part skipped ({'--skip-cpp' if args.skip_cpp else f'{cli} not built'})", file=sys.stderr)
        return None
    sys.path.insert(0, str(HERE))
    from gguf_vs_torch import build_model

    from flexselect.video import write_test_video

    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    _, gguf, mmproj = build_model(root, 8, 512, 8, "f16")
    video = write_test_video(
        root / f"followup-{args.cpp_frames}.mp4",
        num_frames=args.cpp_frames,
        fps=2.0,
        width=336,
        height=224,
        needle_frames=(args.cpp_frames // 3,),
    )
    tokens = args.cpp_frames // 2 * 96
    base = [
        str(cli),
        "-m",
        str(gguf),
        "--mmproj",
        str(mmproj),
        "--video",
        str(video),
        "--frames",
        str(args.cpp_frames),
        "--set-frames",
        "8",
        "--budget",
        str(tokens // 4),
        "--max-new-tokens",
        "1",
        "-c",
        str(tokens + 512),
        "-ngl",
        "0",
        "-t",
        str(os.cpu_count()),
        "--json",
    ]

    def run(*questions: str) -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        r = subprocess.run(base + [x for q in questions for x in ("-p", q)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"flexselect-cli failed: {r.stderr[-1000:]}")
        return [json.loads(x) for x in r.stdout.splitlines()], time.perf_counter() - t0

    (single_1,), wall_1 = run(QUESTIONS[0])
    (single_2,), wall_2 = run(QUESTIONS[1])
    multi, wall_multi = run(*QUESTIONS)
    s2, m2 = single_2["stats"]["seconds"], multi[1]["stats"]["seconds"]
    return {
        "frames": args.cpp_frames,
        "visual_tokens": tokens,
        "sets": multi[1]["stats"]["frame_sets"],
        "single_q2_select_s": s2["select"],
        "multi_q2_select_s": m2["select"],
        "single_q2_ttft_s": s2["select"] + s2["ttft_answer"],
        "multi_q2_ttft_s": m2["select"] + m2["ttft_answer"],
        "answer_only_s": m2["ttft_answer"],
        "index": multi[1]["stats"]["index"],
        "wall_two_single_runs_s": wall_1 + wall_2,
        "wall_one_multi_run_s": wall_multi,
        "same_results": multi[0]["kept_token_indices"] == single_1["kept_token_indices"]
        and multi[1]["kept_token_indices"] == single_2["kept_token_indices"]
        and multi[1]["answer_token_ids"] == single_2["answer_token_ids"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--grid", type=int, nargs=2, default=[4, 6], help="merged tokens per frame pair (rows cols)")
    p.add_argument("--budget", type=int, help="kept tokens (default: 32 frame pairs' worth, as bench/ttft.py)")
    p.add_argument("--layer", type=int, default=17, help="reference layer (20/28 relative depth of 24 layers)")
    p.add_argument("--skip-cpp", action="store_true")
    p.add_argument("--cpp-frames", type=int, default=64)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "flexselect" / "bench"))
    args = p.parse_args()
    args.budget = args.budget or 32 * args.grid[0] * args.grid[1]
    rows = []
    for frames in args.frames:
        rows.append(measure(frames, tuple(args.grid), args.budget, args.layer))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [
        f"transformers, random 0.5B-LM Qwen2.5-VL (24 layers x 896), float32, CPU ({os.cpu_count()} cores, "
        f"shared), grid {args.grid[0]}x{args.grid[1]}, budget {args.budget}, layer {args.layer}",
        f"{'frames':>6} {'tokens':>7} {'sets':>4} {'baseline':>9} {'first':>8} {'follow-up':>9} "
        f"{'answer':>8} {'fu/answer':>9} {'base/fu':>8} {'index':>10} {'built in':>8} {'reused':>6}",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['frames']:>6} did not run: {r['error']}")
            continue
        lines.append(
            f"{r['frames']:>6} {r['visual_tokens']:>7} {r['sets']:>4} {r['baseline_s']:>8.2f}s {r['first_s']:>7.2f}s "
            f"{r['follow_up_s']:>8.2f}s {r['answer_only_s']:>7.2f}s {r['follow_up_s'] / r['answer_only_s']:>8.2f}x "
            f"{r['baseline_s'] / r['follow_up_s']:>7.2f}x {r['index_bytes'] / 2**20:>7.0f}MiB "
            f"{r['index_build_s']:>7.2f}s {r['reused_sets']:>6}"
        )
    cpp = cpp_part(args)
    if cpp:
        lines += [
            "",
            f"C++ CLI, random 8-layer x 512 GGUF (f16), {cpp['frames']} frames -> {cpp['visual_tokens']} "
            f"tokens in {cpp['sets']} sets, 25% kept, one thread per core",
            f"second question: select {cpp['single_q2_select_s']:.2f}s alone vs {cpp['multi_q2_select_s']:.2f}s "
            f"as a follow-up; to first token {cpp['single_q2_ttft_s']:.2f}s vs {cpp['multi_q2_ttft_s']:.2f}s "
            f"(answer pass alone {cpp['answer_only_s']:.2f}s: follow-up / answer-only "
            f"{cpp['multi_q2_ttft_s'] / cpp['answer_only_s']:.2f}x)",
            f"index {cpp['index']['bytes'] / 2**20:.1f} MiB; wall: two single runs "
            f"{cpp['wall_two_single_runs_s']:.2f}s, one run with both {cpp['wall_one_multi_run_s']:.2f}s; "
            f"same kept tokens and answers: {cpp['same_results']}",
        ]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "followup.txt").write_text("\n".join(lines) + "\n")
    (RESULTS / "followup.json").write_text(json.dumps({"config": vars(args), "rows": rows, "cpp": cpp}, indent=2))
    print(f"wrote {RESULTS / 'followup.txt'} and {RESULTS / 'followup.json'}")


if __name__ == "__main__":
    main()
