"""Run the vendored `convert_hf_to_gguf.py` with two fixes for checkpoints the released Qwen3 models never were.

    python export/convert_qwen3.py LLAMA_CPP_DIR MODEL_DIR --outfile ... [converter options]

1. Tokenizer: the dense Qwen3-VL text converter reads a SentencePiece `tokenizer.model` when the folder has one and
   only otherwise identifies the byte-level BPE by hashing its output (which only the real 151k-token Qwen2
   vocabulary passes); the Qwen3-VL-MoE and Qwen3.5 (dense and MoE) converters go straight to the hash. They get the
   dense one's rule here, so a folder with a `tokenizer.model` (the tiny test checkpoints) converts; released
   checkpoints ship none and take the same BPE route as before.
2. MoE expert layout: the converter expects Qwen3-VL-MoE experts as released ([experts, in, out]); a checkpoint
   saved by transformers >= 5 stores them as nn.Linear weights ([experts, out, in]). Those are transposed back first,
   told apart by shape, or, where the shapes cannot tell (hidden == 2 x expert width), by the transformers version
   that wrote the checkpoint.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def _saved_by_transformers_5(model_dir: Path) -> bool:
    version = json.loads((model_dir / "config.json").read_text()).get("transformers_version", "0")
    return int(version.split(".")[0]) >= 5


def main() -> None:
    llama_dir = Path(sys.argv.pop(1))
    model_dir = Path(next(a for a in sys.argv[1:] if not a.startswith("-")))
    sys.path[:0] = [str(llama_dir / "gguf-py"), str(llama_dir)]
    from conversion.qwen import Qwen2Model, Qwen3_5MoeTextModel, Qwen3_5TextModel
    from conversion.qwen3vl import Qwen3VLMoeTextModel

    for cls in (Qwen3VLMoeTextModel, Qwen3_5TextModel, Qwen3_5MoeTextModel):
        cls.set_vocab = Qwen2Model.set_vocab  # SentencePiece first, the BPE hash otherwise

    linear_layout = _saved_by_transformers_5(model_dir)
    released_modify = Qwen3VLMoeTextModel.modify_tensors

    def modify_tensors(self, data_torch, name, bid):
        text = self.hparams.get("text_config", self.hparams)
        hidden, width = text["hidden_size"], text["moe_intermediate_size"]
        if data_torch.ndim == 3 and name.endswith(("mlp.experts.down_proj", "mlp.experts.gate_up_proj")):
            n_in, n_out = (width, hidden) if name.endswith("down_proj") else (hidden, 2 * width)
            shape = tuple(data_torch.shape[1:])
            if shape == (n_out, n_in) and (shape != (n_in, n_out) or linear_layout):
                data_torch = data_torch.transpose(1, 2)
        return released_modify(self, data_torch, name, bid)

    Qwen3VLMoeTextModel.modify_tensors = modify_tensors
    sys.argv[0] = str(llama_dir / "convert_hf_to_gguf.py")
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
