"""Cost of scoring one frame set: the reference layer of a 7B-shape host vs FlexSelect-Lite (torch, ONNX, C++).

One set of 1760 visual tokens (16 Qwen2.5-VL units of 10 x 11 tokens, the paper's per-unit count) and one question,
at the real shapes (random weights cost what real ones do):
- reference: Qwen2.5-VL-7B's LM (hidden 3584, 28 heads of 128, 4 KV heads, MLP 18944), scoring at layer 20. A
  float32 7B does not fit in this machine's memory, so the host is built with 3 layers and its cost is estimated
  from measured passes: t(layer 1) + 19 x (t(layer 2) - t(layer 1)) = 20 full layers + the Q/K of layer 20.
- Lite: the authors' Qwen2.5-VL ranker shape (Qwen2-0.5B: 24 layers, hidden 896, 14 heads of 64, 2 KV heads,
  MLP 4864; its own patch merger 4 x 1280 -> 896), scoring at its last layer; torch, and ONNX Runtime from Python
  (the exported graph: opset 23, target cpu).
- Lite host_embeds: the same decoder over the host's 3584-d post-merger embeddings, the layout the C++ runtime runs:
  torch, ONNX Runtime from Python, and ONNX Runtime from C++ (`flexselect-ranker-bench`, when built: `cmake --build
  build --target flexselect-ranker-bench`, with -DFLEXSELECT_BUILD_TESTS=ON).
Each arm: one warm-up on a small input, then the timed runs (median). The vision tower is shared by all and left out.
The arms can run in separate (shorter) runs, `--merge` joining the earlier runs' results into the last one's ratios;
each run records the machine's load averages (as `uptime` shows them) at its start and end.

    python bench/lite_vs_reference.py [--arms reference qwen2_5_vl host_embeds] [--merge EARLIER.json ...]
        [--repeats 1] [--cpp build/cpp/tests/flexselect-ranker-bench] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

HOST = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
REFERENCE_LAYER = 20
RANKER = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
)
VIT_WIDTH = 1280  # Qwen2.5-VL's ViT; a token's pre-merger features are its 2x2 group: 4 x 1280
UNITS, GRID = 16, (10, 11)
LITE_ARMS = {"qwen2_5_vl": ("lite", 4 * VIT_WIDTH), "host_embeds": ("lite-host_embeds", HOST["hidden_size"])}
QUESTION = "What does the presenter write on the whiteboard after the break?"


def host_backend(layers: int):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend
    from flexselect.demo import demo_model

    tokenizer = AutoTokenizer.from_pretrained(demo_model())
    text = dict(
        HOST,
        num_hidden_layers=layers,
        vocab_size=len(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        # never run here (the features are given); its width is what the rankers check against
        vision_config=dict(
            depth=1,
            hidden_size=VIT_WIDTH,
            intermediate_size=64,
            num_heads=16,
            out_hidden_size=HOST["hidden_size"],
            fullatt_block_indexes=[0],
        ),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    )
    torch.manual_seed(0)
    return Qwen25VLBackend(Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer, {})


def timed(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def run_arm(ranker, visual, small, units, prompt, repeats: int):
    """(median seconds, scores) of a ranker on the set, after a warm-up on one unit."""
    ranker.score(small, [0], prompt)
    out = {}
    seconds = timed(lambda: out.__setitem__("scores", ranker.score(visual, units, prompt)), repeats)
    return seconds, out["scores"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per arm after a small warm-up (median)")
    ap.add_argument("--cpp", default="build/cpp/tests/flexselect-ranker-bench", help="the C++ timing binary")
    ap.add_argument("--out", help="also write the JSON result here")
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=["reference", *LITE_ARMS],
        default=["reference", *LITE_ARMS],
        help="the host's reference layer and/or the Lite layouts to run (default all)",
    )
    ap.add_argument("--merge", nargs="*", default=[], help="results of earlier runs of the other arms, to join")
    ap.add_argument(
        "--onnx-dir",
        help="keep the rankers' ONNX exports here and reuse them (the weights are seeded: an export made by "
        "--export-only, outside a timed run, is the one this run would make; the torch-vs-ONNX score gap checks it)",
    )
    ap.add_argument("--export-only", action="store_true", help="only write the exports into --onnx-dir")
    args = ap.parse_args()
    if args.export_only and not args.onnx_dir:
        ap.error("--export-only needs --onnx-dir")

    import numpy as np
    import onnxruntime
    import torch

    from flexselect.backends.base import VisualTokens

    rows, cols = GRID
    tokens = UNITS * rows * cols
    units = list(range(UNITS))
    backend = host_backend(3 if "reference" in args.arms and not args.export_only else 1)
    vocab = backend.text_model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    visual = VisualTokens(
        embeds=torch.randn(tokens, HOST["hidden_size"], generator=g) * 0.02,
        num_frames=UNITS,
        grid=GRID,
        timestamps=np.arange(UNITS) * 1.0,
        time_interval=2.0,
        frame_size=(rows * 28, cols * 28),
        vision_features=torch.randn(UNITS, rows * cols, 4 * VIT_WIDTH, generator=g),
    )
    prompt = backend.prompt(QUESTION)
    small = VisualTokens(
        **{
            **visual.__dict__,
            "num_frames": 1,
            "embeds": visual.embeds[: rows * cols],
            "vision_features": visual.vision_features[:1],
        }
    )
    result: dict = {
        "tokens_per_set": tokens,
        "threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "runs": [],
        "seconds": {},
        "max_abs_diff_torch_onnx": {},
    }
    for earlier in args.merge:
        old = json.loads(Path(earlier).read_text())
        result["runs"] += old.get("runs", [{"merged_from": earlier, "load_avg": "not recorded"}])
        result["seconds"].update(old.get("seconds", {}))
        result["max_abs_diff_torch_onnx"].update(old.get("max_abs_diff_torch_onnx", {}))
        result.update({k: v for k, v in old.items() if k == "reference" or k.endswith("onnx_export_s")})
    run = {"arms": args.arms, "load_avg_start": load_avg()}

    if "reference" in args.arms and not args.export_only:
        # the reference layer of the 7B-shape host, from passes stopping at layers 1 and 2
        backend.score(small, [0], prompt, 1)
        t1 = timed(functools.partial(backend.score, visual, units, prompt, 1), args.repeats)
        t2 = timed(functools.partial(backend.score, visual, units, prompt, 2), args.repeats)
        result["reference"] = {
            "layer_1_s": round(t1, 2),
            "layer_2_s": round(t2, 2),
            "per_layer_s": round(t2 - t1, 2),
            "estimated_layer_20_s": round(t1 + (REFERENCE_LAYER - 1) * (t2 - t1), 2),
        }
    del backend
    layouts = [a for a in args.arms if a in LITE_ARMS]
    if layouts:
        lite_arms(args, layouts, result, visual, small, units, prompt, vocab, tokens)
    run["load_avg_end"] = load_avg()
    result["runs"].append(run)
    ratios(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def load_avg() -> list[float]:
    """The 1/5/15-minute load averages, as `uptime` shows them (2 = both cores of this machine busy)."""
    return [round(x, 2) for x in os.getloadavg()]


def lite_arms(args, layouts: list[str], result: dict, visual, small, units, prompt, vocab: int, tokens: int) -> None:
    import torch

    from flexselect.lite.bundle import ONNX
    from flexselect.lite.host import HostInfo
    from flexselect.lite.onnx_ranker import OnnxRanker
    from flexselect.lite.ranker import LiteRanker
    from flexselect_export.onnx import export_ranker

    backend = host_backend(1)  # the rankers only need its tokenizer, family and vision width
    work = Path(args.onnx_dir or tempfile.mkdtemp(prefix="lite-bench-"))
    seconds = result["seconds"]
    for layout in layouts:
        name, width = LITE_ARMS[layout]
        reads = "embeds" if layout == "host_embeds" else "vision_features"
        torch.manual_seed(1)
        ranker = LiteRanker.for_host(HostInfo("qwen2_5_vl", width, vocab, reads), width, RANKER, layout).eval()
        ranker.check_compatible(backend)
        path = work / layout / ONNX
        if not path.is_file():
            t0 = time.perf_counter()
            export_ranker(ranker, work / layout)
            result[f"{name}-onnx_export_s"] = round(time.perf_counter() - t0, 1)
        if args.export_only:
            continue
        seconds[f"{name}-torch"], torch_scores = run_arm(ranker, visual, small, units, prompt, args.repeats)
        del ranker
        onnx_ranker = OnnxRanker.load(path)
        onnx_ranker.check_compatible(backend)
        seconds[f"{name}-onnx"], onnx_scores = run_arm(onnx_ranker, visual, small, units, prompt, args.repeats)
        result["max_abs_diff_torch_onnx"][name] = float((torch_scores - onnx_scores).abs().max())
        del onnx_ranker
        if layout == "host_embeds" and Path(args.cpp).is_file():
            question = len(backend.tokenizer(QUESTION, add_special_tokens=False).input_ids)
            command = [args.cpp, str(path), str(tokens), str(width), str(question), str(args.repeats)]
            out = subprocess.run([*command, str(torch.get_num_threads())], capture_output=True, text=True, check=True)
            seconds[f"{name}-onnx-cpp"] = statistics.median(json.loads(out.stdout)["score_s"])
    if not args.onnx_dir:
        shutil.rmtree(work)


def ratios(result: dict) -> None:
    """Speed ratios of whatever arms the result holds (measured here or merged)."""
    seconds = result["seconds"]
    result["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    if "reference" in result:
        reference = result["reference"]["estimated_layer_20_s"]
        result["lite_vs_reference"] = {k: round(reference / v, 1) for k, v in seconds.items()}
    result["onnx_vs_torch"] = {
        name: round(seconds[f"{name}-torch"] / seconds[f"{name}-onnx"], 2)
        for name, _ in LITE_ARMS.values()
        if f"{name}-onnx" in seconds
    }
    if "lite-host_embeds-onnx-cpp" in seconds:
        cpp = seconds["lite-host_embeds-onnx-cpp"]
        result["onnx_cpp_vs_torch"] = round(seconds["lite-host_embeds-torch"] / cpp, 2)


if __name__ == "__main__":
    main()
