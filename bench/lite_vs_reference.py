"""Selection-stage time: reference-layer FlexSelect vs FlexSelect-Lite (torch) vs Lite (ONNX Runtime), one run.

All three arms score the same visual tokens, the same frame sets and the same question through the pipeline's
`FlexSelect.select` (only `selector` / the ranker differs), so the time is exactly the selection stage.

Shapes (random weights cost what real ones do): the real pairing is Qwen2.5-VL-7B's LM (28 layers, reference layer
20, hidden 3584, 28 heads of 128, 4 KV heads, MLP 18944) against a Qwen2-0.5B ranker (24 layers, hidden 896, 14
heads of 64, 2 KV heads, MLP 4864). Both at full size do not run on a small CPU in minutes, so both are scaled to a
quarter of their width at their real depth (compute per token scales with width squared, so the ratio between them
is kept): host hidden 896 (7 heads of 128, 1 KV head, MLP 4736), ranker hidden 224 (14 heads of 16, 2 KV heads, MLP
1216). `--scale 1` gives the real shapes (a GPU-sized job). Visual tokens are random embeddings of the real count
per unit (10 x 11 = 110); the vision tower is shared by all arms and left out.

    python bench/lite_vs_reference.py                       # 32 units in 2 sets of 16, ~3.5k visual tokens
    python bench/lite_vs_reference.py --units 64 --set-frames 32 --scale 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

HOST_FULL = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4)
RANKER_FULL = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2)
REFERENCE_LAYER = 20
QUESTION = "What does the presenter write on the whiteboard after the break?"


def scaled(shape: dict, scale: int) -> dict:
    """Width divided by `scale` at the same depth; heads keep their size on the host, their count on the ranker."""
    return dict(shape, hidden_size=shape["hidden_size"] // scale, intermediate_size=shape["intermediate_size"] // scale)


def host_backend(scale: int):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from flexselect.demo import demo_model
    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend

    tokenizer = AutoTokenizer.from_pretrained(demo_model())
    text = scaled(HOST_FULL, scale)
    heads = text["hidden_size"] // 128  # keep the 7B's head size (and its M-RoPE sections)
    text.update(num_attention_heads=heads, num_key_value_heads=max(1, heads // 7), vocab_size=len(tokenizer),
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=text["hidden_size"], fullatt_block_indexes=[0]),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return Qwen25VLBackend(model, tokenizer, {}), text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=32, help="frame units (Qwen: pairs of frames), default 32")
    ap.add_argument("--set-frames", type=int, default=16, help="units per frame set (paper: 64), default 16")
    ap.add_argument("--grid", type=int, nargs=2, default=(10, 11), help="tokens per unit as rows cols")
    ap.add_argument("--scale", type=int, default=4, help="divide both models' width by this (default 4)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per arm after one warm-up (median)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from flexselect.lite.bundle import save_bundle
    from flexselect.lite.host import host_info
    from flexselect.lite.onnx_ranker import OnnxRanker
    from flexselect.lite.ranker import LiteRanker, qwen2_config
    from flexselect.backends.base import VisualTokens
    from flexselect.pipeline import FlexSelect, SelectOptions
    from flexselect_export.onnx import export_ranker

    backend, host_shape = host_backend(args.scale)
    ranker_shape = scaled(RANKER_FULL, args.scale)
    torch.manual_seed(1)
    ranker = LiteRanker(qwen2_config(ranker_shape, host_info(backend).vocab_size), host_info(backend)).eval()
    work = Path(tempfile.mkdtemp(prefix="lite-bench-"))
    save_bundle(ranker, work)
    t0 = time.perf_counter()
    export_ranker(ranker, work)
    export_s = time.perf_counter() - t0
    onnx_ranker = OnnxRanker.load(work / "ranker.onnx")
    for r in (ranker, onnx_ranker):
        r.check_compatible(backend)

    rows, cols = args.grid
    n_tokens = args.units * rows * cols
    g = torch.Generator().manual_seed(0)
    visual = VisualTokens(
        embeds=torch.randn(n_tokens, backend.hidden_size, generator=g) * 0.02, num_frames=args.units,
        grid=(rows, cols), timestamps=np.arange(args.units) * 1.0, time_interval=2.0,
        frame_size=(rows * 28, cols * 28),
    )
    prompt = backend.prompt(QUESTION)
    budget = max(rows * cols, round(0.0625 * n_tokens))  # the paper's 6.25%
    arms = {"reference": FlexSelect(backend), "lite-torch": FlexSelect(backend, ranker),
            "lite-onnx": FlexSelect(backend, onnx_ranker)}
    times: dict[str, float] = {}
    kept = {}
    for name, pipe in arms.items():
        selector = "reference" if name == "reference" else "lite"
        runs = []
        for i in range(args.repeats + 1):
            sel = pipe.select(visual, prompt, options=SelectOptions(budget=budget, layer=REFERENCE_LAYER, set_frames=args.set_frames, selector=selector))
            if i:  # the first run is a warm-up (allocator, ONNX Runtime's first-run optimisations)
                runs.append(sel.seconds)
        times[name] = statistics.median(runs)
        kept[name] = sel.kept
    sets = -(-args.units // args.set_frames)
    result = {
        "host_lm": {**host_shape, "reference_layer": REFERENCE_LAYER, "scale": f"1/{args.scale} of Qwen2.5-VL-7B"},
        "ranker": {**ranker_shape, "scoring_layer": ranker.scoring_layer, "scale": f"1/{args.scale} of Qwen2-0.5B"},
        "visual_tokens": n_tokens, "frame_sets": sets, "tokens_per_set": n_tokens // sets, "kept": int(budget),
        "threads": torch.get_num_threads(), "onnx_export_s": round(export_s, 1),
        "select_s": {k: round(v, 3) for k, v in times.items()},
        "speedup_vs_reference": {k: round(times["reference"] / v, 2) for k, v in times.items() if k != "reference"},
        "onnx_vs_torch": round(times["lite-torch"] / times["lite-onnx"], 2),
        "lite_torch_onnx_same_kept": bool(torch.equal(kept["lite-torch"], kept["lite-onnx"])),
    }
    print(json.dumps(result, indent=2))
    print(f"selection stage, {n_tokens} visual tokens in {sets} set(s), median of {args.repeats}: "
          f"reference {times['reference']:.2f}s | Lite torch {times['lite-torch']:.2f}s "
          f"({result['speedup_vs_reference']['lite-torch']}x faster) | Lite ONNX {times['lite-onnx']:.2f}s "
          f"({result['speedup_vs_reference']['lite-onnx']}x faster; {result['onnx_vs_torch']}x vs torch)")


if __name__ == "__main__":
    main()
