"""FlexSelect-Lite in the authors' layouts: vision features, released-checkpoint import, refusal, ONNX parity.

Each released layout is rebuilt here at a tiny size with random weights and exactly the released file layout
(config.json + model.safetensors, the authors' parameter names), imported, and checked against an independent
computation with transformers' own modules loaded with the same weights (eager attention, its attention maps).
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexselect.backends import load_backend
from flexselect.errors import FlexSelectError
from flexselect.lite import load_ranker
from flexselect.lite.bundle import ONNX
from flexselect.lite.onnx_ranker import OnnxRanker
from flexselect.lite.ranker import LiteRanker
from flexselect.lite.released import import_release
from flexselect.selection import top_k

DECODER = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "model_type": "qwen2",
    "tie_word_embeddings": True,
}
QUESTION = "What is the color of the car?"


def clip(n_frames: int = 8, height: int = 112, width: int = 168, seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (n_frames, height, width, 3)).astype(np.uint8)
    return types.SimpleNamespace(frames=frames, timestamps=np.arange(n_frames) / 2.0, sample_fps=2.0, source="clip.mp4")


@pytest.fixture(scope="module")
def hosts(tiny_backend, tmp_path_factory):
    from flexselect.tiny import build_tiny_internvl, build_tiny_llava_onevision

    root = tmp_path_factory.mktemp("hosts")
    return {
        "qwen2_5_vl": tiny_backend,
        "llava_onevision": load_backend(build_tiny_llava_onevision(root / "llava"), device="cpu", dtype="float32"),
        "internvl": load_backend(build_tiny_internvl(root / "internvl"), device="cpu", dtype="float32"),
    }


def encoded(backend, size=(112, 168)):
    return backend.encode_with_vision_features(clip(height=size[0], width=size[1]))


# -- the backends' vision features are exactly what the host's own projector reads ---------------------------------
def test_vision_features_are_what_the_host_projector_reads(hosts):
    qwen = hosts["qwen2_5_vl"]
    v = encoded(qwen)
    merger = qwen.model.model.visual.merger
    with torch.no_grad():  # the host's merger over our (un-windowed) features gives the host's embeddings
        assert torch.allclose(merger(v.vision_features.reshape(-1, merger.ln_q.weight.shape[0])), v.embeds, atol=1e-5)
    assert v.vision_features.shape == (v.num_frames, v.tokens_per_frame, qwen.vision_feature_dim)

    llava = hosts["llava_onevision"]
    v = encoded(llava)
    model = llava.model.model
    with torch.no_grad():
        pooled = model.apply_pooling(model.multi_modal_projector(v.vision_features))
    assert torch.allclose(pooled.reshape(-1, pooled.shape[-1]), v.embeds, atol=1e-5)

    intern = hosts["internvl"]
    v = encoded(intern)
    with torch.no_grad():
        grid = intern.model.model.multi_modal_projector(v.vision_features)
    blocks = v.embeds.view(v.num_frames, v.tokens_per_frame, -1)[:, 1:-1]
    assert torch.allclose(grid, blocks, atol=1e-5)


# -- released checkpoints at a tiny size ---------------------------------------------------------------------------
def write_release(folder: Path, family: str, backend, seed: int = 0) -> Path:
    """A folder laid out exactly like the authors' release for `family` (random weights, tiny shape)."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    config = dict(DECODER, vocab_size=backend.text_model.config.vocab_size)
    if family == "qwen2_5_vl":  # the authors' training code writes this rope into the saved config
        config["rope_scaling"] = {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 4.0,
            "mrope_section": [2, 3, 3],
            "rope_type": "yarn",
            "type": "yarn",
        }
    config["drop_func_name"] = "token_selection"
    decoder = Qwen2Model(Qwen2Config(**{k: v for k, v in config.items() if k not in ("rope_scaling", "model_type")}))
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.normal_(0.0, 0.3)  # decisive attention, so rankings are comparable
    state = {k: v for k, v in decoder.state_dict().items()}
    h, d = DECODER["hidden_size"], backend.vision_feature_dim
    if family == "qwen2_5_vl":
        c = d // 4
        proj = {
            "merger_token_selector.ln_q.weight": 1 + 0.1 * torch.randn(c),
            "merger_token_selector.mlp.0.weight": torch.randn(d, d) / d**0.5,
            "merger_token_selector.mlp.0.bias": 0.1 * torch.randn(d),
            "merger_token_selector.mlp.2.weight": torch.randn(h, d) / d**0.5,
            "merger_token_selector.mlp.2.bias": 0.1 * torch.randn(h),
        }
    elif family == "llava_onevision":
        proj = {
            "mm_projector.0.weight": torch.randn(h, d) / d**0.5,
            "mm_projector.0.bias": 0.1 * torch.randn(h),
            "mm_projector.2.weight": torch.randn(h, h) / h**0.5,
            "mm_projector.2.bias": 0.1 * torch.randn(h),
            "image_newline": torch.randn(h),
        }
    else:
        proj = {
            "mlp1.0.weight": 1 + 0.1 * torch.randn(d),
            "mlp1.0.bias": 0.1 * torch.randn(d),
            "mlp1.1.weight": torch.randn(h, d) / d**0.5,
            "mlp1.1.bias": 0.1 * torch.randn(h),
            "mlp1.3.weight": torch.randn(h, h) / h**0.5,
            "mlp1.3.bias": 0.1 * torch.randn(h),
        }
        state = {f"language_model.model.{k}": v for k, v in state.items()}
        config["downsample_ratio"] = 0.5
        backend.tokenizer.save_pretrained(folder)  # the release ships its own tokenizer
    save_file({**state, **proj}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reference_scores(folder: Path, family: str, ranker: LiteRanker, visual, frames, prompt) -> torch.Tensor:
    """The release's scores computed with transformers' own modules (eager attention maps), independent of ours."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2Config, Qwen2Model
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    state = load_file(folder / "model.safetensors")
    raw = json.loads((folder / "config.json").read_text())
    fields = {k: v for k, v in raw.items() if k in DECODER or k == "vocab_size"}
    fields.pop("model_type")
    inputs = ranker.inputs(visual, frames, prompt)
    if family == "qwen2_5_vl":
        rope = {k: v for k, v in raw["rope_scaling"].items() if k != "type"}
        cfg = Qwen2_5_VLTextConfig(**fields, rope_parameters={**rope, "rope_theta": raw["rope_theta"]})
        model = Qwen2_5_VLTextModel(cfg)
        merger = Qwen2_5_VLPatchMerger(dim=64, context_dim=ranker.vision_dim // 4, spatial_merge_size=2)
        merger.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("merger_")})

        def project(f):
            return merger(f.reshape(-1, ranker.vision_dim // 4))

        prefix = ""
    else:
        model = Qwen2Model(Qwen2Config(**fields))
        prefix = "language_model.model." if family == "internvl" else ""
        if family == "llava_onevision":

            def project(f):  # f: [F, rows, cols, D], the frames' SigLIP patch grids
                x = F.linear(
                    F.gelu(F.linear(f, state["mm_projector.0.weight"], state["mm_projector.0.bias"])),
                    state["mm_projector.2.weight"],
                    state["mm_projector.2.bias"],
                )
                side = f.shape[1]
                x = F.interpolate(x.permute(0, 3, 1, 2), size=[math.ceil(side / 2)] * 2, mode="bilinear").permute(
                    0, 2, 3, 1
                )
                nl = state["image_newline"].expand(x.shape[0], x.shape[1], 1, 64)
                return torch.cat([x, nl], 2).reshape(-1, 64)
        else:

            def project(f):
                x = F.layer_norm(f, (f.shape[-1],), state["mlp1.0.weight"], state["mlp1.0.bias"])
                x = F.linear(
                    F.gelu(F.linear(x, state["mlp1.1.weight"], state["mlp1.1.bias"])),
                    state["mlp1.3.weight"],
                    state["mlp1.3.bias"],
                )
                return x.reshape(-1, 64)

    model.load_state_dict(
        {
            k[len(prefix) :]: v
            for k, v in state.items()
            if k.startswith(prefix) and not k.startswith(("merger_", "mm_", "image_newline", "mlp1"))
        }
    )
    model.config._attn_implementation = "eager"
    model.eval()
    with torch.no_grad():
        x = model.embed_tokens(inputs.input_ids)
        x[inputs.visual_rows] = project(inputs.vision_features)
        positions = inputs.position_ids[:, None] if family == "qwen2_5_vl" else inputs.position_ids
        out = model(inputs_embeds=x[None], position_ids=positions, output_attentions=True)
    maps = out.attentions[-1][0]  # [H, L, L], softmax over all keys, causal
    first_question = int(max(inputs.visual_rows.max(), inputs.score_columns.max())) + 1  # the text after the video
    assert first_question == int(inputs.question_rows[0]) and int(inputs.question_rows[-1]) == len(x) - 1
    return maps[:, first_question:, inputs.score_columns].amax(dim=(0, 1))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "internvl"])
def test_released_ranker_imports_losslessly_and_exports_to_onnx(family, hosts, tmp_path):
    from flexselect.cli import main

    backend = hosts[family]
    release = write_release(tmp_path / "release", family, backend)
    assert main(["lite-import", str(release), "-o", str(tmp_path / "bundle")]) == 0
    imported = load_ranker(tmp_path / "bundle", backend)
    direct = load_ranker(release, backend)  # --ranker also takes the release folder itself
    assert isinstance(imported, LiteRanker) and imported.layout == family and imported.reads_vision_features
    visual = encoded(backend)
    frames = [0, 2, 3] if family == "qwen2_5_vl" else [1, 4, 6]
    prompt = backend.prompt(QUESTION)
    ours = imported.score(visual, frames, prompt)
    assert ours.shape == (len(frames) * visual.tokens_per_frame,)
    expected = reference_scores(release, family, imported, visual, frames, prompt)
    assert torch.allclose(ours, expected, atol=1e-6, rtol=1e-4), (ours - expected).abs().max()
    assert torch.equal(direct.score(visual, frames, prompt), ours)
    assert ours.std() > 1e-3  # a real ranking, not a constant

    # ONNX parity, at another set size than the export saw
    assert main(["lite-export", str(tmp_path / "bundle")]) == 0
    onnx_ranker = load_ranker(tmp_path / "bundle" / ONNX, backend)
    assert isinstance(onnx_ranker, OnnxRanker) and onnx_ranker.reads_vision_features
    for frames in ([0, 1], [0, 2, 3] if family == "qwen2_5_vl" else [0, 1, 3, 5, 6, 7]):
        a, b = imported.score(visual, frames, prompt), onnx_ranker.score(visual, frames, prompt)
        assert (a - b).abs().max() < 1e-5, (a - b).abs().max()
        k = max(1, len(a) // 8)
        assert torch.equal(top_k(a, k), top_k(b, k))


def test_a_ranker_for_another_host_is_refused(hosts, tmp_path):
    release = write_release(tmp_path / "qwen", "qwen2_5_vl", hosts["qwen2_5_vl"])
    with pytest.raises(FlexSelectError, match="made for a qwen2_5_vl model.*loaded model \\(llava_onevision\\)"):
        load_ranker(release, hosts["llava_onevision"])
    wide = write_release(tmp_path / "wide", "llava_onevision", hosts["qwen2_5_vl"])  # 128-wide: qwen's width
    with pytest.raises(FlexSelectError, match="vision feature width 128.*vision feature width 32"):
        load_ranker(wide, hosts["llava_onevision"])


def test_import_refuses_anything_else_listing_what_it_expects(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    plain = tmp_path / "plain"
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(plain)
    with pytest.raises(
        FlexSelectError,
        match="not a released FlexSelect-Lite ranker.*expected one of.*merger_token_selector.*mm_projector.*mlp1",
    ):
        import_release(plain)
    with pytest.raises(FlexSelectError, match="no config.json"):
        import_release(tmp_path)
