"""GGUF export and the llama.cpp backend against the transformers backend on the same tiny random weights.

Agreement asked for (measured on the tiny fixture: f32 and f16 both keep identical tokens, f32 answers identically):
  * encoded visual tokens: max |diff| <= 2e-3 x max |value| (f32 and f16: the projector is f16 in the f16 export);
  * kept tokens per frame set (top 25%): mean overlap over sets and layers >= 0.95 and every set >= 0.90 for f32;
    >= 0.90 mean and >= 0.80 per set for f16 (near-ties at the cut flip with last-digit differences);
  * greedy answer tokens: identical for f32;
  * M-RoPE positions of the scoring and answer layouts: identical.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python==0.3.36 is not installed (pip install .[gguf])")

from flexselect.backends.base import GenerationConfig  # noqa: E402
from flexselect.errors import FlexSelectError  # noqa: E402
from flexselect.selection import frame_sets, top_k  # noqa: E402
from helpers import random_clip  # noqa: E402

OVERLAP = {"f32": (0.95, 0.90), "f16": (0.90, 0.80)}  # (mean, every set)
EMBED_RTOL = 2e-3


def fake_clip(n_frames=16, height=112, width=168, fps=2.0, seed=0):
    clip = random_clip(n_frames, height, width, fps, seed)
    clip.frames[:, : height // 2, : width // 3] //= 8  # a few flat regions so that attention has something to prefer
    return clip


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    from flexselect_export.gguf import export_gguf

    return {t: export_gguf(tiny_model_dir, tmp_path_factory.mktemp(f"gguf-{t}"), t) for t in ("f32", "f16")}


@pytest.fixture(scope="session")
def llama_backends(exported):
    from flexselect.backends.llama_cpp import LlamaCppBackend

    return {t: LlamaCppBackend(m, p, n_ctx=4096, n_threads=2) for t, (m, p) in exported.items()}


@pytest.fixture(scope="session")
def clip():
    return fake_clip()


@pytest.fixture(scope="session")
def hf_visual(tiny_backend, clip):
    return tiny_backend.encode(clip)


# -- export --------------------------------------------------------------------------------------------------------
def test_export_writes_small_checked_files(exported, tiny_model_dir):
    from flexselect.backends.gguf_info import inspect_gguf

    for model, mmproj in exported.values():
        assert model.name == "model.gguf" and mmproj.name == "mmproj.gguf"
        assert sorted(p.name for p in model.parent.iterdir()) == ["mmproj.gguf", "model.gguf"]  # no leftovers
        assert model.stat().st_size < 1_000_000 and mmproj.stat().st_size < 1_000_000
        text, proj = inspect_gguf(model), inspect_gguf(mmproj)
        assert text["architecture"] == "qwen2vl" and text["block_count"] == 4 and text["embedding_length"] == 64
        assert proj["architecture"] == "clip" and proj["projector_type"] == "qwen2.5vl_merger"
        assert proj["block_count"] == 3 and proj["projection_dim"] == 64
    assert exported["f16"][0].stat().st_size < exported["f32"][0].stat().st_size


def test_export_rejects_bad_inputs(tmp_path, tiny_model_dir):
    from flexselect_export.gguf import export_gguf

    with pytest.raises(FlexSelectError, match="not found"):
        export_gguf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlexSelectError, match="config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "out")
    other = tmp_path / "llava"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llava_onevision"}')
    with pytest.raises(FlexSelectError, match="Qwen2.5-VL"):
        export_gguf(other, tmp_path / "out")
    with pytest.raises(FlexSelectError, match="outtype"):
        export_gguf(tiny_model_dir, tmp_path / "out", "q4_k")


def test_failed_conversion_leaves_no_gguf(tmp_path, tiny_model_dir):
    from flexselect_export.gguf import export_gguf

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated weights: the converter fails
    out = tmp_path / "out"
    with pytest.raises(FlexSelectError, match="converter failed"):
        export_gguf(broken, out, "f32")
    assert not out.exists()  # the folder it made is removed again: nothing half-done is left


# -- tokens, encoding, positions -----------------------------------------------------------------------------------
def test_tokenization_matches_transformers(llama_backends, tiny_backend):
    lb = llama_backends["f32"]
    for question in ["What color is the car?", "  two leading spaces", "Ünïcödé 12345 🚀\ttab\nnewline", ""]:
        ours, theirs = lb.prompt(question), tiny_backend.prompt(question)
        assert torch.equal(ours.prefix_ids, theirs.prefix_ids)
        assert torch.equal(ours.suffix_ids, theirs.suffix_ids), question


def test_lite_host_identity_matches_transformers(llama_backends, tiny_backend):
    from flexselect.lite.host import host_info

    # family, hidden size and vocabulary: a ranker trained on the transformers model is accepted by the GGUF one
    assert host_info(llama_backends["f32"]) == host_info(tiny_backend)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_encoded_visual_tokens_match_transformers(llama_backends, hf_visual, clip, outtype):
    visual = llama_backends[outtype].encode(clip)
    assert (visual.num_frames, visual.grid, visual.frame_size) == (
        hf_visual.num_frames,
        hf_visual.grid,
        hf_visual.frame_size,
    )
    assert visual.time_interval == hf_visual.time_interval
    np.testing.assert_array_equal(visual.timestamps, hf_visual.timestamps)
    err = (visual.embeds - hf_visual.embeds.float()).abs().max()
    assert err <= EMBED_RTOL * hf_visual.embeds.abs().max(), float(err)


def test_odd_frame_count_and_resize_match_transformers(llama_backends, tiny_backend):
    clip = fake_clip(n_frames=5, height=100, width=150, seed=3)  # odd; sides not multiples of 28
    ours, theirs = llama_backends["f32"].encode(clip), tiny_backend.encode(clip)
    assert ours.num_frames == theirs.num_frames == 3 and ours.frame_size == theirs.frame_size == (112, 140)
    # frames are resized identically, but mtmd takes uint8 (rounded) where transformers keeps floats
    err = (ours.embeds - theirs.embeds).abs().max()
    assert err <= 2e-2 * theirs.embeds.abs().max(), float(err)


def test_positions_match_transformers(llama_backends, tiny_backend, hf_visual):
    lb = llama_backends["f32"]
    prompt = tiny_backend.prompt("Where is the dog?")
    frames = [1, 4, 7]
    _, ours = lb.scoring_layout(hf_visual, frames, prompt)
    assert torch.equal(ours, tiny_backend.scoring_inputs(hf_visual, frames, prompt).position_ids[:, 0].cpu())
    kept = torch.tensor([0, 5, 30, 31, 77, 150, 191])
    _, ours, next_position = lb.answer_layout(hf_visual, kept, prompt)
    theirs = tiny_backend.answer_inputs(hf_visual, kept, prompt)
    assert torch.equal(ours, theirs.position_ids[:, 0].cpu()) and next_position == theirs.next_position


@pytest.fixture(scope="session")
def qwen2_vl(tmp_path_factory):
    """The tiny Qwen2-VL, its f32 GGUF on llama.cpp and on transformers."""
    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend
    from flexselect.backends.llama_cpp import LlamaCppBackend
    from flexselect.tiny import build_tiny_qwen2_vl
    from flexselect_export.gguf import export_gguf

    model_dir = build_tiny_qwen2_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2_vl")
    model, mmproj = export_gguf(model_dir, tmp_path_factory.mktemp("gguf-qwen2_vl"), "f32")
    return LlamaCppBackend(model, mmproj, n_ctx=4096, n_threads=2), Qwen25VLBackend.load(model_dir, "cpu", "float32")


def test_qwen2_vl_gguf_steps_time_by_one_per_unit_as_transformers(qwen2_vl):
    """Qwen2-VL has no time scaling: at 1 fps its units sit 1 apart (Qwen2.5-VL's rule would put them 4 apart)."""
    lb, hf = qwen2_vl
    clip = random_clip(n_frames=8, height=56, width=84, fps=1.0)
    ours, theirs = lb.encode(clip), hf.encode(clip)
    assert lb.family == "qwen2_vl" and ours.time_interval == theirs.time_interval == 1.0
    torch.testing.assert_close(ours.embeds, theirs.embeds.float(), rtol=0, atol=2e-3 * float(theirs.embeds.abs().max()))
    prompt = hf.prompt("Where is the dog?")
    _, positions = lb.scoring_layout(ours, [0, 2], prompt)
    assert torch.equal(positions, hf.scoring_inputs(theirs, [0, 2], prompt).position_ids[:, 0].cpu())
    everything = torch.arange(ours.num_tokens)
    _, positions, next_position = lb.answer_layout(ours, everything, prompt)
    reference = hf.answer_inputs(theirs, everything, prompt)
    assert torch.equal(positions, reference.position_ids[:, 0].cpu()) and next_position == reference.next_position
    p = len(prompt.prefix_ids)
    assert positions[0, p : p + ours.num_tokens].unique().tolist() == [p + u for u in range(ours.num_frames)]


# -- scoring pass --------------------------------------------------------------------------------------------------
def test_scoring_pass_stopped_after_reference_layer_equals_full_pass(llama_backends, hf_visual, tiny_backend):
    lb = llama_backends["f32"]
    prompt = lb.prompt("What color is the car?")
    q_stop, k_stop = lb.reference_qk(hf_visual, [0, 3, 6], prompt, 1, abort=True)
    q_full, k_full = lb.reference_qk(hf_visual, [0, 3, 6], prompt, 1, abort=False)
    assert torch.equal(q_stop, q_full) and torch.equal(k_stop, k_full)
    assert q_stop.shape == (4, len(prompt.suffix_ids), 16) and k_stop.shape[0] == 2


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_kept_tokens_per_set_match_transformers(llama_backends, tiny_backend, hf_visual, outtype):
    lb = llama_backends[outtype]
    prompt = tiny_backend.prompt("What color is the car?")
    overlaps = []
    for layer in (1, 3):
        for frames in frame_sets(hf_visual.num_frames, 3):
            theirs = tiny_backend.score(hf_visual, frames, prompt, layer, "max")
            ours = lb.score(hf_visual, frames, prompt, layer, "max")
            assert ours.shape == theirs.shape
            k = len(theirs) // 4
            overlaps.append(len(set(top_k(ours, k).tolist()) & set(top_k(theirs, k).tolist())) / k)
    mean_needed, each_needed = OVERLAP[outtype]
    assert np.mean(overlaps) >= mean_needed and min(overlaps) >= each_needed, overlaps


# -- answer pass ---------------------------------------------------------------------------------------------------
def test_greedy_answer_matches_transformers_f32(llama_backends, tiny_backend, hf_visual):
    prompt = tiny_backend.prompt("What color is the car?")
    kept = top_k(tiny_backend.score(hf_visual, list(range(hf_visual.num_frames)), prompt, 1, "max"), 60)
    config = GenerationConfig(max_new_tokens=10)
    ours = llama_backends["f32"].generate(hf_visual, kept, prompt, config)
    theirs = tiny_backend.generate(hf_visual, kept, prompt, config)
    assert ours.token_ids == theirs.token_ids
    assert ours.prompt_tokens == theirs.prompt_tokens and ours.ttft_s > 0


def test_seeded_sampling_is_reproducible(llama_backends, hf_visual):
    lb = llama_backends["f16"]
    prompt = lb.prompt("Describe the video.")
    kept = torch.arange(0, hf_visual.num_tokens, 3)
    config = GenerationConfig(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    first, second = (lb.generate(hf_visual, kept, prompt, config) for _ in range(2))
    assert first.token_ids == second.token_ids


# -- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_files_are_explained(exported, tmp_path):
    from flexselect.backends.llama_cpp import LlamaCppBackend

    model, mmproj = exported["f32"]
    with pytest.raises(FlexSelectError, match="--mmproj"):
        LlamaCppBackend(model, None)
    with pytest.raises(FlexSelectError, match="GGUF not found"):
        LlamaCppBackend(tmp_path / "missing.gguf", mmproj)
    with pytest.raises(FlexSelectError, match="mmproj not found"):
        LlamaCppBackend(model, tmp_path / "missing.gguf")
    with pytest.raises(FlexSelectError, match="vision projector"):
        LlamaCppBackend(mmproj, mmproj)  # the projector given as the model
    with pytest.raises(FlexSelectError, match="not a vision projector"):
        LlamaCppBackend(model, model)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(FlexSelectError, match="not a GGUF"):
        LlamaCppBackend(junk, mmproj)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(FlexSelectError):
        LlamaCppBackend(truncated, mmproj)


def test_mmproj_of_another_model_is_refused(exported, tmp_path, monkeypatch):
    import flexselect.tiny as tiny
    from flexselect.backends.llama_cpp import LlamaCppBackend
    from flexselect_export.gguf import export_gguf

    narrow = dict(
        tiny.TINY_TEXT,
        hidden_size=32,
        rope_parameters={**tiny.TINY_TEXT["rope_parameters"], "mrope_section": [2, 1, 1]},
    )
    monkeypatch.setattr(tiny, "TINY_TEXT", narrow)
    monkeypatch.setattr(tiny, "TINY_VISION", dict(tiny.TINY_VISION, out_hidden_size=32))
    other_model, _ = export_gguf(tiny.build_tiny_qwen2_5_vl(tmp_path / "narrow"), tmp_path / "gguf", "f16")
    with pytest.raises(FlexSelectError, match="64-wide embeddings but .* takes 32"):
        LlamaCppBackend(other_model, exported["f32"][1])


def test_ggml_tensor_declaration_is_checked_against_the_library():
    """The hand-written `struct ggml_tensor` reads a tensor ggml made as ggml's own accessors report it, and a
    declaration from another ggml (here: GGML_MAX_SRC 8 instead of 10, which moves the name) is refused."""
    import ctypes

    from flexselect.backends.llama_cpp import ggml

    lib = ggml.library()  # checks the real declaration
    ggml.check_layout(lib)

    class OtherGGML(ctypes.Structure):
        _fields_ = [(n, ctypes.c_void_p * 8 if n == "src" else t) for n, t in ggml.GGMLTensor._fields_]

    with pytest.raises(FlexSelectError, match="lays out struct ggml_tensor differently"):
        ggml.check_layout(lib, OtherGGML)


def test_freeing_one_backend_leaves_the_others_working(exported, tmp_path):
    # llama.cpp's logger is process-wide: a freed backend must not leave it pointing at released Python code.
    # In a child process, since the failure is a segmentation fault.
    model, mmproj = exported["f32"]
    script = f"""
import gc
from flexselect.errors import FlexSelectError
from flexselect.backends.llama_cpp import LlamaCppBackend
kept = LlamaCppBackend({str(model)!r}, {str(mmproj)!r}, n_ctx=256, n_threads=1)
freed = LlamaCppBackend({str(model)!r}, {str(mmproj)!r}, n_ctx=256, n_threads=1)
del freed
gc.collect()
try:
    LlamaCppBackend({str(model)!r}, {str(model)!r}, n_ctx=256, n_threads=1)  # logs errors through llama.cpp
except FlexSelectError as e:
    print("refused:", e)
kept.close()
print("closed")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and done.stdout.rstrip().endswith("closed")


def test_prompt_longer_than_context_is_refused_before_decoding(exported, hf_visual):
    from flexselect.backends.llama_cpp import LlamaCppBackend

    small = LlamaCppBackend(*exported["f32"], n_ctx=64, n_threads=2)
    prompt = small.prompt("What color is the car?")
    with pytest.raises(FlexSelectError, match=r"needs \d+ tokens .* --budget .* --n-ctx"):
        small.score(hf_visual, [0, 1, 2], prompt, 1, "max")
    with pytest.raises(FlexSelectError, match=r"needs \d+ tokens"):
        small.generate(hf_visual, torch.arange(hf_visual.num_tokens), prompt, GenerationConfig(max_new_tokens=4))
    kept = torch.arange(8)  # a short prompt still answers in the same context afterwards
    assert small.generate(hf_visual, kept, prompt, GenerationConfig(max_new_tokens=3)).prompt_tokens < 64


def test_pipeline_selection_on_llama_cpp_matches_transformers(llama_backends, tiny_backend, hf_visual):
    from flexselect.pipeline import FlexSelect, SelectOptions

    prompt = tiny_backend.prompt("What color is the car?")
    ours = FlexSelect(llama_backends["f32"]).select(
        hf_visual, prompt, options=SelectOptions(budget=48, layer=1, set_frames=3)
    )
    theirs = FlexSelect(tiny_backend).select(hf_visual, prompt, options=SelectOptions(budget=48, layer=1, set_frames=3))
    assert len(ours.kept) == len(theirs.kept) == 48
    assert len(set(ours.kept.tolist()) & set(theirs.kept.tolist())) >= 0.9 * 48
