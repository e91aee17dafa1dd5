"""`flexselect eval`: baseline vs FlexSelect vs Lite on one benchmark, side by side, resumable.

Items are the outer loop and methods the inner one, so each video is decoded and encoded once and served from the
pipeline's cache to every method. The baseline is the paper's comparison at equal cost: uniform frames, no
selection, as many frames as give about the FlexSelect token budget (or `--baseline-frames`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import FlexSelectError
from .datasets import BENCHMARKS, load_benchmark
from .harness import PREFERRED_ORDER, format_comparison, run_eval, summarize

log = logging.getLogger("flexselect")


def add_eval_command(sub) -> None:
    from ..cli import add_model_arguments, add_sampling_arguments  # shared with `answer`; loaded by now

    p = sub.add_parser(
        "eval",
        help="evaluate baseline / FlexSelect / Lite on VideoMME, MLVU, LongVideoBench or LVBench",
        description="Answer a benchmark's multiple-choice questions with each method into a resumable JSONL file "
        "and print the accuracies side by side. The datasets are never downloaded: point DATA_ROOT at "
        "your local copy (see flexselect.eval.datasets for the layouts read).",
    )
    p.add_argument("benchmark", choices=BENCHMARKS)
    p.add_argument("data_root", help="the benchmark's local folder (annotations + videos)")
    p.add_argument("-o", "--out", required=True, help="results JSONL; an existing file is resumed")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=PREFERRED_ORDER,
        default=["baseline", "flexselect"],
        help="methods to run on every item (default: baseline flexselect; lite needs --ranker)",
    )
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument(
        "--skip-missing-videos",
        action="store_true",
        help="drop questions whose video is missing instead of stopping (the table then says n)",
    )
    p.add_argument("--summary-only", action="store_true", help="print the table of an existing results file")
    p.add_argument(
        "--common-only", action="store_true", help="score every method on only the items all of them answered"
    )
    p.add_argument("--summary-json", help="also write the scores as JSON here")
    add_model_arguments(p)
    add_sampling_arguments(p)
    g = p.add_argument_group("selection")
    g.add_argument("--budget", type=int, help="visual tokens FlexSelect keeps (default: the model's)")
    g.add_argument("--layer", type=int, help="reference layer (default: the model's)")
    g.add_argument("--set-frames", type=int, help="frame units per frame set (default 64)")
    g.add_argument(
        "--baseline-frames",
        type=int,
        help="baseline frames (default: the frames whose tokens match the FlexSelect budget)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply length (a letter is enough; default 16)")
    p.set_defaults(run=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    failed = {} if args.summary_only else _answer_all(args, out)
    try:
        summary = summarize(out, common_only=args.common_only)
    except FlexSelectError:
        if not failed:
            raise
        what, why = next(iter(failed.items()))  # every answer failed: most likely a setting, say the first cause
        raise FlexSelectError(f"no answer could be recorded; {what} failed: {why}") from None
    if args.summary_json:
        from ..lite.bundle import write_atomic

        write_atomic(Path(args.summary_json), json.dumps(summary, indent=1).encode())
    print(format_comparison(summary))
    if failed:
        print(
            f"flexselect: {len(failed)} answer(s) failed and were not recorded (a rerun retries them):", file=sys.stderr
        )
        for what, why in failed.items():
            print(f"  {what}: {why}", file=sys.stderr)
        return 1
    return 0


def _answer_all(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """Answer every item with every method; returns the answers that failed (a corrupt video, one too long for the
    context, ...) by "item (method)", so one bad file among thousands does not stop a night's run."""
    from tqdm import tqdm

    from ..backends.base import GenerationConfig
    from ..cli import load_pipeline
    from ..pipeline import Sampling, SelectOptions

    if args.model is None and args.gguf is None:
        raise FlexSelectError("no model given: pass --model PATH (or --gguf + --mmproj)")
    if "lite" in args.methods and args.ranker is None:
        raise FlexSelectError("method 'lite' needs a ranker: pass --ranker PATH (a bundle folder or .onnx)")
    if args.baseline_frames is not None and args.baseline_frames < 1:
        raise FlexSelectError(f"--baseline-frames must be >= 1, got {args.baseline_frames}")
    items = load_benchmark(args.benchmark, Path(args.data_root), args.skip_missing_videos)
    items = items if args.limit is None else items[: max(0, args.limit)]
    # Reference-layer scoring never needs the ranker, so one pipeline with it serves every method.
    sampling = Sampling(args.frames, args.fps, args.start, args.end, args.max_frames, args.max_side)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)  # both checked before the model loads
    pipe = load_pipeline(args)
    selector_of = {"flexselect": "reference", "lite": "lite"}
    failed: dict[str, str] = {}

    for item in tqdm(items, desc=f"{args.benchmark} questions", unit="q", leave=False):
        for method in args.methods:

            def reply(video: Path, prompt: str, method: str = method) -> str:
                if method == "baseline":
                    frames = args.baseline_frames or _baseline_frames(pipe, video, sampling, args.budget)
                    uniform = Sampling(frames, None, args.start, args.end, None, args.max_side)
                    return pipe.answer(video, prompt, uniform, SelectOptions(selector="none"), generation).text
                options = SelectOptions(args.budget, args.layer, args.set_frames, selector=selector_of[method])
                return pipe.answer(video, prompt, sampling, options, generation).text

            try:
                run_eval([item], reply, out, method=method)
            except FlexSelectError as e:
                failed[f"{item.item_id} ({method})"] = str(e)
                log.warning("%s (%s) failed: %s", item.item_id, method, e)
    return failed


def _baseline_frames(pipe, video: Path, sampling, budget: int | None) -> int:
    """Uniform frames whose visual tokens come closest to (not above) FlexSelect's budget on this video."""
    from ..selection import round_budget

    visual, _ = pipe.encode(video, sampling)  # cached: FlexSelect's own encoding of this video
    kept = min(round_budget(budget or pipe.defaults.budget, visual.tokens_per_frame), visual.num_tokens)
    return max(1, kept // visual.tokens_per_frame) * visual.frames_per_unit
