"""Export a transformers Qwen2.5-VL / Qwen2-VL / Qwen3-VL / Qwen3.5 checkpoint (dense or MoE) to GGUF for llama.cpp:
`model.gguf` + `mmproj.gguf`.

    flexselect export gguf MODEL_DIR OUT_DIR [--outtype f16|q8_0|f32]

The conversion itself is llama.cpp's own `convert_hf_to_gguf.py`, taken from the llama.cpp tree vendored in the
pinned llama-cpp-python sdist (`llama_cpp_source.py`) and run in a subprocess with that tree's `gguf-py` first on
PYTHONPATH (the PyPI `gguf` differs from the vendored copy despite the same version number). It runs twice: once
for the language model, once with `--mmproj` for the vision tower + merger. The vision projector is written as f16
for `f16`/`q8_0` (llama.cpp's usual choice: quantising the vision tower costs accuracy for little memory) and as f32
for `f32`.

Qwen3-VL and Qwen3.5 (dense and MoE) go through `convert_qwen3.py`, which runs the same converter with two fixes for
checkpoints other than the released ones (a SentencePiece tokenizer, MoE experts saved by transformers >= 5; see
there). Qwen3.5's multi-token-prediction head is left out (`--no-mtp`): FlexSelect never uses it. The Qwen3-VL
projector writes each visual token as the main embedding followed by its DeepStack slices, so its rows are
(1 + DeepStack levels) x the language model's width; the check below asks for exactly that.

Both files are written under temporary names in OUT_DIR, read back with the PyPI `gguf` reader and checked
(architecture, layer count, every block's tensors present, the projector's output width equal to the language
model's embedding width), and only then renamed into place, so a failed or interrupted export never leaves a
half-written GGUF under the final name.

FlexSelect's own defaults (reference layer, budget, set size) are NOT written into the GGUF. The converter has no
clean hook for extra keys (its `--metadata` file only covers `general.*` authorship fields), and adding keys
afterwards means rewriting the whole file (a second full copy of a 15 GB model). The runtimes (this package's
llama.cpp backend and the C++ runtime) read them from `defaults.json` instead, exactly as the transformers path
does, with the reference layer rescaled to the model's depth by `reference_layer_for`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from flexselect.backends.gguf_info import inspect_gguf
from flexselect.errors import FlexSelectError
from flexselect.outputs import check_output_dir, check_output_file, output_dir

OUTTYPES = ("f16", "q8_0", "f32")
# model_type -> (mmproj projector type, llama.cpp architecture of the language model)
SUPPORTED = {
    "qwen2_5_vl": ("qwen2.5vl_merger", "qwen2vl"),
    "qwen2_vl": ("qwen2vl_merger", "qwen2vl"),
    "qwen3_vl": ("qwen3vl_merger", "qwen3vl"),
    "qwen3_vl_moe": ("qwen3vl_merger", "qwen3vlmoe"),
    "qwen3_5": ("qwen3vl_merger", "qwen35"),
    "qwen3_5_moe": ("qwen3vl_merger", "qwen35moe"),
}
QWEN3 = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # converted through convert_qwen3.py
ATTENTION_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output")
DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")
MOE_FFN = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
LINEAR_ATTENTION = ("attn_qkv", "attn_gate", "ssm_conv1d", "ssm_out")  # Qwen3.5's Gated DeltaNet layers


def _read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise FlexSelectError(f"model folder not found: {model_dir}")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FlexSelectError(f"{model_dir} has no config.json: give the folder of a transformers checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlexSelectError(f"{config_file} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise FlexSelectError(
            f"GGUF export supports Qwen2.5-VL, Qwen2-VL, Qwen3-VL and Qwen3.5 checkpoints (model_type "
            f"{', '.join(SUPPORTED)}); "
            f"{model_dir} is {model_type!r}. Other families run on the transformers backend (--model)."
        )
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise FlexSelectError(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise FlexSelectError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
    if not (model_dir / "preprocessor_config.json").is_file():
        raise FlexSelectError(
            f"{model_dir} has no preprocessor_config.json: the vision projector needs its image mean/std"
        )
    return config


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config  # transformers >= 4.5x nests it; older checkpoints are flat


def _run_converter(
    llama_dir: Path, model_dir: Path, model_type: str, outfile: Path, outtype: str, mmproj: bool
) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(llama_dir / "gguf-py"), str(llama_dir)])
    env.pop("PYTHONHOME", None)
    cmd = [
        sys.executable,
        str(llama_dir / "convert_hf_to_gguf.py"),
        str(model_dir),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype,
    ]
    if model_type in QWEN3:
        cmd[1:2] = [str(Path(__file__).with_name("convert_qwen3.py")), str(llama_dir)]
    if mmproj:
        cmd.append("--mmproj")
    elif model_type.startswith("qwen3_5"):
        cmd.append("--no-mtp")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not outfile.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        what = "vision projector (--mmproj)" if mmproj else "language model"
        raise FlexSelectError(f"llama.cpp's converter failed on the {what} of {model_dir}:\n{tail}")


def _block_tensors(model_type: str, text_config: dict, layer: int) -> tuple[str, ...]:
    """The tensors llama.cpp needs in block `layer` of this family's language model."""
    ffn = MOE_FFN if model_type.endswith("_moe") else DENSE_FFN
    if model_type.startswith("qwen3_5"):
        types = text_config.get("layer_types")
        interval = text_config.get("full_attention_interval", 4)
        full = types[layer] == "full_attention" if types else (layer + 1) % interval == 0
        attention = ATTENTION_TENSORS + ("attn_q_norm", "attn_k_norm") if full else LINEAR_ATTENTION
        return ("attn_norm", "post_attention_norm", *attention, *ffn)
    norms = ("attn_q_norm", "attn_k_norm") if model_type.startswith("qwen3") else ()
    return ("attn_norm", "ffn_norm", *ATTENTION_TENSORS, *norms, *ffn)


def _check_text(info: dict, config: dict) -> None:
    text_config = _text_config(config)
    model_type = config["model_type"]
    n_layers = text_config.get("num_hidden_layers")
    arch = SUPPORTED[model_type][1]
    if info["architecture"] != arch:
        raise FlexSelectError(
            f"the converted language model has architecture {info['architecture']!r}, expected {arch!r}"
        )
    if info["block_count"] != n_layers:
        raise FlexSelectError(
            f"the converted language model has {info['block_count']} layers, the checkpoint {n_layers}"
        )
    names = set(info["tensors"])
    missing = [
        f"blk.{i}.{t}.weight"
        for i in range(n_layers)
        for t in _block_tensors(model_type, text_config, i)
        if f"blk.{i}.{t}.weight" not in names
    ]
    if "token_embd.weight" not in names:
        missing.insert(0, "token_embd.weight")
    if missing:
        raise FlexSelectError(f"the converted language model lacks tensors: {', '.join(missing[:8])}")


def _check_mmproj(info: dict, config: dict, embedding_length: int) -> None:
    vision = config.get("vision_config", {})
    if info["architecture"] != "clip" or not info["has_vision"]:
        raise FlexSelectError(f"the converted projector is not a vision mmproj (architecture {info['architecture']!r})")
    expected = SUPPORTED[config["model_type"]][0]
    if info["projector_type"] != expected:
        raise FlexSelectError(f"the converted projector has type {info['projector_type']!r}, expected {expected!r}")
    depth = vision.get("depth")
    if depth is not None and info["block_count"] != depth:
        raise FlexSelectError(
            f"the converted projector has {info['block_count']} vision blocks, the checkpoint {depth}"
        )
    if info["projection_dim"] != embedding_length:
        raise FlexSelectError(
            f"the projector outputs {info['projection_dim']}-wide embeddings but the language model "
            f"takes {embedding_length}"
        )
    levels = len(vision.get("deepstack_visual_indexes", []))
    if info.get("deepstack_layers", 0) != levels:
        raise FlexSelectError(
            f"the converted projector has {info.get('deepstack_layers', 0)} DeepStack levels, the checkpoint {levels}"
        )


def export_gguf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    outtype: str = "f16",
    llama_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Convert `model_dir` into OUT_DIR/model.gguf and OUT_DIR/mmproj.gguf; returns their paths.

    `llama_dir`: a llama.cpp source tree to take the converter from (default: the pinned sdist's, fetched once).
    """
    if outtype not in OUTTYPES:
        raise FlexSelectError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    model_dir, out_dir = Path(model_dir), check_output_dir(out_dir)
    if out_dir.is_dir():  # e.g. a folder named model.gguf inside it would fail only after the conversion
        for name in ("model.gguf", "mmproj.gguf"):
            check_output_file(out_dir / name)
    if importlib.util.find_spec("gguf") is None:  # needed to check the result: say so before converting
        raise FlexSelectError("the gguf package is missing: pip install 'flexselect[gguf]' (or pip install gguf)")
    config = _read_config(model_dir)
    if llama_dir is None:
        from .llama_cpp_source import llama_cpp_source

        try:
            llama_dir = llama_cpp_source()
        except (RuntimeError, OSError) as e:
            raise FlexSelectError(f"could not fetch llama.cpp's converter: {e}") from None
    llama_dir = Path(llama_dir)
    if not (llama_dir / "convert_hf_to_gguf.py").is_file():
        raise FlexSelectError(f"{llama_dir} has no convert_hf_to_gguf.py")

    final_model, final_mmproj = out_dir / "model.gguf", out_dir / "mmproj.gguf"
    with output_dir(out_dir):  # folders it had to create are removed again if the conversion fails
        staging = Path(tempfile.mkdtemp(prefix=".gguf-export-", dir=out_dir))
        tmp_model, tmp_mmproj = staging / "model.gguf", staging / "mmproj.gguf"
        try:
            model_type = config["model_type"]
            _run_converter(llama_dir, model_dir, model_type, tmp_model, outtype, mmproj=False)
            _run_converter(
                llama_dir, model_dir, model_type, tmp_mmproj, "f32" if outtype == "f32" else "f16", mmproj=True
            )
            text = inspect_gguf(tmp_model)
            _check_text(text, config)
            _check_mmproj(inspect_gguf(tmp_mmproj), config, text["embedding_length"])
            os.replace(tmp_mmproj, final_mmproj)
            os.replace(tmp_model, final_model)
        finally:
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    return final_model, final_mmproj


if __name__ == "__main__":
    from flexselect.cli import main

    sys.exit(main(["export", "gguf", *sys.argv[1:]]))
