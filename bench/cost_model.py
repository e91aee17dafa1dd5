"""The cost model of `flexselect.plan` checked against measurements on this machine, then its prediction at 7B.

Measured (side by side, each arm in its own process, the fastest of --repeats runs there, bench/ttft.py's random
0.5B-shape LM at the real 11 x 20 grid):
full-token baseline vs FlexSelect time to first token and peak memory, at the frame counts that fit here. Predicted:
the same arms' time from the model's config (`plan.estimate`: each pass's FLOPs plus its fixed cost, at this CPU's
`plan.measured_throughput`, measured first), the ratio baseline / FlexSelect; and the peak memory of the largest
stage against the measured peak RSS above the process's own. Checks: ratio within 15%, memory within 20%. Then the
model's predictions for Qwen2.5-VL-7B and Qwen3-VL-8B at 512 and 1024 frames (FLOPs alone: at those sizes a pass's
fixed cost is a rounding error, except the follow-up's question rows, which it leaves out).
The vision tower is left out of both sides (bench/ttft.py feeds random visual tokens), as it costs both arms alike.

    python bench/cost_model.py                   # 32 and 64 frames; writes bench/results/cost_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ttft  # noqa: E402  (the measured arms and the 0.5B shape)

RESULTS = Path(__file__).parent / "results"
GRID = (11, 20)
# The published configs (Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct): text stack and vision tower.
SHAPES_7B = {
    "Qwen2.5-VL-7B": {
        "model_type": "qwen2_5_vl",
        "text_config": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
        },
        "vision_config": {"hidden_size": 1280, "out_hidden_size": 3584, "depth": 32, "intermediate_size": 3420},
    },
    "Qwen3-VL-8B": {
        "model_type": "qwen3_vl",
        "text_config": {
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
        },
        "vision_config": {
            "hidden_size": 1152,
            "out_hidden_size": 4096,
            "depth": 27,
            "intermediate_size": 4304,
            "num_heads": 16,
            "patch_size": 16,
            "deepstack_visual_indexes": [8, 16, 24],
        },
    },
}


def predicted(shape, frames: int, budget: int, layer: int, set_frames: int, throughput) -> dict:
    from flexselect import plan

    # index=True: the measured first question builds the video index (the pipeline's default), two passes per set
    req = plan.request(
        shape, frames, GRID[1] * 28, GRID[0] * 28, budget, set_frames, layer, max_new_tokens=1, index=True
    )
    est = plan.estimate(shape, req, 4, materialised_attention=True)
    seconds = est.seconds(shape, throughput)
    # the baseline's answer pass holds every visual token, not the budget
    full = plan.request(
        shape, frames, GRID[1] * 28, GRID[0] * 28, req.visual_tokens, set_frames, layer, max_new_tokens=1
    )
    baseline = plan.estimate(shape, full, 4, materialised_attention=True)
    encode = plan.vision_flops(shape, req)
    encode_s = encode / throughput.flops_per_s
    return {
        "ratio": (seconds["baseline"] - encode_s) / (seconds["flexselect"] - encode_s),
        "seconds": {arm: seconds[arm] - encode_s for arm in ("baseline", "flexselect")},
        "flops_ratio": (est.flops["baseline"] - encode) / (est.flops["flexselect"] - encode),
        "flops": {
            "baseline": est.flops["baseline"] - encode,
            "scoring": est.flops["flexselect"] - encode - est.flops["answer_pass"],
            "answer": est.flops["answer_pass"],
        },
        "baseline_bytes": baseline.device_bytes["answer_pass"] - est.device_bytes["weights"],
        "flexselect_bytes": max(est.device_bytes[s] for s in ("scoring_pass", "answer_pass", "video_index"))
        - est.device_bytes["weights"],
        "weights_bytes": est.device_bytes["weights"],
        "request": req,
    }


def main() -> int:
    import torch

    from flexselect import plan

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[32, 64])
    p.add_argument("--set-frames", type=int, default=8, help="units per frame set, so that several sets run")
    p.add_argument("--layer", type=int, default=17)
    p.add_argument("--time-limit", type=float, default=900)
    p.add_argument("--repeats", type=int, default=3, help="runs of each arm in its process; the fastest counts")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    # torch's threads (OMP_NUM_THREADS); on a shared, oversubscribed CPU one pinned thread avoids the barrier stalls
    # that otherwise grow with the number of ops, i.e. with the number of passes
    threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    shape = plan.model_shape(ttft.bench_config().to_dict())
    throughput = plan.measured_throughput("cpu", torch.float32, shape)
    print(
        f"this CPU: {throughput.flops_per_s / 1e9:.0f} GFLOP/s on large products, {throughput.pass_rows:.0f} rows' "
        f"worth per pass ({threads} threads)"
    )
    rows, ok = [], True
    for frames in args.frames:
        budget = frames // 2 * GRID[0] * GRID[1] // 4  # a quarter of the tokens
        ns = argparse.Namespace(
            grid=list(GRID),
            budget=budget,
            layer=args.layer,
            device="cpu",
            dtype="float32",
            time_limit=args.time_limit,
            set_frames=args.set_frames,
            repeats=args.repeats,
        )
        load = os.getloadavg()[0]
        measured = {arm: ttft.run_isolated(ns, arm, frames) for arm in ("baseline", "flexselect")}
        if any("error" in m for m in measured.values()):
            rows.append({"frames": frames, "error": {a: m.get("error") for a, m in measured.items()}})
            ok = False
            continue
        pred = predicted(shape, frames, budget, args.layer, args.set_frames, throughput)
        ratio = measured["baseline"]["ttft_s"] / measured["flexselect"]["ttft_s"]
        row = {
            "frames": frames,
            "visual_tokens": measured["baseline"]["visual_tokens"],
            "measured_ratio": ratio,
            "predicted_ratio": pred["ratio"],
            "ratio_error": pred["ratio"] / ratio - 1,
            "flops_ratio": pred["flops_ratio"],  # FLOPs alone, without the passes' fixed cost
            "predicted_seconds": pred["seconds"],
            "load_1m": [load, os.getloadavg()[0]],  # before and after: this machine is shared
            "seconds": {
                "baseline": measured["baseline"]["ttft_s"],
                "scoring": measured["flexselect"]["select_s"],
                "answer": measured["flexselect"]["ttft_s"] - measured["flexselect"]["select_s"],
            },
            "flops": pred["flops"],
        }
        for arm in ("baseline", "flexselect"):
            above = (measured[arm]["peak_memory_mb"]["process_rss"] - measured[arm]["start_rss_mb"]) * 2**20
            est = pred[f"{arm}_bytes"] + pred["weights_bytes"]
            row[f"{arm}_memory_error"] = est / above - 1
        ok &= abs(row["ratio_error"]) <= 0.15
        ok &= all(abs(row[f"{a}_memory_error"]) <= 0.20 for a in ("baseline", "flexselect"))
        rows.append(row)
        print(
            f"{frames} frames ({row['visual_tokens']} tokens): baseline/FlexSelect TTFT measured {ratio:.2f}x, "
            f"predicted {pred['ratio']:.2f}x ({row['ratio_error']:+.0%}; FLOPs alone {pred['flops_ratio']:.2f}x), "
            f"TTFT measured / predicted {measured['baseline']['ttft_s']:.1f} / {pred['seconds']['baseline']:.1f} s "
            f"(baseline), {measured['flexselect']['ttft_s']:.1f} / {pred['seconds']['flexselect']:.1f} s "
            "(FlexSelect); peak memory estimate "
            f"{row['baseline_memory_error']:+.0%} (baseline), {row['flexselect_memory_error']:+.0%} (FlexSelect)"
        )
    predictions = {}
    for name, config in SHAPES_7B.items():
        s = plan.model_shape(config)
        for frames in (512, 1024):
            req = plan.request(s, frames, 20 * s.pixels_per_token, 11 * s.pixels_per_token)  # 11 x 20 tokens
            f = plan.estimate(s, req, 2, materialised_attention=False).flops
            predictions[f"{name} @ {frames} frames"] = {
                "visual_tokens": req.visual_tokens,
                "baseline_over_flexselect": f["baseline"] / f["flexselect"],
                "baseline_over_followup": f["baseline"] / f["followup_indexed"],
            }
            print(
                f"{name}, {frames} frames ({req.visual_tokens} tokens): predicted TTFT full / FlexSelect "
                f"{f['baseline'] / f['flexselect']:.1f}x, full / indexed follow-up "
                f"{f['baseline'] / f['followup_indexed']:.1f}x (vision encode included)"
            )
    RESULTS.mkdir(exist_ok=True)
    speed = {"flops_per_s": throughput.flops_per_s, "pass_rows": throughput.pass_rows}
    out = {"threads": threads, "throughput": speed, "checks": rows, "predictions": predictions}
    (RESULTS / "cost_model.json").write_text(json.dumps(out, indent=1))
    print("cost model check:", "within bounds" if ok else "OUT OF BOUNDS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
