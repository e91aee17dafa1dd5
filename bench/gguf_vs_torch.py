"""transformers vs llama.cpp on the same random Qwen2.5-VL weights: full visual tokens vs FlexSelect, side by side.

One run, one process, CPU by default. The model is a random Qwen2.5-VL with a mid-sized language model (default:
8 layers, hidden 512, 8 heads, 2 KV heads; the tiny fixture's tokenizer and vision tower), exported once to GGUF
(f16 unless --outtype). The video is synthetic random frames of 224x336 (8 x 12 = 96 tokens per frame pair).

    python bench/gguf_vs_torch.py                       # 64 frames, 25% budget, sets of 8 frame pairs
    python bench/gguf_vs_torch.py --frames 128 --layers 12 --outtype f32

Printed: vision encoding, the selection (all scoring passes), TTFT of the answer pass with all tokens and with the
kept ones, the end-to-end time to first token, and the llama.cpp scoring pass stopped after the reference layer vs
the same pass run through all layers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_model(root: Path, layers: int, hidden: int, heads: int, outtype: str):
    import flexselect.tiny as tiny
    from flexselect_export.gguf import export_gguf

    head_dim = hidden // heads
    quarter = head_dim // 2 // 4  # rotary frequencies: t gets a quarter, h and w split the rest (as 16/24/24 of 64)
    sections = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    tiny.TINY_TEXT = dict(
        tiny.TINY_TEXT,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        rope_parameters={**tiny.TINY_TEXT["rope_parameters"], "mrope_section": sections},
    )
    tiny.TINY_VISION = dict(tiny.TINY_VISION, out_hidden_size=hidden)
    model_dir = tiny.build_tiny_qwen2_5_vl(root / f"qwen2_5_vl-{layers}x{hidden}")
    gguf_dir = root / f"gguf-{layers}x{hidden}-{outtype}"
    if not (gguf_dir / "model.gguf").is_file():
        export_gguf(model_dir, gguf_dir, outtype)
    return model_dir, gguf_dir / "model.gguf", gguf_dir / "mmproj.gguf"


def add_shape_arguments(ap: argparse.ArgumentParser) -> None:
    """The model, video and selection shape, shared with bench/runtimes.py."""
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.25, help="share of visual tokens kept")
    ap.add_argument("--set-frames", type=int, default=8, help="frame pairs per scoring set")
    ap.add_argument("--outtype", default="f16", choices=["f16", "f32", "q8_0"])
    ap.add_argument(
        "--cache", default=os.environ.get("FLEXSELECT_BENCH_DIR", Path(tempfile.gettempdir()) / "flexselect-bench")
    )


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(ap)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flexselect.backends.base import GenerationConfig
    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend
    from flexselect.backends.llama_cpp import LlamaCppBackend
    from flexselect.defaults import reference_layer_for
    from flexselect.pipeline import FlexSelect, SelectOptions
    from flexselect.video import Clip

    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    (model_dir, gguf, mmproj), build_s = timed(
        lambda: build_model(root, args.layers, args.hidden, args.heads, args.outtype)
    )
    rng = np.random.default_rng(0)
    clip = Clip.from_frames(rng.integers(0, 256, size=(args.frames, 224, 336, 3), dtype=np.uint8), 2.0, "random")
    torch_backend = Qwen25VLBackend.load(model_dir, device="cpu", dtype="float32")
    n_ctx = 512 + args.frames // 2 * 96
    llama_backend = LlamaCppBackend(gguf, mmproj, n_ctx=n_ctx, n_threads=args.threads, n_gpu_layers=0)
    layer = reference_layer_for("qwen2_5_vl", args.layers)
    config = GenerationConfig(max_new_tokens=1)
    question = "What color is the car?"

    rows: dict[str, dict[str, float]] = {}
    info = {}
    for name, backend in (("transformers", torch_backend), ("llama.cpp", llama_backend)):
        visual, enc = timed(lambda: backend.encode(clip))
        prompt = backend.prompt(question)
        budget = int(visual.num_tokens * args.keep)
        everything = torch.arange(visual.num_tokens)
        backend.generate(visual, everything[:64], prompt, config)  # warm-up
        full = backend.generate(visual, everything, prompt, config)
        options = SelectOptions(budget=budget, layer=layer, set_frames=args.set_frames, aggregate="max")
        selection, sel = timed(lambda: FlexSelect(backend).select(visual, prompt, options))
        kept, sets = selection.kept, selection.sets
        flex = backend.generate(visual, kept, prompt, config)
        rows[name] = {
            "encode": enc,
            "select": sel,
            "ttft_full": full.ttft_s,
            "ttft_kept": flex.ttft_s,
            "e2e_full": enc + full.ttft_s,
            "e2e_flex": enc + sel + flex.ttft_s,
        }
        info = {"tokens": visual.num_tokens, "kept": len(kept), "sets": len(sets), "layer": layer}

    # the llama.cpp scoring pass: stopped after the reference layer vs run through every layer
    visual = llama_backend.encode(clip)
    prompt = llama_backend.prompt(question)
    frames = list(range(min(args.set_frames, visual.num_frames)))
    stop_full = {}
    for abort in (True, False):
        times = []
        for _ in range(3):
            _, s = timed(lambda: llama_backend.reference_qk(visual, frames, prompt, layer, abort=abort))
            times.append(s)
        stop_full[abort] = min(times)

    print(
        f"model: random Qwen2.5-VL, LM {args.layers} layers x {args.hidden} (GGUF {args.outtype}, torch float32), "
        f"built/exported in {build_s:.1f} s; {args.threads} CPU threads"
    )
    print(
        f"video: {args.frames} frames 224x336 -> {info['tokens']} visual tokens; FlexSelect keeps {info['kept']} "
        f"({args.keep:.0%}) from {info['sets']} sets at reference layer {info['layer']}"
    )
    print(f"{'':28s}{'transformers':>14s}{'llama.cpp':>12s}{'torch/llama':>13s}")
    labels = {
        "encode": "vision encoding (s)",
        "select": "selection, all sets (s)",
        "ttft_full": "TTFT all tokens (s)",
        "ttft_kept": "TTFT kept tokens (s)",
        "e2e_full": "encode + TTFT, full (s)",
        "e2e_flex": "encode + select + TTFT (s)",
    }
    for key, label in labels.items():
        a, b = rows["transformers"][key], rows["llama.cpp"][key]
        print(f"{label:28s}{a:14.3f}{b:12.3f}{a / b:13.2f}x")
    for name in rows:
        r = rows[name]
        print(
            f"{name}: FlexSelect speed-up of the answer pass {r['ttft_full'] / r['ttft_kept']:.2f}x, "
            f"end to end {r['e2e_full'] / r['e2e_flex']:.2f}x"
        )
    n_tok = len(prompt.prefix_ids) + len(frames) * visual.tokens_per_frame + len(prompt.suffix_ids)
    print(
        f"llama.cpp scoring pass ({n_tok} tokens, layer {layer} of {args.layers}): stopped after layer {layer} "
        f"{stop_full[True] * 1000:.1f} ms vs all layers {stop_full[False] * 1000:.1f} ms "
        f"({stop_full[False] / stop_full[True]:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
