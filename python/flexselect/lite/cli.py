"""The `lite-import`, `lite-teacher`, `lite-train` and `lite-export` subcommands, registered on the main CLI's
subparsers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import FlexSelectError
from .layouts import LAYOUTS


def add_lite_commands(sub) -> None:
    p = sub.add_parser(
        "lite-import",
        help="FlexSelect-Lite: import one of the authors' released rankers as a ranker bundle",
        description="Map a released FlexSelect-Lite ranker folder (config.json + *.safetensors, as published for "
        "Qwen2.5-VL-7B, LLaVA-Video-7B and InternVL2.5-8B) onto a ranker bundle. Anything else is "
        "refused with the layouts expected. (--ranker also takes such a folder directly.)",
    )
    p.add_argument("path", help="the released ranker's folder")
    p.add_argument("-o", "--out", required=True, help="output bundle folder")
    p.set_defaults(run=run_import)

    p = sub.add_parser(
        "lite-teacher",
        help="FlexSelect-Lite: record the model's reference-layer scores as training data",
        description="Score (video, question) pairs with the model's reference layer and write safetensors shards. "
        "Resumable: run the same command again to continue.",
    )
    p.add_argument("--model", required=True, help="transformers checkpoint folder of the host Video-LLM")
    p.add_argument("--pairs", required=True, help='JSONL file, one {"video": "rel/path.mp4", "question": "..."} a line')
    p.add_argument("--videos", required=True, help="folder the pairs' video paths are relative to")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--frames", type=int, default=64, help="frames sampled per video (default 64, as the paper)")
    p.add_argument("--max-side", type=int, help="resize frames so the longest side is at most this")
    p.add_argument("--layer", type=int, help="teacher layer (default: the model's reference layer)")
    p.add_argument("--aggregate", choices=["max", "mean"], default="max")
    p.add_argument("--shard-size", type=int, default=64, help="examples per shard (default 64)")
    p.add_argument(
        "--store-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the stored visual embeddings (default bfloat16)",
    )
    p.add_argument(
        "--layout",
        choices=list(LAYOUTS),
        help="ranker layout the data is for (default: the family's authors' layout, reading the vision "
        "tower's features; host_embeds for rankers the C++ runtime can run)",
    )
    p.add_argument("--limit", type=int, help="stop after this many new examples")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(run=run_teacher)

    p = sub.add_parser(
        "lite-train",
        help="FlexSelect-Lite: train a ranker on teacher data",
        description="Train a Lite ranker to reproduce the teacher's ranking (1 - Spearman loss). Resumes from "
        "OUT/checkpoint when present; writes the ranker bundle to OUT.",
    )
    p.add_argument("--data", required=True, help="teacher data folder (from lite-teacher)")
    p.add_argument("--out", required=True, help="output folder: checkpoint/ while training, the bundle at the end")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--init", help="small Qwen2-style checkpoint folder to start from (e.g. Qwen2-0.5B-Instruct)")
    init.add_argument(
        "--ranker-config",
        help="JSON of Qwen2 config fields for a random init "
        "(e.g. '{\"num_hidden_layers\": 12}'); default: Qwen2-0.5B shape",
    )
    p.add_argument("--scoring-layer", type=int, help="ranker layer that scores (default: its last)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.03, help="share of steps for linear warm-up (default 0.03)")
    p.add_argument("--grad-accum", type=int, default=1, help="examples per optimizer step (default 1)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--tau", type=float, default=1e-4, help="soft-rank temperature (default 1e-4, the paper's)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share (default 0.05)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_train)

    p = sub.add_parser(
        "lite-export",
        help="FlexSelect-Lite: export a ranker bundle to ONNX",
        description="Write ranker.onnx (+ manifest.json) for ONNX Runtime and the C++ CLI.",
    )
    p.add_argument("bundle", help="ranker bundle folder (from lite-train or lite-import)")
    p.add_argument("--out", help="output folder (default: the bundle folder)")
    p.add_argument(
        "--target",
        choices=["cpu", "cuda"],
        default="cpu",
        help="runtime the graph is for: cpu (float32, default) or cuda (float16, CUDA execution provider)",
    )
    p.add_argument(
        "--opset",
        type=int,
        choices=[18, 23],
        default=23,
        help="23 (default): fused Attention, ONNX Runtime >= 1.23; 18: for older runtimes",
    )
    p.set_defaults(run=run_export)


def run_teacher(args: argparse.Namespace) -> int:
    import torch

    from ..backends import load_backend
    from .teacher import build_teacher_data

    backend = load_backend(args.model, device=args.device, dtype=args.dtype)
    summary = build_teacher_data(
        backend,
        args.pairs,
        args.videos,
        args.out,
        frames=args.frames,
        max_side=args.max_side,
        layer=args.layer,
        aggregate=args.aggregate,
        shard_size=args.shard_size,
        store_dtype=getattr(torch, args.store_dtype),
        limit=args.limit,
        layout=args.layout,
    )
    print(
        f"lite-teacher: {summary.written} new examples in {summary.shards} shard(s), {summary.skipped_done} "
        f"already done, {len(summary.failed)} failed -> {args.out}",
        file=sys.stderr,
    )
    return 1 if summary.failed and not summary.written else 0


def run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    overrides = None
    if args.ranker_config:
        text = Path(args.ranker_config).read_text() if Path(args.ranker_config).is_file() else args.ranker_config
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as e:
            raise FlexSelectError(f"--ranker-config is not valid JSON ({e})") from None
    cfg = TrainConfig(
        data=Path(args.data),
        out=Path(args.out),
        init=Path(args.init) if args.init else None,
        ranker_config=overrides,
        scoring_layer=args.scoring_layer,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        grad_accum=args.grad_accum,
        precision=args.precision,
        tau=args.tau,
        eval_fraction=args.eval_fraction,
        save_every=args.save_every,
        seed=args.seed,
        device=args.device,
    )
    print(train(cfg).text(), file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from flexselect_export.onnx import export_bundle

    path = export_bundle(args.bundle, args.out, args.opset, args.target)
    print(f"lite-export: wrote {path}", file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from .released import import_to_bundle

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FlexSelectError(f"--out {out} exists and is not a folder")
    path = import_to_bundle(args.path, out)
    print(
        f"lite-import: wrote the ranker bundle {path} (use --ranker {path}; flexselect lite-export for ONNX)",
        file=sys.stderr,
    )
    return 0
