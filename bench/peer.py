"""The peer, side by side in one run: llama.cpp's own video input vs flexselect on the same GGUF and the same video.

What a user would run instead of us is `llama-mtmd-cli --video` (the vendored llama.cpp has it, with MTMD_VIDEO on):
it pipes the clip through the `ffmpeg` binary at `--video-fps` (default 4), every frame of the whole clip, merges
frame pairs for Qwen-VL, adds a text timestamp every 5 s, and prefills all of it before the first answer token.
`bash bench/build_llama_tools.sh` builds that binary from the llama.cpp our runtime builds on (portable and native)
and our CLI natively; arms whose build is missing are left out. Each arm a fresh process under `/usr/bin/time -v`
(peak RSS), at several video lengths:

    llama-mtmd-cli --video  llama.cpp's own CLI, every visual token (the peer; portable, as build/)
    llama-mtmd-cli native   the same built with GGML_NATIVE=ON
    libmtmd driver          bench/peer_mtmd.py: the binary's libmtmd calls through llama-cpp-python's libmtmd (the
                            peer where the binary is not built; tests/test_bench_peer.py runs it)
    C++ full                flexselect-cli keeping every token (the peer's prefill in our runtime)
    C++ FlexSelect          flexselect-cli, FlexSelect at --budget
    C++ FlexSelect native   the same, built with GGML_NATIVE=ON
    Python llama.cpp        flexselect answer --gguf, FlexSelect
    Python llama.cpp native the same on a GGML_NATIVE=ON libllama (LLAMA_CPP_LIB_PATH)
    Python transformers     flexselect answer --model, FlexSelect (float32 torch)

All llama.cpp runs share one context size (-c: a full-token prompt that does not fit is a run that does not complete)
and llama.cpp's default f16 KV. Every arm runs one thread pinned to one core (taskset, OMP_NUM_THREADS=1): on a
shared, oversubscribed CPU two spinning threads lose far more to each other's preemption than they gain. The model is
a random Qwen2.5-VL whose LM has Qwen2-0.5B's layer shape (896 wide, 14 heads, 2 KV heads, FFN 4864; 8 layers) and a
scaled vision tower (8 blocks x 320), exported to GGUF f16 + mmproj; random weights time the same as trained ones.
Frames are 112x168 at 2 fps (4 x 6 = 24 tokens per frame pair); every arm sees all of them (the peer at 2 fps).

    python bench/peer.py                              # 16 / 32 / 64 / 128 frames, -c 1024, FlexSelect keeps 96

TTFT is from the start of work on the video (after model loading) to the first answer token: our CLIs report it in
their --json stats (decode + encode + select + first token), the peer driver measures the same span, and for
llama-mtmd-cli it is read off the clock of its output (`mtmd_cli_times`). Writes
bench/results/peer.{json,txt}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LM = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=8, num_attention_heads=14, num_key_value_heads=2)
VISION = dict(depth=8, hidden_size=320, intermediate_size=864, num_heads=4, fullatt_block_indexes=[3, 7])
WIDTH, HEIGHT, FPS = 168, 112, 2.0
TOKENS_PER_PAIR = (HEIGHT // 28) * (WIDTH // 28)
QUESTION = "What is the red square next to?"


def build_model(root: Path) -> tuple[Path, Path, Path]:
    import flexselect.tiny as tiny
    from flexselect_export.gguf import export_gguf

    head_dim = LM["hidden_size"] // LM["num_attention_heads"]
    t = head_dim // 2 // 4  # Qwen2.5-VL's 16/24/24 split of 64 rotary frequencies, scaled to this head size
    sections = [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2]
    saved = tiny.TINY_TEXT, tiny.TINY_VISION
    rope = {**saved[0]["rope_parameters"], "mrope_section": sections}
    tiny.TINY_TEXT = dict(tiny.TINY_TEXT, **LM, rope_parameters=rope)
    tiny.TINY_VISION = dict(tiny.TINY_VISION, **VISION, out_hidden_size=LM["hidden_size"])
    try:
        model_dir = tiny.build_tiny_qwen2_5_vl(root / "peer-qwen2_5_vl-896x8")
    finally:
        tiny.TINY_TEXT, tiny.TINY_VISION = saved
    gguf_dir = root / "peer-gguf-896x8-f16"
    if not (gguf_dir / "model.gguf").is_file():
        export_gguf(model_dir, gguf_dir, "f16")
    return model_dir, gguf_dir / "model.gguf", gguf_dir / "mmproj.gguf"


def timed_run(cmd: list[str], env: dict | None = None, limit: float = 900) -> dict:
    """Run under /usr/bin/time -v; stdout and stderr are read as they arrive, each chunk stamped."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", "taskset", "-c", "0", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    chunks: dict[str, list[tuple[float, bytes]]] = {"out": [], "err": []}

    def pump(stream, name):
        while data := os.read(stream.fileno(), 65536):
            chunks[name].append((time.perf_counter() - t0, data))

    threads = [threading.Thread(target=pump, args=(s, n)) for s, n in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for th in threads:
        th.start()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    err = b"".join(c for _, c in chunks["err"]).decode(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return {
        "rc": rc,
        "wall_s": wall,
        "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None,
        "chunks": chunks,
        "stdout": b"".join(c for _, c in chunks["out"]).decode(errors="replace"),
        "stderr": err,
    }


def ours(run: dict) -> dict:
    if run["rc"] != 0:
        return {"ok": False, "error": last_error(run["stderr"])}
    out = json.loads(run["stdout"].strip().splitlines()[-1])
    s = out["stats"]["seconds"]
    return {
        "ok": True,
        "ttft_s": s["decode"] + s["encode"] + s["select"] + s["ttft_answer"],
        "total_s": s["total"],
        "stages": {k: s[k] for k in ("decode", "encode", "select", "ttft_answer")},
        "visual_tokens": out["stats"]["visual_tokens"],
        "kept_tokens": out["stats"]["kept_tokens"],
        "answer_token_ids": out.get("answer_token_ids"),
    }


def last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("\t") and "Command " not in ln]
    errs = [ln for ln in lines if re.search(r"error|fail|exceed|too long|context", ln, re.I)]
    last = (errs or lines or ["?"])[-1].strip()
    return re.sub(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ", "", last)[:200]  # llama.cpp's log prefix: time and level


def peer(run: dict) -> dict:
    """bench/peer_mtmd.py: llama.cpp's video path, its own JSON line."""
    if run["rc"] != 0:
        return {"ok": False, "error": last_error(run["stderr"])}
    out = json.loads(run["stdout"].strip().splitlines()[-1])
    return {"ok": True, "ttft_s": out["ttft_s"], "total_s": out["total_s"], "prompt_tokens": out["prompt_tokens"]}


def mtmd_cli_times(chunks: dict[str, list[tuple[float, bytes]]]) -> tuple[float, float] | None:
    """TTFT and total seconds of a llama-mtmd-cli run from the times its output arrived. Its single-turn mode logs a
    warning to stderr once model and projector are loaded (the start: what follows is work on the video), ends the
    prompt's evaluation with a newline on stdout and then prints each answer token as it is sampled, flushed."""
    start = next((t for t, c in chunks["err"] if b"experimental CLI" in c), None)
    seen, prefilled, first = b"", None, None
    for t, c in chunks["out"]:
        seen += c
        if prefilled is None and b"\n" in seen:
            prefilled = t
        if prefilled is not None and len(seen) > seen.index(b"\n") + 1:
            first = t
            break
    first = first if first is not None else prefilled  # an answer that ended at once: the prefill is the TTFT
    if start is None or first is None:
        return None
    return first - start, chunks["out"][-1][0] - start


def mtmd_cli(run: dict) -> dict:
    if run["rc"] != 0:
        return {"ok": False, "error": last_error(run["stderr"])}
    times = mtmd_cli_times(run["chunks"])
    if times is None:
        return {"ok": False, "error": "llama-mtmd-cli printed no start mark or no answer"}
    tokens = re.search(r"prompt eval time =.*?/\s*(\d+) tokens", run["stderr"])
    prompt_tokens = int(tokens.group(1)) if tokens else None
    return {"ok": True, "ttft_s": times[0], "total_s": times[1], "prompt_tokens": prompt_tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--budget", type=int, default=96, help="visual tokens FlexSelect keeps")
    ap.add_argument("--set-frames", type=int, default=8, help="frame pairs per scoring set")
    ap.add_argument("--ctx", type=int, default=1024, help="llama.cpp context size, the same for every llama.cpp run")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--cli", default=str(ROOT / "build" / "bin" / "flexselect-cli"))
    ap.add_argument("--cli-native", default=str(ROOT / "build-native" / "bin" / "flexselect-cli"))
    ap.add_argument("--native-lib", default=str(ROOT / "build-llama-native" / "bin"), help="GGML_NATIVE=ON libllama")
    ap.add_argument("--mtmd-cli", default=str(ROOT / "build-llama" / "bin" / "llama-mtmd-cli"))
    ap.add_argument("--mtmd-cli-native", default=str(ROOT / "build-llama-native" / "bin" / "llama-mtmd-cli"))
    ap.add_argument("--arms", nargs="+", help="only these arms (names as printed)")
    ap.add_argument("--limit", type=float, default=600, help="seconds per run before it counts as not completing")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each arm; the fastest counts")
    ap.add_argument("--cache", default=os.environ.get("FLEXSELECT_BENCH_DIR", Path(tempfile.gettempdir()) / "fs-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "peer.json"))
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if not Path(args.cli).is_file():
        sys.exit(f"{args.cli} not found: build the C++ runtime first (cmake --build build --target flexselect-cli)")

    from flexselect.video import write_test_video

    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    model_dir, gguf, mmproj = build_model(root)
    threads = "1"  # see the docstring: one core each, pinned
    gen = ["--max-new-tokens", str(args.max_new_tokens), "--set-frames", str(args.set_frames), "--json"]
    py = [sys.executable, "-m", "flexselect.cli", "answer"]
    native_env = {"LLAMA_CPP_LIB_PATH": args.native_lib, "MTMD_CPP_LIB": args.native_lib}

    def arms(video: Path, frames: int) -> dict[str, tuple[list[str], dict | None, callable]]:
        tokens = frames // 2 * TOKENS_PER_PAIR
        cpp = [
            *("-m", gguf, "--mmproj", mmproj, "--video", video, "-p", QUESTION, "-c", args.ctx, "-ngl", 0, "-t"),
            *(threads, "--frames", frames, *gen),
        ]
        pyl = [*py, video, QUESTION, "--gguf", gguf, "--mmproj", mmproj, "--n-ctx", args.ctx, "-ngl", 0]
        pyl += ["--frames", frames, "--budget", args.budget, *gen]
        mtmd = [*("-m", gguf, "--mmproj", mmproj, "--video", video, "-p", QUESTION, "--video-fps", FPS, "-c"),
                *(args.ctx, "-n", args.max_new_tokens, "-t", threads, "-ngl", 0, "--temp", 0)]  # fmt: skip
        table = {
            "llama-mtmd-cli --video": ([args.mtmd_cli, *mtmd], None, mtmd_cli),
            "llama-mtmd-cli native": ([args.mtmd_cli_native, *mtmd], None, mtmd_cli),
            "libmtmd driver": (
                [sys.executable, HERE / "peer_mtmd.py", gguf, mmproj, video, QUESTION, "--fps", FPS]
                + ["--ctx", args.ctx, "-n", args.max_new_tokens, "-t", threads],
                None,
                peer,
            ),
            "C++ full": ([args.cli, *cpp, "--budget", tokens], None, ours),
            "C++ FlexSelect": ([args.cli, *cpp, "--budget", args.budget], None, ours),
            "C++ FlexSelect native": ([args.cli_native, *cpp, "--budget", args.budget], None, ours),
            "Python llama.cpp": (pyl, None, ours),
            "Python llama.cpp native": (pyl, native_env, ours),
            "Python transformers": (
                [*py, video, QUESTION, "--model", model_dir, "--device", "cpu", "--dtype", "float32"]
                + ["--frames", frames, "--budget", args.budget, *gen],
                None,
                ours,
            ),
        }
        if Path(args.mtmd_cli).is_file():
            del table["libmtmd driver"]  # the binary itself is the peer
        else:
            del table["llama-mtmd-cli --video"]
        if not Path(args.mtmd_cli_native).is_file():
            del table["llama-mtmd-cli native"]
        if not Path(args.cli_native).is_file():
            del table["C++ FlexSelect native"]
        if not (Path(args.native_lib) / "libllama.so").is_file():
            del table["Python llama.cpp native"]
        return {k: v for k, v in table.items() if not args.arms or k in args.arms}

    results: list[dict] = []
    for frames in args.frames:
        video = write_test_video(
            root / f"peer-{frames}.mp4", num_frames=frames, fps=FPS, width=WIDTH, height=HEIGHT,
            needle_frames=(frames // 3,),
        )  # fmt: skip
        table = arms(video, frames)
        runs: dict[str, list[dict]] = {name: [] for name in table}
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every arm alike
            for name, (cmd, env, parse) in table.items():
                load = os.getloadavg()[0]
                run = timed_run([str(c) for c in cmd], env, args.limit)
                row = {"arm": name, "frames": frames, "visual_tokens": frames // 2 * TOKENS_PER_PAIR, "load_1m": load}
                row |= parse(run) if run["rc"] != -9 else {"ok": False, "error": f"over the {args.limit:.0f} s limit"}
                row |= {"process_wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"]}
                done = f"TTFT {row['ttft_s']:.2f} s, total {row['total_s']:.2f} s" if row["ok"] else row["error"]
                print(f"{frames:4d} frames  {name:24s} {done}; RSS {row['peak_rss_mb'] or 0:.0f} MB", file=sys.stderr)
                runs[name].append(row)
        for rows in runs.values():  # the fastest completed run of each arm, or its last failure
            done = [r for r in rows if r["ok"]]
            results.append(min(done, key=lambda r: r["ttft_s"]) if done else rows[-1])
            results[-1]["ttft_runs_s"] = [r["ttft_s"] for r in done]

    lines = report(results, args)
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) for k, v in vars(args).items()} | {"lm": LM, "vision": VISION, "frame": [HEIGHT, WIDTH]}
    out.write_text(json.dumps({"config": config, "runs": results}, indent=1))
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return 0


def report(results: list[dict], args) -> list[str]:
    names = list(dict.fromkeys(r["arm"] for r in results))
    lines = [
        f"random Qwen2.5-VL (LM {LM['num_hidden_layers']} layers of Qwen2-0.5B's shape, GGUF f16; transformers "
        f"float32), CPU, 1 thread pinned to one core; {HEIGHT}x{WIDTH} frames at {FPS:g} fps -> {TOKENS_PER_PAIR} "
        f"tokens per frame pair; llama.cpp "
        f"context {args.ctx}; FlexSelect keeps {args.budget} tokens from sets of {args.set_frames} pairs; the fastest "
        f"of {args.repeats} run(s) per arm",
        "",
        f"{'frames (tokens)':18s}{'arm':26s}{'TTFT s':>9s}{'total s':>9s}{'RSS MB':>8s}{'vs peer':>9s}  load",
    ]
    for frames in dict.fromkeys(r["frames"] for r in results):
        rows = {r["arm"]: r for r in results if r["frames"] == frames}
        peer = rows.get("llama-mtmd-cli --video") or rows.get("libmtmd driver")
        for name in names:
            r = rows.get(name)
            if r is None:
                continue
            head = f"{frames} ({r['visual_tokens']})" if name == names[0] else ""
            rss = f"{r['peak_rss_mb']:8.0f}" if r["peak_rss_mb"] else f"{'-':>8s}"
            if not r["ok"]:
                lines.append(f"{head:18s}{name:26s}{'fails: ' + r['error'][:60]:>26s}  {r['load_1m']:.1f}")
                continue
            vs = f"{peer['ttft_s'] / r['ttft_s']:8.2f}x" if peer and peer["ok"] and r is not peer else " " * 9
            if peer and not peer["ok"] and r is not peer:
                vs = f"{'only us':>9s}"
            lines.append(f"{head:18s}{name:26s}{r['ttft_s']:9.2f}{r['total_s']:9.2f}{rss}{vs}  {r['load_1m']:.1f}")
    lines.append("\nvs peer: the peer's TTFT / this arm's (above 1: we answer sooner); load: 1-min load")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
