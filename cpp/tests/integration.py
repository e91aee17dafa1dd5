"""Integration test of flexselect-cli on the tiny fixture (see make_fixture.py). Run by CTest, once per CLI build
(plain and ASan+UBSan):

    python cpp/tests/integration.py --cli build/bin/flexselect-cli --fixture build/fixture

1. The CLI runs end to end (reference-layer selection and an ONNX Lite ranker) and its --json output is consistent.
2. Same kept visual tokens and same greedy answer tokens as the Python llama.cpp backend (FlexSelect.load(gguf=...)),
   with and without the ranker. Skipped, and said so, while that backend is not importable.
3. Cross-check of positions and scoring against the transformers backend on the same checkpoint: different numerics
   (and FFmpeg builds), so the kept sets must agree on at least 90% of their tokens, not exactly.
4. Bad inputs: one clear message on stderr and exit status 2 each, never a crash.
On a Qwen3-VL / Qwen3.5 fixture (`fixture.json`'s family; make_fixture.py), `qwen3` checks that family instead.
Exit status 0 = pass, 1 = fail. Sanitizer reports fail the test (the CLI's exit status and stderr are checked).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

N_FRAMES, BUDGET, SET_FRAMES, LAYER, MAX_NEW = 24, 60, 4, 3, 8
QUESTION = "What is the color of the car in the video?"
FOLLOW_UP = "How many people appear in the video?"
FAILURES: list[str] = []


def check(cond: bool, what: str) -> None:
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)


def run_cli(
    cli: str, fx: Path, *extra: str, questions=(QUESTION,), stdin: bool = False, expect_ok: bool = True, env=None
) -> subprocess.CompletedProcess:
    """The CLI on the fixture with the test's sampling and selection flags (f32 KV cache, as the Python side);
    `questions` as -p flags, or (stdin) one per line on standard input."""
    cmd = [
        cli,
        "-m",
        str(fx / "model.gguf"),
        "--mmproj",
        str(fx / "mmproj.gguf"),
        "--video",
        str(fx / "clip.mp4"),
        *([] if stdin else [x for q in questions for x in ("-p", q)]),
        "--frames",
        str(N_FRAMES),
        "--budget",
        str(BUDGET),
        "--set-frames",
        str(SET_FRAMES),
        "--max-new-tokens",
        str(MAX_NEW),
        "-t",
        "2",
        "--kv-f32",
        *extra,
    ]
    r = subprocess.run(
        cmd, capture_output=True, input="\n\n".join(questions).encode() + b"\n" if stdin else None, env=env
    )
    if expect_ok and r.returncode != 0:
        print(r.stderr.decode(errors="replace"))
    return r


def json_lines(r: subprocess.CompletedProcess) -> list[dict]:
    """One object per question (--json), or none if the run failed."""
    return [json.loads(x) for x in r.stdout.decode().splitlines()] if r.returncode == 0 else []


def multi_question(cli: str, fx: Path, single: dict, indexed: bool = True) -> None:
    """Several questions in one run give what single runs give; follow-ups reuse the first question's index (a
    hybrid model, `indexed` False: no index, said in a notice, every question rescored)."""
    questions = [QUESTION, FOLLOW_UP, QUESTION]
    layer = ("--layer", str(LAYER))
    lines = json_lines(run_cli(cli, fx, "--json", *layer, questions=[QUESTION, FOLLOW_UP]))
    check(len(lines) == 2, "two -p flags: two JSON lines")
    if len(lines) != 2:
        return
    follow = (json_lines(run_cli(cli, fx, "--json", *layer, questions=[FOLLOW_UP])) or [{}])[0]
    for how, stdin in (("-p flags", False), ("standard input", True)):
        r = run_cli(cli, fx, "--json", *layer, questions=questions, stdin=stdin)
        out = json_lines(r)
        check(len(out) == 3 and sanitizer_clean(r), f"three questions on {how}: three JSON lines")
        if len(out) != 3:
            continue
        for i, want in enumerate((single, follow, single)):
            check(
                out[i]["kept_token_indices"] == want.get("kept_token_indices")
                and out[i]["answer_token_ids"] == want.get("answer_token_ids"),
                f"{how}: question {i + 1} keeps and answers as its single run",
            )
        ix = [o["stats"]["index"] for o in out]
        n_sets = out[0]["stats"]["frame_sets"]
        if indexed:
            check(
                ix[0]["built_sets"] == n_sets
                and ix[1]["reused_sets"] == ix[2]["reused_sets"] == n_sets
                and ix[1]["saved_s"] > 0
                and out[1]["stats"]["video_cached"],
                f"{how}: follow-ups reuse the index",
            )
        else:
            check(
                not any(i["used"] for i in ix) and b"notice: no video index for a hybrid model" in r.stderr,
                f"{how}: hybrid model: no index, and a notice says so",
            )
    if not indexed:
        return
    out = json_lines(run_cli(cli, fx, "--json", *layer, "--no-index", questions=questions))
    check(
        len(out) == 3
        and out[1]["kept_token_indices"] == follow.get("kept_token_indices")
        and not out[1]["stats"]["index"]["used"],
        "--no-index: same results, no index",
    )
    rt = run_cli(cli, fx, *layer, questions=questions[:2])
    # a random model's answer may hold newlines or bytes that are not UTF-8: count the per-answer stderr reports
    check(
        rt.returncode == 0 and rt.stderr.count(b"evidence: ") == 2 and b"index: reused" in rt.stderr,
        "text mode: two answers, each with its evidence, the index reuse on stderr",
    )


def sanitizer_clean(r: subprocess.CompletedProcess) -> bool:
    err = r.stderr.decode(errors="replace")
    return "ERROR: AddressSanitizer" not in err and "runtime error:" not in err and "LeakSanitizer" not in err


def make_rankers(fx: Path, n_embd: int) -> tuple[Path, Path]:
    """A tiny ONNX ranker (score = visual . w + 0 * mean(ids)) of the expected I/O, and one of the wrong width."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def build(path: Path, d: int) -> Path:
        w = np.random.default_rng(1).standard_normal((d, 1)).astype(np.float32)
        nodes = [
            helper.make_node("MatMul", ["visual_embeds", "w"], ["s2"]),
            helper.make_node("Squeeze", ["s2", "axis1"], ["s"]),
            helper.make_node("Cast", ["question_ids"], ["idf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["idf"], ["m"], keepdims=0),
            helper.make_node("Mul", ["m", "zero"], ["m0"]),
            helper.make_node("Add", ["s", "m0"], ["scores"]),
        ]
        graph = helper.make_graph(
            nodes,
            "tiny_ranker",
            [
                helper.make_tensor_value_info("visual_embeds", TensorProto.FLOAT, ["n", d]),
                helper.make_tensor_value_info("question_ids", TensorProto.INT64, ["t"]),
            ],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n"])],
            [
                numpy_helper.from_array(w, "w"),
                numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(path))
        return path

    return build(fx / "ranker.onnx", n_embd), build(fx / "ranker_wrong_width.onnx", n_embd // 2)


def python_llama_cpp(fx: Path, ranker: Path | None, layer: int | None = LAYER):
    """The Python llama.cpp pipeline's kept tokens, answer tokens and evidence, or None (and why) if it is not there
    yet. Same runtime settings as the CLI here: f32 KV cache, 2 threads; `layer` None: the family's default."""
    try:
        from flexselect.backends.base import GenerationConfig
        from flexselect.backends.llama_cpp import LlamaCppBackend
        from flexselect.pipeline import FlexSelect, Sampling, SelectOptions
    except ImportError as e:
        return None, f"Python llama.cpp backend not importable ({e})"
    backend = LlamaCppBackend(fx / "model.gguf", fx / "mmproj.gguf", n_gpu_layers=0, n_threads=2, kv_f32=True)
    pipe = FlexSelect(backend)  # it indexes the video on the first question; the CLI scores one question plainly
    if ranker is not None:
        pipe = pipe.with_ranker(ranker)
    options = SelectOptions(budget=BUDGET, layer=None if ranker else layer, set_frames=SET_FRAMES)
    a = pipe.answer(
        fx / "clip.mp4",
        QUESTION,
        sampling=Sampling(frames=N_FRAMES),
        options=options,
        generation=GenerationConfig(max_new_tokens=MAX_NEW),
    )
    return (a.selection.kept.tolist(), list(a.generation.token_ids), [r.to_dict() for r in a.evidence]), ""


def transformers_kept(fx: Path, model_dir: Path, layer: int = LAYER) -> list[int]:
    """Kept tokens from the transformers backend (the pipeline's own selection) on frames decoded with PyAV at the
    CLI's sample indices."""
    import av
    import numpy as np

    from flexselect.backends import load_backend
    from flexselect.pipeline import FlexSelect, SelectOptions
    from flexselect.video import Clip, probe

    with av.open(str(fx / "clip.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        rate = float(c.streams.video[0].average_rate)
    n = len(frames)
    idx = [((2 * i + 1) * n) // (2 * N_FRAMES) for i in range(N_FRAMES)]  # centres of equal segments
    clip = Clip(
        np.stack([frames[i] for i in idx]),
        np.array(idx) / rate,
        str(fx / "clip.mp4"),
        probe(fx / "clip.mp4"),
        sample_fps=N_FRAMES / (n / rate),
    )  # as the CLI's uniform sampling
    pipe = FlexSelect(load_backend(model_dir, device="cpu", dtype="float32"))
    visual, _ = pipe.encode(clip)
    selection = pipe.select(
        visual,
        pipe.backend.prompt(QUESTION),
        SelectOptions(budget=BUDGET, layer=layer, set_frames=SET_FRAMES, aggregate="max"),
    )
    return selection.kept.tolist()


def expect_error(cli: str, name: str, args: list[str], needle: str) -> None:
    """Exit status 2 and exactly one stderr line holding `needle`."""
    r = subprocess.run([cli, *args], capture_output=True)
    err = r.stderr.decode(errors="replace")
    lines = [ln for ln in err.strip().splitlines() if ln]
    ok = r.returncode == 2 and needle in err and len(lines) == 1 and sanitizer_clean(r)
    check(ok, f"bad input: {name} -> exit 2 with '{needle}'" + ("" if ok else f" (got {r.returncode}: {err!r})"))


def bad_inputs(cli: str, fx: Path, ranker_wrong: Path, tmp: Path) -> None:
    garbage = tmp / "garbage.bin"
    garbage.write_bytes(b"this is not a model or a video\n" * 64)
    mismatched = tmp / "mmproj_other_width.gguf"
    shutil.copy(fx / "mmproj.gguf", mismatched)
    from gguf import GGUFReader

    reader = GGUFReader(str(mismatched), "r+")  # same projector, but claiming another embedding width
    field = reader.fields["clip.vision.projection_dim"]
    field.parts[field.data[0]][0] = 32
    del reader

    expect = functools.partial(expect_error, cli)
    m, mm, v = str(fx / "model.gguf"), str(fx / "mmproj.gguf"), str(fx / "clip.mp4")
    base = ["-p", QUESTION, "--frames", "8", "--max-new-tokens", "2"]
    expect("missing model", ["-m", str(tmp / "nope.gguf"), "--mmproj", mm, "--video", v, *base], "model not found")
    expect("corrupt model", ["-m", str(garbage), "--mmproj", mm, "--video", v, *base], "not a valid GGUF")
    expect("no --mmproj", ["-m", m, "--video", v, *base], "--mmproj is required")
    expect("missing mmproj", ["-m", m, "--mmproj", str(tmp / "nope.gguf"), "--video", v, *base], "mmproj not found")
    expect("corrupt mmproj", ["-m", m, "--mmproj", str(garbage), "--video", v, *base], "not a valid GGUF")
    expect("mmproj of another model", ["-m", m, "--mmproj", str(mismatched), "--video", v, *base], "does not belong")
    expect("missing video", ["-m", m, "--mmproj", mm, "--video", str(tmp / "nope.mp4"), *base], "cannot open video")
    expect("unreadable video", ["-m", m, "--mmproj", mm, "--video", str(garbage), *base], "video")
    expect(
        "prompt larger than n_ctx",
        ["-m", m, "--mmproj", mm, "--video", v, *base, "--frames", "48", "-c", "64"],
        "--budget",
    )
    expect(
        "budget larger than the video",
        ["-m", m, "--mmproj", mm, "--video", v, *base, "--budget", "100000"],
        "larger than the video",
    )
    expect("layer out of range", ["-m", m, "--mmproj", mm, "--video", v, *base, "--layer", "99"], "out of range")
    expect("empty question", ["-m", m, "--mmproj", mm, "--video", v, "-p", "  "], "question is empty")
    # Internally 0 / -1 mean "the default": an explicit 0, negative or NaN value is refused, never read as it.
    whole, above = "must be a whole number >=", "must be a number >"
    for flag, value, needle in [
        ("--frames", "0", f"{whole} 1"),
        ("--fps", "0", f"{above} 0"),
        ("--fps", "nan", "expects a finite number"),
        ("--fps", "-2", f"{above} 0"),
        ("--budget", "0", f"{whole} 1"),
        ("--set-frames", "0", f"{whole} 1"),
        ("--max-frames", "0", f"{whole} 1"),
        ("--max-side", "0", f"{whole} 28"),
        ("--start", "-5", f"{above}= 0"),
        ("--layer", "-1", f"{whole} 0"),
        ("--temp", "nan", "expects a finite number"),
        ("--frames", "99999999999", "expects an integer"),
    ]:
        expect(f"{flag} {value}", ["-m", m, "--mmproj", mm, "--video", v, *base, flag, value], f"{flag} {needle}")
    expect("unknown option", ["--nope"], "unknown option")
    if has_onnxruntime(cli):
        expect(
            "ranker of another model",
            ["-m", m, "--mmproj", mm, "--video", v, *base, "--ranker", str(ranker_wrong)],
            "does not match",
        )
        expect(
            "corrupt ranker",
            ["-m", m, "--mmproj", mm, "--video", v, *base, "--ranker", str(garbage)],
            "cannot load ranker",
        )
    else:
        expect(
            "--ranker without ONNX Runtime",
            ["-m", m, "--mmproj", mm, "--video", v, *base, "--ranker", str(ranker_wrong)],
            "without ONNX Runtime",
        )


def qwen3(cli: str, fx: Path, family: str, info: dict, skip_python: bool) -> None:
    """Qwen3-VL / Qwen3.5 (dense and MoE) GGUFs: the family's default layer and frame size, exact agreement with the
    Python llama.cpp pipeline, near agreement with transformers, several questions, the family's refusals."""
    from flexselect.backends.gguf_info import inspect_gguf
    from flexselect.defaults import reference_layer_for

    text = inspect_gguf(fx / "model.gguf")
    recurrent = set(text.get("recurrent_layers", []))
    full = [i for i in range(text["block_count"]) if i not in recurrent]
    hybrid = len(full) < text["block_count"]
    default = reference_layer_for(family, text["block_count"], tuple(full))
    r = run_cli(cli, fx, "--json")  # the family's default reference layer
    check(r.returncode == 0 and sanitizer_clean(r), f"{family}: CLI runs")
    if r.returncode != 0:
        return
    out = json.loads(r.stdout)
    s = out["stats"]
    check(
        s["reference_layer"] == default and b"was never measured" in r.stderr,
        f"{family}: default reference layer {default} (the Python rule), with the 'never measured' warning",
    )
    h, w = info["video"]["height"], info["video"]["width"]
    check(
        s["frame_size"] == [h, w] and s["tokens_per_frame"] == (h // 32) * (w // 32),
        f"{family}: frames at multiples of 32, {s['tokens_per_frame']} tokens per unit",
    )
    want = min(-(-BUDGET // s["tokens_per_frame"]) * s["tokens_per_frame"], s["visual_tokens"])
    check(len(out["kept_token_indices"]) == want == s["kept_tokens"], f"{family}: kept {want} tokens")
    single = json_lines(run_cli(cli, fx, "--json", "--layer", str(LAYER)))
    check(bool(single) and single[0]["stats"]["reference_layer"] == LAYER, f"{family}: --layer {LAYER}")
    uncut = json_lines(run_cli(cli, fx, "--json", env=dict(os.environ, FLEXSELECT_NO_CUT="1")))
    check(
        bool(uncut) and uncut[0]["kept_token_indices"] == out["kept_token_indices"],
        f"{family}: cut after layer {default} = no cut",
    )
    if single:
        multi_question(cli, fx, single[0], indexed=not hybrid)

    m, mm, v = str(fx / "model.gguf"), str(fx / "mmproj.gguf"), str(fx / "clip.mp4")
    base = ["-m", m, "--video", v, "-p", QUESTION, "--frames", "8", "--max-new-tokens", "2"]
    if hybrid:
        linear = min(recurrent)
        expect_error(
            cli,
            f"{family}: --layer {linear} (linear attention)",
            [*base, "--mmproj", mm, "--layer", str(linear)],
            f"is a linear-attention layer, which has no attention map to score; this model's full-attention "
            f"layers are {', '.join(map(str, full))}",
        )
    root = fx.parent
    if (root / "mmproj.gguf").is_file():  # the Qwen2.5-VL fixture's projector
        expect_error(
            cli, f"{family}: a Qwen2.5-VL mmproj", [*base, "--mmproj", str(root / "mmproj.gguf")], "qwen3vl_merger"
        )
    other = root / ("qwen3_5" if family.startswith("qwen3_vl") else "qwen3_vl") / "mmproj.gguf"
    if other.is_file():  # DeepStack levels differ: 3 vs 0
        expect_error(cli, f"{family}: another Qwen3 model's mmproj", [*base, "--mmproj", str(other)], "DeepStack")

    if has_onnxruntime(cli):  # a Lite ranker reads the main embedding, not the DeepStack slices beside it
        width = text["embedding_length"]
        ranker = make_rankers(fx, n_embd=width)[0]
        rl = json_lines(run_cli(cli, fx, "--json", "--ranker", str(ranker)))
        check(
            bool(rl) and rl[0]["stats"]["selector"] == "lite" and len(rl[0]["kept_token_indices"]) == want,
            f"{family}: ONNX Lite ranker on the {width}-wide main embedding",
        )
        if text.get("deepstack_layers"):
            wide = make_rankers(fx, n_embd=width * (1 + text["deepstack_layers"]))[0]
            expect_error(
                cli,
                f"{family}: a ranker of the DeepStack row width",
                [*base, "--mmproj", mm, "--ranker", str(wide)],
                "does not match",
            )

    if skip_python:
        return
    ref, why = python_llama_cpp(fx, None, layer=None)
    if ref is None:
        print(f"SKIPPED exact comparison with the Python llama.cpp backend: {why}")
    else:
        check(ref[0] == out["kept_token_indices"], f"{family}: same kept tokens as the Python llama.cpp backend")
        check(ref[1] == out["answer_token_ids"], f"{family}: same greedy answer tokens as the Python llama.cpp backend")
        check(ref[2] == out["evidence"], f"{family}: same evidence ranges as the Python pipeline ({out['evidence']})")
    hf = transformers_kept(fx, Path(info["model_dir"]), default)
    overlap = len(set(hf) & set(out["kept_token_indices"])) / len(out["kept_token_indices"])
    check(overlap >= 0.9, f"{family}: transformers backend keeps {overlap:.0%} of the same tokens (>= 90%)")


def has_onnxruntime(cli: str) -> bool:
    r = subprocess.run([cli, "--help"], capture_output=True, text=True)
    return "ONNX Runtime: yes" in r.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", required=True)
    ap.add_argument("--fixture", required=True, type=Path)
    ap.add_argument("--skip-python", action="store_true", help="only the CLI checks (for the sanitizer build)")
    args = ap.parse_args()
    fx = args.fixture
    info = json.loads((fx / "fixture.json").read_text())
    print(f"fixture: {info}")
    family = info.get("family", "qwen2_5_vl")
    if family != "qwen2_5_vl":
        qwen3(args.cli, fx, family, info, args.skip_python)
        print(f"{len(FAILURES)} check(s) failed" if FAILURES else "integration: all checks passed")
        return 1 if FAILURES else 0
    tmp = fx / f"tmp-{Path(args.cli).name}"
    tmp.mkdir(exist_ok=True)

    # 1. end to end, reference layer
    r = run_cli(args.cli, fx, "--json", "--layer", str(LAYER))
    check(r.returncode == 0 and sanitizer_clean(r), "CLI runs (reference layer)")
    if r.returncode != 0:
        return 1
    out = json.loads(r.stdout)
    s = out["stats"]
    kept = out["kept_token_indices"]
    tpf = s["tokens_per_frame"]
    want = min(-(-BUDGET // tpf) * tpf, s["visual_tokens"])
    check(s["frames"] == N_FRAMES and s["frame_units"] == N_FRAMES // 2, "frames and units")
    check(len(kept) == want == s["kept_tokens"], f"kept {len(kept)} tokens = budget rounded up to frames ({want})")
    check(kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < s["visual_tokens"], "kept indices sorted, unique")
    check(0 < len(out["answer_token_ids"]) <= MAX_NEW or out["answer"] == "", "answer tokens")
    check(s["reference_layer"] == LAYER and s["frame_sets"] == -(-s["frame_units"] // SET_FRAMES), "stats")
    check(all(k in s["seconds"] for k in ("decode", "encode", "select", "ttft_answer", "answer", "total")), "timings")
    r2 = run_cli(args.cli, fx, "--json", "--layer", str(LAYER))
    check(
        r2.returncode == 0
        and json.loads(r2.stdout)["kept_token_indices"] == kept
        and json.loads(r2.stdout)["answer_token_ids"] == out["answer_token_ids"],
        "deterministic",
    )
    env = dict(os.environ, FLEXSELECT_NO_CUT="1")  # the full graph instead of stopping after layer L's Q/K
    rn = run_cli(args.cli, fx, "--json", "--layer", str(LAYER), env=env)
    check(rn.returncode == 0 and json.loads(rn.stdout)["kept_token_indices"] == kept, "cut after layer L = no cut")
    rt = run_cli(args.cli, fx)  # text mode: answer on stdout, stats on stderr
    check(rt.returncode == 0 and b"kept:" in rt.stderr and b"first token" in rt.stderr, "text output with stats")

    # 1c. several questions in one run (the video index)
    multi_question(args.cli, fx, out)

    # 1b. ONNX Lite ranker
    ranker, ranker_wrong = make_rankers(fx, n_embd=64)
    lite = None
    if has_onnxruntime(args.cli):
        rl = run_cli(args.cli, fx, "--json", "--ranker", str(ranker))
        check(rl.returncode == 0 and sanitizer_clean(rl), "CLI runs (ONNX Lite ranker)")
        if rl.returncode == 0:
            lite = json.loads(rl.stdout)
            check(lite["stats"]["selector"] == "lite" and len(lite["kept_token_indices"]) == want, "ranker selection")
    else:
        print("note: this CLI was built without ONNX Runtime; ranker runs not tested")

    # 4. bad inputs
    bad_inputs(args.cli, fx, ranker_wrong, tmp)

    if not args.skip_python:
        # 2. the Python llama.cpp backend: exact agreement
        ref, why = python_llama_cpp(fx, None)
        if ref is None:
            print(f"SKIPPED exact comparison with the Python llama.cpp backend: {why}")
        else:
            check(ref[0] == kept, "same kept tokens as the Python llama.cpp backend")
            check(ref[1] == out["answer_token_ids"], "same greedy answer tokens as the Python llama.cpp backend")
            check(ref[2] == out["evidence"], f"same evidence ranges as the Python pipeline ({out['evidence']})")
            if lite is not None:
                ref_l, _ = python_llama_cpp(fx, ranker)
                check(ref_l[0] == lite["kept_token_indices"], "same kept tokens with the ranker (Python llama.cpp)")
                check(ref_l[1] == lite["answer_token_ids"], "same answer tokens with the ranker (Python llama.cpp)")
        # 3. the transformers backend: near agreement
        hf = transformers_kept(fx, Path(info["model_dir"]))
        overlap = len(set(hf) & set(kept)) / len(kept)
        check(overlap >= 0.9, f"transformers backend keeps {overlap:.0%} of the same tokens (>= 90%)")

    shutil.rmtree(tmp, ignore_errors=True)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        return 1
    print("integration: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
