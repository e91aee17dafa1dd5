"""`flexselect` command line. Errors the user can fix print one line and exit 2; no torch tracebacks."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from .errors import FlexSelectError, check_positive
from .eval.cli import add_eval_command
from .evidence import describe
from .layer_scan import add_layer_scan_command
from .lite import add_lite_commands
from .outputs import check_output_file
from .plan import add_plan_command
from .serve import add_serve_command


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="transformers checkpoint folder (e.g. Qwen2.5-VL-7B-Instruct)")
    g.add_argument("--gguf", help="text GGUF for the llama.cpp backend (with --mmproj)")
    g.add_argument("--mmproj", help="the vision projector GGUF that belongs to --gguf")
    g.add_argument("--ranker", help="FlexSelect-Lite ranker: a bundle folder or a .onnx file")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: bf16 on GPU)")
    g.add_argument("--n-ctx", type=int, default=32768, help="llama.cpp context size (default 32768)")
    g.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="llama.cpp layers on the GPU (-1: all)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frames")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--frames", type=int, help="sample N frames uniformly")
    how.add_argument("--fps", type=float, help="sample at F frames per second (default: the model's, 2 for Qwen)")
    g.add_argument("--start", type=float, help="start time in seconds")
    g.add_argument("--end", type=float, help="end time in seconds")
    g.add_argument("--max-frames", type=int, help="cap on sampled frames (default: the model's, 1024 for Qwen)")
    g.add_argument("--max-side", type=int, help="resize frames so the longest side is at most this (default 560)")


def add_selection_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selection")
    g.add_argument(
        "--selector",
        choices=["reference", "lite", "none"],
        help="who scores tokens: the model's reference layer (default), a Lite ranker, or keep all",
    )
    g.add_argument("--budget", type=int, help="visual tokens to keep for the whole video (default: the model's)")
    g.add_argument("--layer", type=int, help="reference layer, 0-based (default: the model's, 20 for Qwen2.5-VL-7B)")
    g.add_argument("--set-frames", type=int, help="frame units per frame set (default 64)")
    g.add_argument("--aggregate", choices=["max", "mean"], help="over heads and question tokens (default max)")
    add_positions_argument(g)


def add_positions_argument(g) -> None:  # selection's, and serve's (which selects per request)
    g.add_argument(
        "--positions",
        choices=["original", "compact"],
        default="original",
        help="answer-pass positions of kept tokens: original (paper) or compact re-gridding",
    )


def select_options(args: argparse.Namespace):
    """The selection flags of `add_selection_arguments` as the pipeline's options."""
    from .pipeline import SelectOptions

    return SelectOptions(
        budget=args.budget,
        layer=args.layer,
        set_frames=args.set_frames,
        aggregate=args.aggregate,
        selector=args.selector,
    )


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index (follow-up questions cost about the answer pass alone)")
    g.add_argument(
        "--index",
        metavar="FILE",
        help="a video index written by `flexselect index` (refused if it was "
        "made for another model, video, sampling or layer)",
    )
    g.add_argument(
        "--index-memory",
        type=float,
        metavar="GIB",
        help="memory all video indexes may take, in GiB (default: half of the available memory)",
    )
    g.add_argument("--no-index", action="store_true", help="score every question from scratch")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)


def add_answer_command(sub) -> None:
    p = sub.add_parser(
        "answer",
        help="answer questions about a video (no arguments: the offline demo)",
        description="Answer one or more questions about a long video with FlexSelect token "
        "selection; the video is indexed once, so each further question costs about its answer pass.",
    )
    p.add_argument("video", nargs="?", help="video file (omit for the built-in demo)")
    p.add_argument("questions", nargs="*", metavar="question", help="the question(s)")
    add_question_arguments(p)
    p.set_defaults(run=run_answer)


def add_question_arguments(p: argparse.ArgumentParser) -> None:
    """What `answer` and `chat` both take besides the video and questions."""
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_selection_arguments(p)
    add_index_arguments(p)
    add_generation_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per question, one per line")


def add_chat_command(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="ask questions about a video in a loop (one per line on standard input)",
        description="Load the model and the video once, then answer each line of standard input. "
        "The first question indexes the video; follow-ups cost about the answer pass alone. Earlier "
        "questions and answers are given to the answer pass (not to the selection: see README).",
    )
    p.add_argument("video")
    add_question_arguments(p)
    p.add_argument("--no-history", action="store_true", help="answer each question on its own")
    p.set_defaults(run=run_chat)


def add_index_command(sub) -> None:
    p = sub.add_parser(
        "index",
        help="index a video once and write the index to a file (.fsx)",
        description="Run every frame set's question-independent scoring pass and write it (safetensors "
        "with a manifest of model, video, sampling and layer); then `answer`/`chat --index FILE`.",
    )
    p.add_argument("video")
    p.add_argument("-o", "--out", required=True, help="output file, e.g. video.fsx")
    add_model_arguments(p)
    add_sampling_arguments(p)
    g = p.add_argument_group("selection")
    g.add_argument("--layer", type=int, help="reference layer, 0-based (default: the model's)")
    g.add_argument("--set-frames", type=int, help="frame units per frame set (default 64)")
    g.add_argument(
        "--index-memory",
        type=float,
        metavar="GIB",
        help="memory the index may take, in GiB (default: half of the available memory)",
    )
    p.set_defaults(run=run_index)


def load_pipeline(args: argparse.Namespace):
    """The pipeline of `add_model_arguments` (and, where a command has them, --positions and the index flags)."""
    from .pipeline import FlexSelect

    memory = getattr(args, "index_memory", None)
    if memory is not None and memory <= 0:
        raise FlexSelectError(f"--index-memory must be a positive number of GiB, got {memory}")
    pipe = FlexSelect.load(
        args.model,
        gguf=args.gguf,
        mmproj=args.mmproj,
        ranker=args.ranker,
        device=args.device,
        dtype=args.dtype,
        positions=getattr(args, "positions", "original"),
        n_ctx=args.n_ctx,
        n_gpu_layers=args.n_gpu_layers,
        index_memory=None if memory is None else int(memory * 2**30),
        auto_index=not getattr(args, "no_index", False),
    )
    return pipe


def sampling_of(args: argparse.Namespace):
    from .pipeline import Sampling

    return Sampling(args.frames, args.fps, args.start, args.end, args.max_frames, args.max_side)


def check_index_file(args: argparse.Namespace) -> None:
    """Before the model loads: the index file is there and the flags do not contradict each other."""
    from pathlib import Path

    if getattr(args, "index", None):
        if args.no_index:
            raise FlexSelectError("--index and --no-index contradict each other: give one")
        if not Path(args.index).is_file():
            raise FlexSelectError(f"index not found: {args.index}")


def ask(pipe, args, video, question: str, progress, history: list[tuple[str, str]] = ()):
    from .backends.base import GenerationConfig

    return pipe.answer(
        video,
        question,
        sampling=sampling_of(args),
        options=select_options(args),
        generation=GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed),
        progress=progress,
        history=list(history),
    )


def print_answer(args, result, demo_module=None) -> None:
    """One question's answer: a JSON line, the demo's report, or the answer with evidence and stats on stderr."""
    evidence = describe(result.evidence, result.stats["kept_tokens"], result.stats["visual_tokens"])
    heatmap = demo_module.write_heatmap(result) if demo_module else None
    if args.json:
        out = {
            "answer": result.text,
            "question": result.question,
            "demo": demo_module is not None,
            "stats": result.stats,
            "evidence": [r.to_dict() for r in result.evidence],
            "answer_token_ids": result.generation.token_ids,
            "kept_token_indices": result.selection.kept.tolist(),
        }
        if demo_module:
            out |= {
                "video": result.visual.source,
                "red_square_seconds": demo_module.needle_seconds(),
                "heatmap": str(heatmap),
            }
        print(json.dumps(out), flush=True)
    elif demo_module:
        print(demo_module.report(result, evidence, heatmap))
        print(format_stats(result.stats), file=sys.stderr)
    else:
        print(result.text, flush=True)
        print(f"evidence: {evidence}", file=sys.stderr)
        print(format_stats(result.stats), file=sys.stderr, flush=True)


def run_answer(args: argparse.Namespace) -> int:
    from . import demo as demo_module
    from .backends.base import GenerationConfig
    from .video import probe

    demo = args.video is None and args.model is None and args.gguf is None
    if demo:
        print(demo_module.DEMO_NOTICE, file=sys.stderr)
        model, video = demo_module.demo_assets()
        args.model, args.video = str(model), str(video)
        args.questions = args.questions or [demo_module.DEMO_QUESTION]
        args.frames = args.frames or demo_module.DEMO_FRAMES
        args.budget = args.budget or demo_module.DEMO_BUDGET
        args.set_frames = args.set_frames or demo_module.DEMO_SET_FRAMES
        args.layer = demo_module.DEMO_LAYER if args.layer is None else args.layer
    elif args.video is None or not args.questions:
        raise FlexSelectError('give a video and a question: flexselect answer VIDEO "QUESTION" --model PATH')
    elif args.model is None and args.gguf is None:
        raise FlexSelectError(
            "no model given: pass --model /path/to/Qwen2.5-VL-7B-Instruct (or --gguf + --mmproj); "
            "run `flexselect answer` with no arguments for the offline demo"
        )
    # Every value and the video are checked before the model loads (seconds here, minutes for a 7B).
    sampling_of(args)
    select_options(args)
    GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if any(not q.strip() for q in args.questions):
        raise FlexSelectError("the question is empty: ask something about the video")
    probe(args.video)
    check_index_file(args)
    pipe = load_pipeline(args)
    if args.index:
        pipe.load_index(args.index, args.video, sampling_of(args), select_options(args))
    for question in args.questions:
        with ProgressBars(disable=args.json) as progress:
            result = ask(pipe, args, args.video, question, progress)
        print_answer(args, result, demo_module if demo else None)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    if args.model is None and args.gguf is None:
        raise FlexSelectError("no model given: pass --model PATH (or --gguf + --mmproj)")
    from pathlib import Path

    if not Path(args.video).is_file():
        raise FlexSelectError(f"video not found: {args.video}")
    check_index_file(args)
    pipe = load_pipeline(args)
    if args.index:
        pipe.load_index(args.index, args.video, sampling_of(args), select_options(args))
    interactive = sys.stdin.isatty() and not args.json
    history: list[tuple[str, str]] = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        with ProgressBars(disable=args.json) as progress:
            result = ask(pipe, args, args.video, question, progress, [] if args.no_history else history)
        print_answer(args, result)
        history.append((question, result.text))
    return 0


def run_index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .pipeline import SelectOptions

    out = Path(args.out)
    if not Path(args.video).is_file():
        raise FlexSelectError(f"video not found: {args.video}")
    if not out.parent.is_dir():
        raise FlexSelectError(f"cannot write {out}: the folder {out.parent} does not exist")
    if args.model is None and args.gguf is None:
        raise FlexSelectError("no model given: pass --model PATH (or --gguf + --mmproj)")
    args.no_index = False
    pipe = load_pipeline(args)
    options = SelectOptions(layer=args.layer, set_frames=args.set_frames)
    with ProgressBars() as progress:
        index = pipe.save_index(args.video, out, sampling_of(args), options, progress)
    print(
        f"{out}: {len(index.sets)} frame set(s), layer {index.key.layer}, {index.nbytes / 2**20:.1f} MiB, "
        f"built in {index.build_s:.2f}s"
    )
    return 0


def add_show_command(sub) -> None:
    p = sub.add_parser(
        "show",
        help="render the tokens FlexSelect keeps as a heatmap over the frames (PNG)",
        description="Run the selection (no answer) and write a contact sheet of the kept tokens.",
    )
    p.add_argument("video")
    p.add_argument("question")
    p.add_argument("-o", "--out", default="flexselect_show.png", help="output PNG (default flexselect_show.png)")
    p.add_argument("--sheet-frames", type=int, default=16, help="frames on the contact sheet (default 16)")
    p.add_argument("--animate", metavar="PATH", help="also play every sampled frame with its heatmap: a .gif or .mp4")
    p.add_argument("--animate-fps", type=float, default=4.0, help="frames per second of --animate (default 4)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_selection_arguments(p)
    p.set_defaults(run=run_show)


def run_show(args: argparse.Namespace) -> int:
    from PIL import Image

    from .show import selection_sheet, write_animation
    from .video import load_clip, probe

    if args.model is None and args.gguf is None:
        raise FlexSelectError("no model given: pass --model PATH (or --gguf + --mmproj)")
    if not args.question.strip():
        raise FlexSelectError("the question is empty: ask something about the video")
    sampling_of(args)  # checks the values
    options = select_options(args)
    check_positive("--sheet-frames", args.sheet_frames, whole=True)
    check_positive("--animate-fps", args.animate_fps)
    out = check_output_file(args.out, (".png",))
    animation = check_output_file(args.animate, (".gif", ".mp4")) if args.animate else None
    probe(args.video)  # a bad video is reported before the model loads
    pipe = load_pipeline(args)
    d = pipe.defaults
    clip = load_clip(
        args.video,
        num_frames=args.frames,
        fps=None if args.frames else (args.fps or d.fps),
        start=args.start,
        end=args.end,
        max_frames=args.max_frames or d.max_frames,
        max_side=args.max_side or d.max_side,
    )
    with ProgressBars() as progress:
        visual, _ = pipe.encode(clip, progress=progress)
        selection = pipe.select(visual, pipe.backend.prompt(args.question.strip()), options, progress)
    sheet = selection_sheet(clip.frames, visual, selection, max_frames=args.sheet_frames, timestamps=clip.timestamps)
    # The animation first: when it fails, no PNG is left behind either (each file is written under a temporary name)
    animated = animation and write_animation(
        animation, clip.frames, visual, selection, args.animate_fps, clip.timestamps
    )
    partial = out.with_name(out.name + ".partial.png")
    Image.fromarray(sheet).save(partial)
    partial.replace(out)  # never a half-written PNG at the destination
    print(f"{out}: {describe(selection.evidence(visual), len(selection.kept), visual.num_tokens)}")
    if animated:
        print(animated)
    return 0


def format_stats(s: dict) -> str:
    sec = s["seconds"]
    kept_share = 100.0 * s["kept_tokens"] / max(1, s["visual_tokens"])
    layer = f", reference layer {s['reference_layer']}" if s["reference_layer"] is not None else ""
    memory = ", ".join(f"{k} {v:.0f} MiB" for k, v in s["peak_memory_mb"].items())
    frames = "cached" if s["video_cached"] else f"{s['frames']} sampled"
    return index_line(s.get("index") or {}) + (
        f"frames: {frames} -> {s['frame_units']} units x {s['tokens_per_frame']} tokens | "
        f"visual tokens: {s['visual_tokens']} | kept: {s['kept_tokens']} ({kept_share:.1f}%) in "
        f"{s['frame_sets']} frame set(s), selector {s['selector']}{layer}\n"
        f"time: decode {sec['decode']:.2f}s | encode {sec['encode']:.2f}s | select {sec['select']:.2f}s | "
        f"answer {sec['answer']:.2f}s (first token {sec['ttft_answer']:.2f}s) | total {sec['total']:.2f}s\n"
        f"peak memory: {memory}"
    )


def index_line(ix: dict) -> str:
    """Whether the video's index was reused and what that saved (empty when no index was involved)."""
    if ix.get("notice"):
        return f"index: not used ({ix['notice']})\n"
    if not ix.get("used"):
        return ""
    size = f"{ix['bytes'] / 2**20:.1f} MiB on {ix['device']}"
    if ix["reused_sets"]:
        built = f", indexed {ix['built_sets']} more" if ix["built_sets"] else ""
        return f"index: reused {ix['reused_sets']} set(s){built}, saved {ix['saved_s']:.2f}s ({size})\n"
    return f"index: built for {ix['built_sets']} set(s) ({size}): follow-up questions reuse it\n"


class ProgressBars:
    """One tqdm bar per pipeline stage, on stderr, shown only on a terminal."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="", leave=False, disable=self.disable or None)
        bar.update(done - bar.n)

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()


def add_export_gguf_command(export_subparsers) -> None:
    """`flexselect export gguf`: the exporter (package `flexselect_export`) is imported only when it runs."""
    p = export_subparsers.add_parser(
        "gguf",
        help="convert a Qwen2.5-VL / Qwen3-VL / Qwen3.5 checkpoint to model.gguf + mmproj.gguf",
        description="Convert a Qwen2.5-VL, Qwen2-VL, Qwen3-VL or Qwen3.5 (dense or MoE) checkpoint to a llama.cpp "
        "GGUF + mmproj.",
    )
    p.add_argument("model_dir", help="transformers checkpoint folder (config.json, weights, tokenizer)")
    p.add_argument("out_dir", help="folder for model.gguf and mmproj.gguf")
    p.add_argument(
        "--outtype",
        choices=("f16", "q8_0", "f32"),
        default="f16",
        help="weight type of the language model (default f16; the projector stays f16, f32 for f32)",
    )
    p.set_defaults(run=run_export_gguf)


def run_export_gguf(args) -> int:
    from flexselect_export.gguf import export_gguf

    model, mmproj = export_gguf(args.model_dir, args.out_dir, args.outtype)
    for path in (model, mmproj):
        print(f"{path}  ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"run it with: flexselect answer VIDEO QUESTION --gguf {model} --mmproj {mmproj}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexselect",
        description="Ask questions about long videos: FlexSelect keeps the visual tokens the "
        "question needs. `flexselect answer` with no arguments runs an offline demo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    add_answer_command(sub)
    add_chat_command(sub)
    add_index_command(sub)
    add_show_command(sub)
    add_layer_scan_command(sub)
    add_lite_commands(sub)
    add_eval_command(sub)
    add_plan_command(sub)
    add_serve_command(sub)
    export = sub.add_parser("export", help="export a model for another runtime (GGUF for llama.cpp)")
    add_export_gguf_command(export.add_subparsers(dest="format", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="flexselect: %(message)s")
        if not args.verbose:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # weight loading/writing bars: noise next to our own per-stage bars
        logging.getLogger("flexselect.index").setLevel(logging.INFO)  # the index's size, said before it is built
        return args.run(args)
    except FlexSelectError as e:
        print(f"flexselect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C at any point, the imports included: one line, the shell's 128 + SIGINT
        print("flexselect: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError):
        print(
            "flexselect: error: out of memory; use fewer --frames, a smaller --max-side or --budget, "
            "or --dtype bfloat16",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
