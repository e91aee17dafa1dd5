"""flexselect.plan: shapes from configs, per-stage memory, the pre-run refusal, and `flexselect plan`."""

import json

import pytest

from flexselect import FlexSelectError, plan
from flexselect.cli import main
from flexselect.pipeline import FlexSelect, Sampling, SelectOptions
from flexselect.tiny import (
    build_tiny_internvl,
    build_tiny_llava_onevision,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_5,
    build_tiny_qwen3_vl,
)

QWEN_7B = {  # Qwen2.5-VL-7B-Instruct's published shape
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
}


def test_shape_from_a_config_counts_exactly_what_the_loaded_model_has(tiny_backend, tiny_model_dir):
    shape = plan.model_shape(tiny_model_dir)
    assert shape == plan.shape_of(tiny_backend.model)
    assert shape.total_params == sum(p.numel() for p in tiny_backend.model.parameters())
    assert shape.family == "qwen2_5_vl" and shape.num_layers == tiny_backend.num_layers


def test_the_7b_shape_is_the_published_one():
    shape = plan.model_shape(QWEN_7B)
    assert 8.2e9 < shape.total_params < 8.4e9  # "8.29B" on the model card
    assert shape.pixels_per_token == 28 and shape.frames_per_unit == 2
    req = plan.request(shape, num_frames=1024, width=560, height=308, index=True)
    assert req.tokens_per_unit == 11 * 20 and req.units == 512 and req.budget == 7040 and req.layer == 20
    est = plan.estimate(shape, req, dtype_bytes=2, materialised_attention=False)
    # The figure: ~41 KiB of index per visual token (20 layers of K and V + the layer-20 keys, bf16).
    # held through the answer pass: the stage is the larger pass plus the index
    passes = max(est.device_bytes["scoring_pass"], est.device_bytes["answer_pass"])
    index = est.device_bytes["video_index"] - passes
    assert index / (req.sets * req.set_tokens) == (2 * 20 + 1) * 4 * 128 * 2
    assert est.flops["baseline"] > est.flops["flexselect"] > est.flops["followup_indexed"]


def test_time_is_flops_plus_a_fixed_cost_per_pass():
    shape = plan.model_shape(QWEN_7B)
    indexed, plain = (
        plan.estimate(shape, plan.request(shape, 256, 560, 308, index=i), 2, materialised_attention=False)
        for i in (True, False)
    )
    # building the index splits each set's pass in two (context rows, then the question's): the same FLOPs
    assert indexed.flops["flexselect"] == pytest.approx(plain.flops["flexselect"], rel=1e-12)
    assert len(indexed.passes["flexselect"]) == len(plain.passes["flexselect"]) + indexed.request.sets
    speed = plan.Throughput(flops_per_s=1e14, pass_rows=0.0)
    assert indexed.seconds(shape, speed) == {arm: f / 1e14 for arm, f in indexed.flops.items()}
    slow = indexed.seconds(shape, plan.Throughput(1e14, pass_rows=64.0))
    layer_params = sum(shape.layer_active_params[: indexed.request.layer])
    one_question_pass = 2 * 64 * layer_params / 1e14
    sets = indexed.request.sets
    assert slow["followup_indexed"] - indexed.seconds(shape, speed)["followup_indexed"] == pytest.approx(
        sets * one_question_pass + 2 * 64 * sum(shape.layer_active_params) / 1e14
    )
    assert slow["baseline"] / slow["flexselect"] < indexed.flops["baseline"] / indexed.flops["flexselect"]


def test_measured_throughput_is_positive_and_sane(tiny_model_dir):
    import torch

    speed = plan.measured_throughput("cpu", torch.float32, plan.model_shape(tiny_model_dir))
    assert speed.flops_per_s > 1e8 and 0 <= speed.pass_rows < 1e5


@pytest.mark.parametrize("builder", [build_tiny_llava_onevision, build_tiny_internvl])
def test_every_family_has_a_shape(builder, tmp_path):
    shape = plan.model_shape(builder(tmp_path / "m"))
    req = plan.request(shape, num_frames=8, width=320, height=240)
    assert shape.fixed_tokens_per_unit == req.tokens_per_unit > 0 and req.units == 8


@pytest.mark.parametrize("builder", [build_tiny_qwen2_vl, build_tiny_qwen3_vl, build_tiny_qwen3_5])
def test_the_qwen_families_count_tokens_from_the_frame_size(builder, tmp_path):
    shape = plan.model_shape(builder(tmp_path / "m"))
    req = plan.request(shape, num_frames=8, width=320, height=240)
    side = shape.pixels_per_token  # 28 for Qwen2-VL, 32 for Qwen3-VL / Qwen3.5 (patch 16)
    assert req.units == 4 and req.tokens_per_unit == round(240 / side) * round(320 / side)
    assert plan.estimate(shape, req, 4, materialised_attention=True).peak_device_bytes > 0
    if builder is build_tiny_qwen3_5:  # only its full-attention layers hold a KV cache
        assert 0 < len(shape.attention_layers) < shape.num_layers


def test_a_request_that_cannot_fit_is_refused_with_the_setting_to_change():
    shape = plan.model_shape(QWEN_7B)
    est = plan.estimate(shape, plan.request(shape, 1024, 560, 308), 2, materialised_attention=False)
    with pytest.raises(
        FlexSelectError,
        match=r"needs about 1[0-9.]+ GiB on GPU 0 .*but 10.0 GiB is free: use a "
        r"smaller model",
    ):
        plan.check_fits(est, 10 * plan.GiB, 64 * plan.GiB, "GPU 0")
    with pytest.raises(FlexSelectError, match="decoded frames need"):
        plan.check_fits(est, 80 * plan.GiB, 1, "GPU 0")
    plan.check_fits(est, 80 * plan.GiB, 64 * plan.GiB, "GPU 0")  # fits


def test_recommend_trades_frames_for_memory():
    shape = plan.model_shape(QWEN_7B)
    roomy = plan.recommend(shape, 3600, 1920, 1080, 80 * plan.GiB, 64 * plan.GiB, 2, False)
    assert roomy.fits and (roomy.frames, roomy.max_side, roomy.set_frames) == (1024, 560, 64)
    tight = plan.recommend(shape, 3600, 1920, 1080, 19 * plan.GiB, 64 * plan.GiB, 2, False)
    assert tight.fits and tight.estimate.peak_device_bytes * plan.MARGIN <= 19 * plan.GiB
    assert (tight.frames, tight.max_side, tight.set_frames, tight.budget) < (1024, 560, 64, 7040)
    assert not plan.recommend(shape, 3600, 1920, 1080, 4 * plan.GiB, 64 * plan.GiB, 2, False).fits


def test_plan_command(tiny_model_dir, capsys):
    assert (
        main(
            ["plan", "--model", str(tiny_model_dir), "--duration", "600", "--memory", "8", "--device", "cpu", "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["frames"] == 1024 and out["predicted_seconds"]["flexselect"] > 0
    assert (
        main(["plan", "--model", str(tiny_model_dir), "--duration", "600", "--memory", "0.001", "--device", "cpu"]) == 2
    )
    assert "nothing fits" in capsys.readouterr().out
    assert main(["plan", "--model", str(tiny_model_dir), "--duration", "-3"]) == 2
    assert "--duration must be a positive number" in capsys.readouterr().err


def test_a_run_that_cannot_fit_is_refused_before_decoding(tiny_backend, test_video, monkeypatch):
    import flexselect.pipeline as pipeline

    monkeypatch.setattr(plan, "available_memory", lambda device: (1024, None, "this machine's RAM"))
    monkeypatch.setattr(pipeline, "load_clip", lambda *a, **k: pytest.fail("decoded although it cannot fit"))
    with pytest.raises(FlexSelectError, match=r"this run needs about .* more on this machine's RAM"):
        FlexSelect(tiny_backend).answer(
            test_video, "What?", Sampling(frames=8, max_side=112), SelectOptions(budget=24, set_frames=4)
        )
