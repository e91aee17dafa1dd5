"""`flexselect` command line. Errors the user can fix print one line and exit 2; no torch tracebacks."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from .errors import FlexSelectError, check_positive
from .evidence import describe
from .outputs import check_output_file
from .eval.cli import add_eval_command
from .layer_scan import add_layer_scan_command
from .lite import add_lite_commands
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
    g.add_argument("--selector", choices=["reference", "lite", "none"],
                   help="who scores tokens: the model's reference layer (default), a Lite ranker, or keep all")
    g.add_argument("--budget", type=int, help="visual tokens to keep for the whole video (default: the model's)")
    g.add_argument("--layer", type=int, help="reference layer, 0-based (default: the model's, 20 for Qwen2.5-VL-7B)")
    g.add_argument("--set-frames", type=int, help="frame units per frame set (default 64)")
    g.add_argument("--aggregate", choices=["max", "mean"], help="over heads and question tokens (default max)")
    g.add_argument("--positions", choices=["original", "compact"], default="original",
                   help="answer-pass positions of kept tokens: original (paper) or compact re-gridding")


def select_options(args: argparse.Namespace):
    """The selection flags of `add_selection_arguments` as the pipeline's options."""
    from .pipeline import SelectOptions

    return SelectOptions(budget=args.budget, layer=args.layer, set_frames=args.set_frames, aggregate=args.aggregate,
                         selector=args.selector)


def add_answer_command(sub) -> None:
    p = sub.add_parser("answer", help="answer a question about a video (no arguments: the offline demo)",
                       description="Answer a question about a long video with FlexSelect token selection.")
    p.add_argument("video", nargs="?", help="video file (omit for the built-in demo)")
    p.add_argument("question", nargs="?", help="the question")
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_selection_arguments(p)
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_answer)


def run_answer(args: argparse.Namespace) -> int:
    from . import demo as demo_module
    from .backends.base import GenerationConfig
    from .pipeline import FlexSelect, Sampling
    from .video import probe

    demo = args.video is None and args.model is None and args.gguf is None
    if demo:
        print(demo_module.DEMO_NOTICE, file=sys.stderr)
        model, video = demo_module.demo_assets()
        args.model, args.video = str(model), str(video)
        args.question = args.question or demo_module.DEMO_QUESTION
        args.frames = args.frames or demo_module.DEMO_FRAMES
        args.budget = args.budget or demo_module.DEMO_BUDGET
        args.set_frames = args.set_frames or demo_module.DEMO_SET_FRAMES
        args.layer = demo_module.DEMO_LAYER if args.layer is None else args.layer
    elif args.video is None or args.question is None:
        raise FlexSelectError('give a video and a question: flexselect answer VIDEO "QUESTION" --model PATH')
    elif args.model is None and args.gguf is None:
        raise FlexSelectError(
            "no model given: pass --model /path/to/Qwen2.5-VL-7B-Instruct (or --gguf + --mmproj); "
            "run `flexselect answer` with no arguments for the offline demo"
        )
    # Every value and the video are checked before the model loads (seconds here, minutes for a 7B).
    sampling = Sampling(args.frames, args.fps, args.start, args.end, args.max_frames, args.max_side)
    options = select_options(args)
    generation = GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if not args.question.strip():
        raise FlexSelectError("the question is empty: ask something about the video")
    probe(args.video)
    pipe = FlexSelect.load(args.model, gguf=args.gguf, mmproj=args.mmproj, ranker=args.ranker, device=args.device,
                           dtype=args.dtype, positions=args.positions, n_ctx=args.n_ctx,
                           n_gpu_layers=args.n_gpu_layers)
    with ProgressBars(disable=args.json) as progress:
        result = pipe.answer(args.video, args.question, sampling=sampling, options=options, generation=generation,
                             progress=progress)
    evidence = describe(result.evidence, result.stats["kept_tokens"], result.stats["visual_tokens"])
    heatmap = demo_module.write_heatmap(result) if demo else None
    if args.json:
        out = {"answer": result.text, "demo": demo, "stats": result.stats,
               "evidence": [r.to_dict() for r in result.evidence],
               "answer_token_ids": result.generation.token_ids,
               "kept_token_indices": result.selection.kept.tolist()}
        if demo:
            out |= {"video": args.video, "red_square_seconds": demo_module.needle_seconds(), "heatmap": str(heatmap)}
        print(json.dumps(out))
    elif demo:
        print(demo_module.report(result, evidence, heatmap))
        print(format_stats(result.stats), file=sys.stderr)
    else:
        print(result.text)
        print(f"evidence: {evidence}", file=sys.stderr)
        print(format_stats(result.stats), file=sys.stderr)
    return 0


def add_show_command(sub) -> None:
    p = sub.add_parser("show", help="render the tokens FlexSelect keeps as a heatmap over the frames (PNG)",
                       description="Run the selection (no answer) and write a contact sheet of the kept tokens.")
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

    from .pipeline import FlexSelect, Sampling
    from .show import selection_sheet, write_animation
    from .video import load_clip, probe

    if args.model is None and args.gguf is None:
        raise FlexSelectError("no model given: pass --model PATH (or --gguf + --mmproj)")
    if not args.question.strip():
        raise FlexSelectError("the question is empty: ask something about the video")
    Sampling(args.frames, args.fps, args.start, args.end, args.max_frames, args.max_side)  # checks the values
    options = select_options(args)
    check_positive("--sheet-frames", args.sheet_frames, whole=True)
    check_positive("--animate-fps", args.animate_fps)
    out = check_output_file(args.out, (".png",))
    animation = check_output_file(args.animate, (".gif", ".mp4")) if args.animate else None
    probe(args.video)  # a bad video is reported before the model loads
    pipe = FlexSelect.load(args.model, gguf=args.gguf, mmproj=args.mmproj, ranker=args.ranker, device=args.device,
                           dtype=args.dtype, n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers)
    d = pipe.defaults
    clip = load_clip(args.video, num_frames=args.frames, fps=None if args.frames else (args.fps or d.fps), start=args.start,
                     end=args.end, max_frames=args.max_frames or d.max_frames, max_side=args.max_side or d.max_side)
    with ProgressBars() as progress:
        visual, _ = pipe.encode(clip, progress=progress)
        selection = pipe.select(visual, pipe.backend.prompt(args.question.strip()), options, progress)
    sheet = selection_sheet(clip.frames, visual, selection, max_frames=args.sheet_frames, timestamps=clip.timestamps)
    # The animation first: when it fails, no PNG is left behind either (each file is written under a temporary name)
    animated = animation and write_animation(animation, clip.frames, visual, selection, args.animate_fps,
                                             clip.timestamps)
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
    return (
        f"frames: {frames} -> {s['frame_units']} units x {s['tokens_per_frame']} tokens | "
        f"visual tokens: {s['visual_tokens']} | kept: {s['kept_tokens']} ({kept_share:.1f}%) in "
        f"{s['frame_sets']} frame set(s), selector {s['selector']}{layer}\n"
        f"time: decode {sec['decode']:.2f}s | encode {sec['encode']:.2f}s | select {sec['select']:.2f}s | "
        f"answer {sec['answer']:.2f}s (first token {sec['ttft_answer']:.2f}s) | total {sec['total']:.2f}s\n"
        f"peak memory: {memory}"
    )


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

    def __enter__(self) -> "ProgressBars":
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()


def add_export_gguf_command(export_subparsers) -> None:
    """`flexselect export gguf`: the exporter (package `flexselect_export`) is imported only when it runs."""
    p = export_subparsers.add_parser("gguf", help="convert a Qwen2.5-VL checkpoint to model.gguf + mmproj.gguf",
                                     description="Convert a Qwen2.5-VL checkpoint to a llama.cpp GGUF + mmproj.")
    p.add_argument("model_dir", help="transformers checkpoint folder (config.json, weights, tokenizer)")
    p.add_argument("out_dir", help="folder for model.gguf and mmproj.gguf")
    p.add_argument("--outtype", choices=("f16", "q8_0", "f32"), default="f16",
                   help="weight type of the language model (default f16; the projector stays f16, f32 for f32)")
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
        prog="flexselect", description="Ask questions about long videos: FlexSelect keeps the visual tokens the "
        "question needs. `flexselect answer` with no arguments runs an offline demo.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    add_answer_command(sub)
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
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="flexselect: %(message)s")
        if not args.verbose:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # weight loading/writing bars: noise next to our own per-stage bars
        return args.run(args)
    except FlexSelectError as e:
        print(f"flexselect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C at any point, the imports included: one line, the shell's 128 + SIGINT
        print("flexselect: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError):
        print("flexselect: error: out of memory; use fewer --frames, a smaller --max-side or --budget, "
              "or --dtype bfloat16", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
