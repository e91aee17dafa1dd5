"""The video index: follow-up questions reuse each frame set's question-independent scoring state.

Tolerance: indexed and unindexed scores are the same formula over the same keys, computed in float32 with the
question rows' attention over [cached + own] keys instead of inside one full pass, so they agree to float rounding:
max |diff| <= 1e-5 (scores are attention probabilities, <= 1; measured <= 2e-6 on the tiny models), and the kept
tokens and greedy answers are identical. On llama.cpp the restored state is the very bytes the pass wrote, so the
scores are bit-identical.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from flexselect.backends import load_backend
from flexselect.backends.base import GenerationConfig
from flexselect.errors import FlexSelectError
from flexselect.pipeline import FlexSelect, Sampling, SelectOptions
from flexselect.selection import frame_sets, top_k

ATOL = 1e-5
QUESTIONS = ["What is the color of the car in the video?", "How many people appear in the video?"]
GEN = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def family_backends(tiny_backend, tmp_path_factory):
    from flexselect.tiny import build_tiny_internvl, build_tiny_llava_onevision, build_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("index-models")
    dirs = {
        "llava_onevision": build_tiny_llava_onevision(root / "llava"),
        "internvl": build_tiny_internvl(root / "ivl"),
        "qwen2_vl": build_tiny_qwen2_vl(root / "qwen2vl"),
    }
    backends = {f: load_backend(d, device="cpu", dtype="float32") for f, d in dirs.items()}
    return {"qwen2_5_vl": tiny_backend, **backends}


def clip(n_frames=16, seed=0, fps=2.0):
    from types import SimpleNamespace

    frames = np.random.default_rng(seed).integers(0, 256, size=(n_frames, 56, 84, 3), dtype=np.uint8)
    return SimpleNamespace(frames=frames, timestamps=np.arange(n_frames) / fps, source="fake", sample_fps=fps)


# -- scores --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava_onevision", "internvl"])
@pytest.mark.parametrize("set_frames", [64, 2], ids=["one-set", "several-sets"])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_indexed_scores_equal_unindexed(family_backends, family, set_frames, aggregate):
    backend = family_backends[family]
    visual = backend.encode(clip())
    layer = 2
    sets = frame_sets(visual.num_frames, set_frames)
    assert (len(sets) == 1) == (set_frames == 64)
    for frames in sets:
        entry = backend.index_set(visual, frames, backend.prompt(QUESTIONS[0]), layer)
        for question in QUESTIONS:  # one index, several questions
            prompt = backend.prompt(question)
            full = backend.score(visual, frames, prompt, layer, aggregate)
            indexed = backend.score_indexed(entry, visual, prompt, aggregate)
            assert indexed.shape == full.shape == (len(frames) * visual.tokens_per_frame,)
            assert torch.allclose(indexed, full, rtol=0, atol=ATOL), (indexed - full).abs().max()
            k = len(full) // 4
            assert torch.equal(top_k(indexed, k), top_k(full, k))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava_onevision", "internvl"])
def test_sets_scored_in_one_batch_equal_unindexed(family_backends, family):
    backend = family_backends[family]
    visual = backend.encode(clip())
    layer = 2
    sets = frame_sets(visual.num_frames, 3)
    assert len({len(s) for s in sets}) == 2  # unequal sets: one batch per context length
    entries = [backend.index_set(visual, frames, backend.prompt(QUESTIONS[0]), layer) for frames in sets]
    batch_sizes = []
    hook = backend.text_model.register_forward_pre_hook(
        lambda _m, _a, kw: batch_sizes.append(kw["inputs_embeds"].shape[0]), with_kwargs=True
    )
    prompt = backend.prompt(QUESTIONS[1])
    try:
        batched = backend.score_indexed_many(entries, visual, prompt, "max")
    finally:
        hook.remove()
    assert sorted(batch_sizes) == sorted(sum(len(s) == n for s in sets) for n in {len(s) for s in sets})
    for frames, got in zip(sets, batched):
        full = backend.score(visual, frames, prompt, layer, "max")
        assert torch.allclose(got, full, rtol=0, atol=ATOL), (got - full).abs().max()
        k = len(full) // 4
        assert torch.equal(top_k(got, k), top_k(full, k))
    assert all(e.cache.get_seq_length() == e.n_context for e in entries)  # the sets' own caches are untouched


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_follow_up_questions_reuse_the_index_with_identical_results(family_backends, family):
    backend = family_backends[family]
    visual = backend.encode(clip())
    indexed, plain = FlexSelect(backend), FlexSelect(backend, auto_index=False)
    options = SelectOptions(budget=visual.tokens_per_frame * 3, set_frames=2, layer=2)
    n_sets = len(frame_sets(visual.num_frames, 2))
    for turn, question in enumerate(QUESTIONS + QUESTIONS[:1]):
        prompt = backend.prompt(question)
        a = indexed.select(visual, prompt, options)
        b = plain.select(visual, prompt, options)
        assert torch.equal(a.kept, b.kept)
        scored = ~torch.isnan(b.scores)
        assert torch.allclose(a.scores[scored], b.scores[scored], rtol=0, atol=ATOL)
        assert a.index["used"] and a.index["built_sets" if turn == 0 else "reused_sets"] == n_sets
        assert a.index["saved_s"] > 0 if turn else a.index["saved_s"] == 0
        assert b.index == {"used": False}
        ga = backend.generate(visual, a.kept, prompt, GEN)
        gb = backend.generate(visual, b.kept, prompt, GEN)
        assert ga.token_ids == gb.token_ids


def test_answer_stats_say_whether_the_index_was_reused(tiny_backend, test_video):
    pipe = FlexSelect(tiny_backend)
    kwargs = dict(sampling=Sampling(frames=16), options=SelectOptions(budget=48, set_frames=2, layer=2), generation=GEN)
    first = pipe.answer(test_video, QUESTIONS[0], **kwargs)
    second = pipe.answer(test_video, QUESTIONS[1], **kwargs)
    assert first.stats["index"]["built_sets"] == 4 and first.stats["index"]["reused_sets"] == 0
    assert second.stats["index"]["reused_sets"] == 4 and second.stats["index"]["built_sets"] == 0
    assert second.stats["index"]["bytes"] == first.stats["index"]["bytes"] > 0
    alone = FlexSelect(tiny_backend, auto_index=False).answer(test_video, QUESTIONS[1], **kwargs)
    assert torch.equal(second.selection.kept, alone.selection.kept)
    assert second.generation.token_ids == alone.generation.token_ids


def test_index_of_another_layer_set_size_or_sampling_is_never_reused(tiny_backend, test_video):
    pipe = FlexSelect(tiny_backend)
    prompt = tiny_backend.prompt(QUESTIONS[0])
    visual, _ = pipe.encode(test_video, Sampling(frames=16))
    base = SelectOptions(budget=48, set_frames=2, layer=2)
    assert pipe.select(visual, prompt, base).index["built_sets"] == 4
    for other in (SelectOptions(budget=48, set_frames=2, layer=1), SelectOptions(budget=48, set_frames=4, layer=2)):
        assert pipe.select(visual, prompt, other).index["reused_sets"] == 0
    other_sampling, _ = pipe.encode(test_video, Sampling(frames=12))
    assert other_sampling is not visual
    assert pipe.select(other_sampling, prompt, base).index["reused_sets"] == 0
    assert pipe.select(visual, prompt, base).index["reused_sets"] == 4


def test_memory_limit_smaller_than_one_set_gives_a_notice_and_the_unindexed_result(tiny_backend, caplog):
    visual = tiny_backend.encode(clip())
    prompt = tiny_backend.prompt(QUESTIONS[0])
    options = SelectOptions(budget=visual.tokens_per_frame * 3, set_frames=2, layer=2)
    one_set = tiny_backend.index_bytes(visual, frame_sets(visual.num_frames, 2)[:1], prompt, 2)
    pipe = FlexSelect(tiny_backend, index_memory=one_set - 1)
    with caplog.at_level(logging.WARNING, logger="flexselect"):
        got = pipe.select(visual, prompt, options)
    notices = [r.getMessage() for r in caplog.records if "index" in r.getMessage()]
    assert len(notices) == 1 and "limit" in notices[0] and "\n" not in notices[0]
    assert got.index["used"] is False and got.index["notice"] == notices[0]
    plain = FlexSelect(tiny_backend, auto_index=False).select(visual, prompt, options)
    assert torch.equal(got.kept, plain.kept)
    assert pipe.indexes.nbytes == 0
    with pytest.raises(FlexSelectError, match="index-memory"):
        pipe.index(visual, options=options)


def test_least_recently_used_video_is_evicted_whole(tiny_backend):
    a, b = tiny_backend.encode(clip(seed=1)), tiny_backend.encode(clip(seed=2))
    prompt = tiny_backend.prompt(QUESTIONS[0])
    options = SelectOptions(budget=a.tokens_per_frame * 3, set_frames=2, layer=2)
    one_video = tiny_backend.index_bytes(a, frame_sets(a.num_frames, 2), prompt, 2)
    pipe = FlexSelect(tiny_backend, index_memory=int(one_video * 1.5))
    pipe.select(a, prompt, options)
    pipe.select(b, prompt, options)  # no room for both: a goes, whole
    assert pipe.select(b, prompt, options).index["reused_sets"] == 4
    assert pipe.select(a, prompt, options).index["reused_sets"] == 0
    assert pipe.indexes.nbytes <= pipe.indexes.limit_bytes
    assert pipe.clear_index() == 1 and pipe.indexes.nbytes == 0


def test_index_is_dropped_with_its_visual_tokens(tiny_backend):
    import gc

    pipe = FlexSelect(tiny_backend)
    visual = tiny_backend.encode(clip())
    pipe.select(visual, tiny_backend.prompt(QUESTIONS[0]), SelectOptions(budget=24, set_frames=2, layer=2))
    assert pipe.indexes.nbytes > 0
    del visual
    gc.collect()
    assert pipe.indexes.nbytes == 0


# -- on disk -------------------------------------------------------------------------------------------------------
def test_index_file_round_trips_and_refuses_foreign_or_damaged_files(
    tiny_backend, family_backends, test_video, tmp_path
):
    sampling, options = Sampling(frames=16), SelectOptions(budget=48, set_frames=2, layer=2)
    path = tmp_path / "clip.fsx"
    built = FlexSelect(tiny_backend).save_index(test_video, path, sampling, options)
    assert path.is_file() and not list(tmp_path.glob("*.partial"))

    fresh = FlexSelect(tiny_backend)
    fresh.load_index(path, test_video, sampling, options)
    got = fresh.answer(test_video, QUESTIONS[1], sampling=sampling, options=options, generation=GEN)
    assert got.stats["video_cached"] and got.stats["index"]["reused_sets"] == len(built.sets) == 4
    plain = FlexSelect(tiny_backend, auto_index=False).answer(
        test_video, QUESTIONS[1], sampling=sampling, options=options, generation=GEN
    )
    assert torch.equal(got.selection.kept, plain.selection.kept)
    assert got.generation.token_ids == plain.generation.token_ids

    for what, call in [
        ("other frame sampling", lambda: fresh.load_index(path, test_video, Sampling(frames=12), options)),
        (
            "another reference layer",
            lambda: fresh.load_index(path, test_video, sampling, SelectOptions(set_frames=2, layer=1)),
        ),
        ("another set size", lambda: fresh.load_index(path, test_video, sampling, SelectOptions(layer=2))),
        (
            "another model",
            lambda: FlexSelect(family_backends["qwen2_vl"]).load_index(path, test_video, sampling, options),
        ),
    ]:
        with pytest.raises(FlexSelectError, match=what):
            call()
    other_video = tmp_path / "other.mp4"
    other_video.write_bytes(test_video.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(FlexSelectError, match="another video"):
        fresh.load_index(path, other_video, sampling, options)

    truncated = tmp_path / "truncated.fsx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FlexSelectError, match="truncated or damaged") as e:
        fresh.load_index(truncated, test_video, sampling, options)
    assert "\n" not in str(e.value)


def test_failed_index_write_leaves_nothing(tiny_backend, test_video, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        FlexSelect(tiny_backend).save_index(
            test_video, tmp_path / "x.fsx", Sampling(frames=8), SelectOptions(set_frames=2, layer=2)
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FlexSelectError, match="does not exist"):
        FlexSelect(tiny_backend).save_index(test_video, tmp_path / "no" / "x.fsx")


# -- CLI -----------------------------------------------------------------------------------------------------------
def run_cli(*args, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "flexselect.cli", *args], input=stdin, capture_output=True, text=True, timeout=600
    )


def test_cli_answers_several_questions_and_chat_reuses_the_index(tiny_model_dir, test_video, tmp_path):
    common = [
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--frames",
        "16",
        "--budget",
        "48",
        "--set-frames",
        "2",
        "--layer",
        "2",
        "--max-new-tokens",
        "4",
    ]
    r = run_cli("answer", str(test_video), *QUESTIONS, *common, "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["question"] for x in lines] == QUESTIONS
    assert lines[0]["stats"]["index"]["built_sets"] == 4 and lines[1]["stats"]["index"]["reused_sets"] == 4

    r = run_cli("chat", str(test_video), *common, "--no-history", stdin="\n".join(QUESTIONS[::-1]) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("index: reused 4 set(s)") == 1 and "index: built for 4 set(s)" in r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == 2 and answers[1] == lines[0]["answer"]  # the same question, answered alike

    out = tmp_path / "clip.fsx"
    r = run_cli("index", str(test_video), "-o", str(out), *common[:8], "--set-frames", "2", "--layer", "2")
    assert r.returncode == 0 and out.is_file(), r.stderr
    r = run_cli("answer", str(test_video), QUESTIONS[1], *common, "--index", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["index"]["reused_sets"] == 4
    r = run_cli(
        "answer",
        str(test_video),
        QUESTIONS[1],
        *common[:6],
        "--frames",
        "12",
        "--budget",
        "48",
        "--set-frames",
        "2",
        "--layer",
        "2",
        "--index",
        str(out),
    )
    assert r.returncode == 2 and r.stderr.startswith("flexselect: error:") and "other frame sampling" in r.stderr
    r = run_cli("index", str(test_video), "-o", str(tmp_path / "missing" / "x.fsx"), *common[:6])
    assert r.returncode == 2 and "does not exist" in r.stderr


# -- llama.cpp -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_pipe(tiny_model_dir, tmp_path_factory):
    from flexselect_export.gguf import export_gguf

    model, mmproj = export_gguf(tiny_model_dir, tmp_path_factory.mktemp("index-gguf"), "f32")
    return FlexSelect.load(gguf=model, mmproj=mmproj, n_ctx=4096, n_gpu_layers=0)


def test_llama_cpp_indexed_scores_are_bit_identical(llama_pipe):
    backend = llama_pipe.backend
    visual = backend.encode(clip(n_frames=16))
    for frames in frame_sets(visual.num_frames, 4):
        entry = backend.index_set(visual, frames, backend.prompt(QUESTIONS[0]), 3)
        for question in QUESTIONS:
            prompt = backend.prompt(question)
            for aggregate in ("max", "mean"):
                assert torch.equal(
                    backend.score_indexed(entry, visual, prompt, aggregate),
                    backend.score(visual, frames, prompt, 3, aggregate),
                )


def test_llama_cpp_multi_question_run_matches_single_runs(llama_pipe, test_video, tmp_path):
    kwargs = dict(sampling=Sampling(frames=16), options=SelectOptions(budget=48, set_frames=2, layer=3), generation=GEN)
    pipe = FlexSelect(llama_pipe.backend)
    asked = [pipe.answer(test_video, q, **kwargs) for q in QUESTIONS + QUESTIONS[:1]]
    assert [a.stats["index"]["reused_sets"] for a in asked] == [0, 4, 4]
    for a in asked:
        single = FlexSelect(llama_pipe.backend, auto_index=False).answer(test_video, a.question, **kwargs)
        assert torch.equal(a.selection.kept, single.selection.kept)
        assert a.generation.token_ids == single.generation.token_ids

    path = tmp_path / "clip.fsx"
    pipe.save_index(test_video, path, kwargs["sampling"], kwargs["options"])
    fresh = FlexSelect(llama_pipe.backend)
    fresh.load_index(path, test_video, kwargs["sampling"], kwargs["options"])
    again = fresh.answer(test_video, QUESTIONS[1], **kwargs)
    assert again.stats["index"]["reused_sets"] == 4 and torch.equal(again.selection.kept, asked[1].selection.kept)
    assert again.generation.token_ids == asked[1].generation.token_ids


def test_index_files_of_one_runtime_are_refused_by_the_other(llama_pipe, tiny_backend, test_video, tmp_path):
    sampling, options = Sampling(frames=8), SelectOptions(set_frames=2, layer=3)
    FlexSelect(tiny_backend).save_index(test_video, tmp_path / "hf.fsx", sampling, options)
    with pytest.raises(FlexSelectError, match="another model"):
        FlexSelect(llama_pipe.backend).load_index(tmp_path / "hf.fsx", test_video, sampling, options)
