"""Follow-up questions with the video index, side by side: what a second question about the same video costs.

Part 1 (transformers, the random 0.5B-LM Qwen2.5-VL of bench/ttft.py, random visual tokens of the real count), per
frame count, all arms in one process on the same model and tokens (after one untimed warm-up pass):
  baseline     all visual tokens, no selection: time to first token
  first        FlexSelect's first question: every set's scoring pass (which also builds the index) + answer pass
  follow-up    another question about the same video: only the question rows of each set + answer pass
  answer only  the answer pass alone on the follow-up's kept tokens: the floor once the index exists
follow-up and answer-only run --repeats times, interleaved, and the fastest of each counts (the machine is shared).
Ratios: follow-up / answer-only (goal <= 1.3) and baseline / follow-up (goal >= 8 at 512 frames).
Each row records the load average (`uptime`) before and after it. --merge keeps the rows of other frame counts
already in bench/results/followup.json, so each frame count can run as its own (locked) process.

Part 2 (the C++ CLI, bench/gguf_vs_torch.py's random 8-layer GGUF, a generated video): one single-question run per
question against one run with all of them (-p repeated): per question the selection and time to first token.

    python bench/followup.py                                   # 128 256 512 frames; C++ if build/bin exists
    python bench/followup.py --frames 512 --skip-cpp --merge   # one frame count, kept beside the others
    python bench/followup.py --frames --merge                  # only the C++ part
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
    "Which colour is the car that drives past the window?",
)


_BACKEND = []


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(frames: int, grid: tuple[int, int], budget: int, layer: int, repeats: int) -> dict:
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
    first_prompt, follow_prompt = (backend.prompt(q) for q in QUESTIONS[:2])
    options = SelectOptions(budget=min(budget, n_tokens), layer=layer)
    backend.generate(visual, torch.arange(min(budget, n_tokens)), first_prompt, one)  # warm-up: one-time costs
    load_before = load()

    def ttft(pipe, prompt, opts):
        t0 = time.perf_counter()
        selection = pipe.select(visual, prompt, opts)
        backend.generate(visual, selection.kept, prompt, one)
        return time.perf_counter() - t0, selection

    baseline, _ = ttft(FlexSelect(backend, auto_index=False), first_prompt, SelectOptions(selector="none"))
    pipe = FlexSelect(backend)
    first, sel_first = ttft(pipe, first_prompt, options)
    follows, answers, selects = [], [], []
    for _ in range(repeats):
        follow, sel_follow = ttft(pipe, follow_prompt, options)
        t0 = time.perf_counter()
        backend.generate(visual, sel_follow.kept, follow_prompt, one)
        answers.append(time.perf_counter() - t0)
        follows.append(follow)
        selects.append(sel_follow.seconds)
    index = pipe.index(visual, options=options)  # built by the first question: returned as it is
    scored = [index.sets[tuple(f)] for f in sel_follow.sets if tuple(f) in index.sets]
    t0 = time.perf_counter()
    for entry in scored:  # the follow-up's question rows one set at a time, as before they were batched
        backend.score_indexed(entry, visual, follow_prompt, "max")
    per_set = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.score_indexed_many(scored, visual, follow_prompt, "max")
    batched = time.perf_counter() - t0
    return {
        "frames": frames,
        "visual_tokens": n_tokens,
        "kept": len(sel_follow.kept),
        "sets": len(sel_follow.sets),
        "baseline_s": baseline,
        "first_s": first,
        "first_select_s": sel_first.seconds,
        "follow_up_s": min(follows),
        "answer_only_s": min(answers),
        "follow_up_runs_s": follows,
        "answer_only_runs_s": answers,
        "follow_up_select_s": min(selects),
        "question_rows_per_set_s": per_set,
        "question_rows_batched_s": batched,
        "index_bytes": sel_first.index["bytes"],
        "index_build_s": index.build_s,
        "reused_sets": sel_follow.index["reused_sets"],
        "load_before": load_before,
        "load_after": load(),
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

    load_before = load()
    singles = [run(q) for q in QUESTIONS]
    multi, wall_multi = run(*QUESTIONS)

    def ttft(result: dict) -> float:
        return result["stats"]["seconds"]["select"] + result["stats"]["seconds"]["ttft_answer"]

    return {
        "frames": args.cpp_frames,
        "visual_tokens": tokens,
        "sets": multi[0]["stats"]["frame_sets"],
        "questions": len(QUESTIONS),
        "single_select_s": [r["stats"]["seconds"]["select"] for (r,), _ in singles],
        "multi_select_s": [r["stats"]["seconds"]["select"] for r in multi],
        "single_ttft_s": [ttft(r) for (r,), _ in singles],
        "multi_ttft_s": [ttft(r) for r in multi],
        "answer_only_s": [r["stats"]["seconds"]["ttft_answer"] for r in multi],
        "index": multi[-1]["stats"]["index"],
        "wall_single_runs_s": [wall for _, wall in singles],
        "wall_one_multi_run_s": wall_multi,
        "same_results": all(
            m["kept_token_indices"] == s["kept_token_indices"] and m["answer_token_ids"] == s["answer_token_ids"]
            for m, ((s,), _) in zip(multi, singles)
        ),
        "load_before": load_before,
        "load_after": load(),
    }


def report(config: dict, rows: list[dict], cpp: dict | None) -> list[str]:
    lines = [
        f"transformers, random 0.5B-LM Qwen2.5-VL (24 layers x 896), float32, CPU ({os.cpu_count()} cores, "
        f"shared), grid {config['grid'][0]}x{config['grid'][1]}, budget {config['budget']}, layer {config['layer']}; "
        f"follow-up and answer-only: fastest of {config['repeats']}",
        f"{'frames':>6} {'tokens':>7} {'sets':>4} {'baseline':>9} {'first':>8} {'follow-up':>9} "
        f"{'answer':>8} {'fu/answer':>9} {'base/fu':>8} {'index':>8} {'built in':>8} {'fu select':>9}  "
        "load before/after",
    ]
    for r in rows:
        lines.append(
            f"{r['frames']:>6} {r['visual_tokens']:>7} {r['sets']:>4} {r['baseline_s']:>8.2f}s {r['first_s']:>7.2f}s "
            f"{r['follow_up_s']:>8.2f}s {r['answer_only_s']:>7.2f}s {r['follow_up_s'] / r['answer_only_s']:>8.2f}x "
            f"{r['baseline_s'] / r['follow_up_s']:>7.2f}x {r['index_bytes'] / 2**20:>5.0f}MiB "
            f"{r['index_build_s']:>7.2f}s {r['follow_up_select_s']:>8.2f}s  "
            f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}"
        )
    lines.append("follow-up question rows of all sets: one batch vs one set at a time (as before the batching)")
    lines += [
        f"{r['frames']:>6} frames: {r['question_rows_batched_s']:.2f}s batched vs {r['question_rows_per_set_s']:.2f}s "
        f"per set ({r['sets']} sets)"
        for r in rows
    ]
    if cpp:
        n = cpp["questions"]
        single, multi = sum(cpp["single_ttft_s"][1:]), sum(cpp["multi_ttft_s"][1:])
        walls, wall_multi = sum(cpp["wall_single_runs_s"]), cpp["wall_one_multi_run_s"]
        lines += [
            "",
            f"C++ CLI, random 8-layer x 512 GGUF (f16), {cpp['frames']} frames -> {cpp['visual_tokens']} "
            f"tokens in {cpp['sets']} sets, 25% kept, one thread per core; {n} questions: {n} single-question runs "
            f"vs one run with all {n} (load {cpp['load_before'][0]:.1f}/{cpp['load_after'][0]:.1f})",
            f"{'question':>8} {'select alone':>12} {'as follow-up':>12} {'TTFT alone':>10} {'TTFT multi':>10} "
            f"{'answer pass':>11} {'fu/answer':>9}",
        ]
        for q in range(n):
            lines.append(
                f"{q + 1:>8} {cpp['single_select_s'][q]:>11.2f}s {cpp['multi_select_s'][q]:>11.2f}s "
                f"{cpp['single_ttft_s'][q]:>9.2f}s {cpp['multi_ttft_s'][q]:>9.2f}s {cpp['answer_only_s'][q]:>10.2f}s "
                f"{cpp['multi_ttft_s'][q] / cpp['answer_only_s'][q]:>8.2f}x"
            )
        lines += [
            f"questions 2..{n}: {single / (n - 1):.2f}s each alone vs {multi / (n - 1):.2f}s each as follow-ups "
            f"({1 - multi / single:.0%} saved); index {cpp['index']['bytes'] / 2**20:.1f} MiB",
            f"wall: {n} single runs {walls:.2f}s, one run with all {n} {wall_multi:.2f}s ({1 - wall_multi / walls:.0%}"
            f" saved: model load, decoding and encoding once too); same kept tokens and answers: {cpp['same_results']}",
        ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="*", default=[128, 256, 512])
    p.add_argument("--grid", type=int, nargs=2, default=[4, 6], help="merged tokens per frame pair (rows cols)")
    p.add_argument("--budget", type=int, help="kept tokens (default: 32 frame pairs' worth, as bench/ttft.py)")
    p.add_argument("--layer", type=int, default=17, help="reference layer (20/28 relative depth of 24 layers)")
    p.add_argument("--repeats", type=int, default=2, help="follow-up / answer-only runs (the fastest counts)")
    p.add_argument("--merge", action="store_true", help="keep other frame counts' rows and the C++ part if not run")
    p.add_argument("--skip-cpp", action="store_true")
    p.add_argument("--cpp-frames", type=int, default=64)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "flexselect" / "bench"))
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.budget = args.budget or 32 * args.grid[0] * args.grid[1]
    config = {k: v for k, v in vars(args).items() if k not in ("frames", "merge", "skip_cpp", "cache")}
    previous = json.loads((RESULTS / "followup.json").read_text()) if args.merge else {}
    if previous and previous.get("config") != config:
        raise SystemExit("--merge: bench/results/followup.json was measured with other settings; run without --merge")
    rows = {r["frames"]: r for r in previous.get("rows", [])}
    cpp = previous.get("cpp")

    def write() -> list[str]:  # after every part: a run cut short keeps what it measured
        lines = report(config, [rows[f] for f in sorted(rows)], cpp)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "followup.txt").write_text("\n".join(lines) + "\n")
        doc = {"config": config, "rows": [rows[f] for f in sorted(rows)], "cpp": cpp}
        (RESULTS / "followup.json").write_text(json.dumps(doc, indent=2))
        return lines

    for frames in args.frames:
        rows[frames] = measure(frames, tuple(args.grid), args.budget, args.layer, args.repeats)
        print(json.dumps(rows[frames]), file=sys.stderr, flush=True)
        write()
    cpp = cpp_part(args) or cpp
    print("\n".join(write()))
    print(f"wrote {RESULTS / 'followup.txt'} and {RESULTS / 'followup.json'}")


if __name__ == "__main__":
    main()
