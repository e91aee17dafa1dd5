"""Qwen3.5 (dense `qwen3_5` and MoE `qwen3_5_moe`) on transformers: the Qwen3-VL adapter on a hybrid text stack.

Everything about video is Qwen3-VL's and inherited from `Qwen3VLBackend`: the vision tower and its patching (patch
16, merge 2, temporal patch 2), each unit written as `<t seconds>` <|vision_start|> tokens <|vision_end|> with its
positions restarting per unit, timestamps and delimiters never scored or dropped, and both answer layouts (original
positions by default, as measured for Qwen3-VL). Where Qwen3.5 differs:

- The text stack is hybrid. Most layers are Gated DeltaNet linear attention (a short causal convolution and a
  recurrent state; no softmax attention map); every `full_attention_interval`-th layer (`config.layer_types`) is
  softmax attention with per-head Q/K norms, a partial rotary (a quarter of each head) and a sigmoid output gate.
  FlexSelect's score exists only where there is a softmax, so `attention_layers` (the full-attention layers) are the
  only reference-layer candidates: the pipeline refuses any other `--layer` with the list, the default is the one
  nearest Qwen2.5-VL's relative depth (`defaults.reference_layer_for`) and layer-scan scans only these.
- The shared capture receives Q/K inside the attention interface, after the norms, the gate split and the partial
  M-RoPE, so nothing of that is rebuilt here. The linear layers below the reference layer run as in any uncached
  forward (their convolution and recurrent state start at zero and run over the whole [prefix, set, question]
  sequence); the scoring pass raises right after the reference layer's Q/K. Tests check both against an eager
  full forward.
- The answer pass caches the linear layers' convolution and recurrent state beside the full layers' keys and values
  (transformers' `DynamicCache` built from the text config holds both), so the linear layers see the kept sequence
  in order and decoding continues their recurrence.
- No DeepStack: the tower returns only the merged tokens and the language model takes no extra inputs.
- Tokenizer: read from the checkpoint's tokenizer.json as is. transformers maps `qwen3_5` to `Qwen3_5Tokenizer`,
  which rebuilds a byte-level BPE from the vocabulary and merges and so ignores the file's own pre-tokenizer and
  normaliser (for a real checkpoint the file describes the same tokenizer; for any other it would silently differ).
- Prompt (defaults.json): no system turn and the non-thinking answer cue (`<think>\\n\\n</think>\\n\\n`, what the
  chat template writes with thinking off): Qwen3.5 thinks by default, FlexSelect answers directly.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import FlexSelectError
from .llava_onevision import read_preprocessor
from .qwen3_vl import Qwen3VLBackend
from .shared import check_checkpoint_files, load_pretrained

FULL_ATTENTION = "full_attention"


class Qwen35Backend(Qwen3VLBackend):
    """Qwen3.5 / Qwen3.5-MoE via `Qwen3_5ForConditionalGeneration` / `Qwen3_5MoeForConditionalGeneration`."""

    def __init__(
        self, model, tokenizer, preprocessor: dict, family: str = "qwen3_5", positions: str = "original"
    ) -> None:
        super().__init__(model, tokenizer, preprocessor, family, positions)
        if not self.attention_layers:
            raise FlexSelectError("this Qwen3.5 model has no full-attention layer: FlexSelect has nothing to score")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto", positions: str = "original"):
        from transformers import AutoConfig, PreTrainedTokenizerFast

        path = Path(path)
        check_checkpoint_files(path)
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "qwen3_5_moe":
            from transformers import Qwen3_5MoeForConditionalGeneration as model_class
        else:
            from transformers import Qwen3_5ForConditionalGeneration as model_class
        model = load_pretrained(model_class, path, device, dtype)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)  # tokenizer.json as is (module docstring)
        return cls(model, tokenizer, read_preprocessor(path), config.model_type, positions)

    @property
    def attention_layers(self) -> list[int]:
        """The full-attention layers: the only ones with a softmax attention map to score."""
        return [i for i, kind in enumerate(self.text_model.config.layer_types) if kind == FULL_ATTENTION]
