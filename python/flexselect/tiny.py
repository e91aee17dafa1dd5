"""Tiny, randomly initialised checkpoints (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL) built from configs, for
the demo and the tests.

Their answers are noise: they exist so that every code path (vision tower, M-RoPE, the scoring pass, generation,
GGUF export, the C++ runtime) runs offline on any machine, with the real classes and file layout of a checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    # llama.cpp (vendored 0c1e57098) never reads the qwen2vl GGUF's RMS-norm epsilon and runs with 0; the tiny
    # model's embeddings are small (mean square ~4e-4), so 1e-6 would already shift layer 0 by 0.1%.
    "rms_norm_eps": 1e-12,
    # head_dim 16: 8 rotary frequencies split over (t, h, w)
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
}
TINY_VISION = {
    "depth": 3,  # the GGUF converter needs at least 3 vision blocks
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 2,
    "window_size": 112,
    "fullatt_block_indexes": [2],
    "out_hidden_size": 64,
}
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CORPUS = [
    "What is the color of the car in the video? The car is red.",
    "Describe what happens after the person opens the door.",
    "How many people appear in the video? Answer with the option's letter from the given choices directly.",
    "You are a helpful assistant. system user assistant",
    "A. red B. green C. blue D. yellow The answer is",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 512):
    """A SentencePiece BPE (byte fallback, the chat special tokens as control pieces) trained on a few sentences,
    and the equivalent `tokenizers` tokenizer. Returns (tokenizer, sentencepiece model bytes).

    Why SentencePiece: llama.cpp's converter identifies a byte-level BPE tokenizer by hashing how it tokenizes a
    fixed text, which only the real (151k-token) Qwen2 vocabulary reproduces; with a `tokenizer.model` present it
    takes the SentencePiece route instead. The `tokenizers` twin gives transformers exactly the ids llama.cpp's
    SentencePiece tokenizer gives: a space is prepended to every text segment between special tokens (llama.cpp's
    default for SentencePiece vocabularies), merges follow the piece scores, unknown characters fall back to bytes.
    """
    import io

    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        control_symbols=SPECIAL_TOKENS,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # A merge for every way a normal piece splits into two pieces, ranked by the piece's score (its id order).
    merges = []
    for i, text in enumerate(pieces):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token="<unk>", byte_fallback=True, fuse_unk=True
        )
    )
    # Every segment between special tokens gets one leading space, even one that starts with a space.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok, buf.getvalue()


# Qwen2-VL's tower: no windowed attention, no time scaling (tokens_per_second), an embed_dim of its own
TINY_QWEN2_VL_VISION = {
    "depth": 3,
    "embed_dim": 32,
    "hidden_size": 64,
    "num_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def build_tiny_qwen2_5_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete tiny Qwen2.5-VL checkpoint folder (config, weights, tokenizer, preprocessor) and return it.

    The folder is written beside `out_dir` and renamed into place, so an interrupted build never leaves a
    half-written checkpoint that would later load as if it were whole.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return _build_tiny_qwen(
        out_dir, seed, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, TINY_VISION, "Qwen2_5_VLProcessor"
    )


def build_tiny_qwen2_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The same for Qwen2-VL (the same language model and tokenizer; GGUF-exportable too)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return _build_tiny_qwen(
        out_dir, seed, Qwen2VLConfig, Qwen2VLForConditionalGeneration, TINY_QWEN2_VL_VISION, "Qwen2VLProcessor"
    )


def _build_tiny_qwen(out_dir, seed: int, config_class, model_class, vision: dict, processor_class: str) -> Path:
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok, spm_model = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = tok.get_vocab_size()
    config = config_class(
        text_config={
            **TINY_TEXT,
            "vocab_size": vocab_size,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        vocab_size=vocab_size,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _widen(model, "q_proj", "k_proj")
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 3136,
        "max_pixels": 12845056,
    }
    return _write_checkpoint(out, model, tok, {"preprocessor_config.json": preprocessor}, CHAT_TEMPLATE, spm_model)


# -- other families: LLaVA-OneVision and InternVL on a plain Qwen2 language model (1-D RoPE) ----------------------
TINY_QWEN2_TEXT = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}
TINY_SQUARE_VISION = {  # 112 / 14 = 8x8 patches -> 4x4 tokens per frame after pooling / pixel shuffle
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 112,
    "patch_size": 14,
}


def _tokenizer_with(extra_special: list[str]):
    """The shared tiny tokenizer plus a family's own special tokens (appended after the shared vocabulary)."""
    from tokenizers import AddedToken

    tok, _ = build_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    return tok, {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + extra_special}


def _widen(model, *parts: str, within: str = "") -> None:
    """Random init at std 0.02 gives near-uniform attention everywhere; a wider spread of the matrices named
    `parts` (inside `within`) makes the tiny model's rankings decisive, which keeps cross-backend comparisons
    (f32 vs f16, torch vs llama.cpp) meaningful."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and within in name and any(part in name for part in parts):
                p.normal_(0.0, 0.25)


def _write_checkpoint(
    out: Path,
    model,
    tok,
    configs: dict[str, dict],
    chat_template: str | None = None,
    spm_model: bytes | None = None,
    extra_special: list[str] | None = None,
) -> Path:
    """Every builder's last step: model, tokenizer (with the family's own special tokens), its SentencePiece
    model where the GGUF converter reads one, and the preprocessor `configs` (file name: content), written beside
    `out` and renamed into place, so an interrupted build never leaves a half-written checkpoint."""
    from transformers import PreTrainedTokenizerFast

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    model.save_pretrained(staging)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:] + (extra_special or []),
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(staging)
    if spm_model is not None:
        (staging / "tokenizer.model").write_bytes(spm_model)  # what the GGUF converter reads
    for name, content in configs.items():
        (staging / name).write_text(json.dumps(content, indent=2))
    staging.rename(out)
    return out


def _build_on_qwen2(out_dir, seed: int, extra_special: list[str], model_class, config_of, preprocessor: dict) -> Path:
    """LLaVA-OneVision and InternVL: the shared tokenizer plus the family's special tokens, a plain Qwen2 language
    model (`config_of(text_config, token ids)` gives the family's config), Q/K widened in the language model."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok, ids = _tokenizer_with(extra_special)
    text = {
        **TINY_QWEN2_TEXT,
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    torch.manual_seed(seed)
    model = model_class(config_of(text, ids)).eval()
    torch.manual_seed(seed)
    _widen(model, "q_proj", "k_proj", within="language_model")
    configs = {"preprocessor_config.json": preprocessor}
    return _write_checkpoint(out, model, tok, configs, extra_special=extra_special)


def build_tiny_llava_onevision(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random LLaVA-OneVision checkpoint (SigLIP tower at 112 px -> 4x4 pooled tokens per frame)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    def config_of(text: dict, ids: dict) -> LlavaOnevisionConfig:
        return LlavaOnevisionConfig(
            text_config=text,
            vision_config={**TINY_SQUARE_VISION, "model_type": "siglip_vision_model"},
            image_token_index=ids["<image>"],
            video_token_index=ids["<video>"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )

    preprocessor = {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "do_resize": True,
        "size": {"height": 112, "width": 112},
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    extra = ["<image>", "<video>"]
    return _build_on_qwen2(out_dir, seed, extra, LlavaOnevisionForConditionalGeneration, config_of, preprocessor)


def build_tiny_internvl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random InternVL checkpoint (InternViT at 112 px, pixel shuffle -> 4x4 tokens + <img>/</img>)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    def config_of(text: dict, ids: dict) -> InternVLConfig:
        return InternVLConfig(
            text_config=text,
            vision_config=TINY_SQUARE_VISION,
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=16,
            downsample_ratio=0.5,
        )

    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "do_resize": True,
        "size": {"height": 112, "width": 112},
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    extra = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    return _build_on_qwen2(out_dir, seed, extra, InternVLForConditionalGeneration, config_of, preprocessor)


# -- planted attention: the demo's red-square finder and the tests' needles -------------------------------------
def plant_attention(
    text_model, layer: int, key: torch.Tensor, query: torch.Tensor | None = None, query_bias: float = 0.0
) -> None:
    """Arrange a (tiny) language model so that `layer` attends along one direction, in place.

    The layers before `layer` pass their input through (zero attention-output and MLP-down weights: only the residual
    path is left), so `layer` sees the input embeddings. There, every head's key is the normed input's projection on
    `key` and its query the projection on `query` (or none) plus `query_bias`, both on the lowest rotary frequency,
    which positions barely rotate. Tokens along `key` then draw the attention of tokens along `query`.
    """
    with torch.no_grad():
        for block in text_model.layers[:layer]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        block = text_model.layers[layer]
        block.input_layernorm.weight.fill_(1.0)
        attn = block.self_attn
        head_dim = attn.head_dim
        slot = head_dim // 2 - 1
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
        for proj, direction, bias in ((attn.k_proj, key, 0.0), (attn.q_proj, query, query_bias)):
            for head in range(proj.weight.shape[0] // head_dim):
                if direction is not None:
                    proj.weight[head * head_dim + slot] = direction
                if bias:
                    proj.bias[head * head_dim + slot] = bias


# -- Qwen3-VL (dense and MoE): Q/K norms, interleaved M-RoPE, DeepStack, patch 16 ---------------------------------
TINY_QWEN3_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    # head_dim 16: 8 rotary frequencies interleaved over (t, h, w) as in the real [24, 20, 20] of 64
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    },
}
TINY_QWEN3_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}
TINY_QWEN3_VISION = {
    "depth": 3,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 64,  # an 8x8 grid of learned position embeddings, interpolated to each frame
    "deepstack_visual_indexes": [0, 1, 2],  # three DeepStack levels, as the real models: added after text layers 0-2
}
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Qwen3-VL's frame processing (16-pixel patches, 2x2 merge, pixels to [-1, 1]); Qwen3.5 reuses its video side.
QWEN3_PROCESSING = {
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


def build_tiny_qwen3_vl(out_dir: str | os.PathLike, seed: int = 0, moe: bool = False) -> Path:
    """A complete tiny random Qwen3-VL checkpoint folder (`moe`: Qwen3-VL-MoE), with the tokenizer of the tiny
    Qwen2.5-VL (SentencePiece model included, for the GGUF converter) and Qwen3-VL's preprocessor configs."""
    if moe:
        from transformers import Qwen3VLMoeConfig as config_class
        from transformers import Qwen3VLMoeForConditionalGeneration as model_class
    else:
        from transformers import Qwen3VLConfig as config_class
        from transformers import Qwen3VLForConditionalGeneration as model_class

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok, spm_model = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text = {
        **TINY_QWEN3_TEXT,
        **(TINY_QWEN3_MOE if moe else {}),
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "tie_word_embeddings": False,
    }
    config = config_class(
        text_config=text,
        vision_config=TINY_QWEN3_VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # As for Qwen2.5-VL: wider Q/K projections make the tiny model's rankings decisive. The DeepStack mergers get
    # the same spread, so their features move the scores (a pass that misplaced them would show).
    _widen(model, "q_proj", "k_proj", "deepstack_merger")
    configs = {
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessorFast",
            "processor_class": "Qwen3VLProcessor",
            **QWEN3_PROCESSING,
            "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        },
        "video_preprocessor_config.json": {
            "video_processor_type": "Qwen3VLVideoProcessor",
            "processor_class": "Qwen3VLProcessor",
            **QWEN3_PROCESSING,
            "size": {"shortest_edge": 4096, "longest_edge": 25165824},
            "fps": 2,
            "min_frames": 4,
            "max_frames": 768,
        },
    }
    return _write_checkpoint(out, model, tok, configs, QWEN3_CHAT_TEMPLATE, spm_model)


# -- Qwen3.5 and Qwen3.5-MoE: the hybrid Gated DeltaNet / full-attention text stack on the Qwen3-VL vision tower --
# Eight layers with the real `full_attention_interval` of 4: linear attention at 0-2 and 4-6, full softmax
# attention (with its output gate and per-head Q/K norms) at 3 and 7. Head dim 64 with the real partial rotary
# factor 0.25 leaves 8 rotary frequencies, split over (t, h, w) by the interleaved M-RoPE section [3, 3, 2]
# (the real [11, 11, 10] scaled down). The linear-attention heads keep the real key:value head ratio of 1:2.
TINY_QWEN3_5_TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 8,
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
    },
}
TINY_QWEN3_5_DENSE_MLP = {"intermediate_size": 128}
TINY_QWEN3_5_MOE_MLP = {
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
}
TINY_QWEN3_5_VISION = {  # Qwen3-VL's tower without DeepStack: patch 16, merge 2 -> one token per 32x32 pixels
    "depth": 3,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 64,  # an 8x8 learned grid, resampled to each frame's grid
}


def build_tiny_qwen3_5(out_dir: str | os.PathLike, seed: int = 0, moe: bool = False) -> Path:
    """A tiny random Qwen3.5 (or, with `moe`, Qwen3.5-MoE) checkpoint folder, written atomically like the others.

    Same tokenizer as the Qwen2.5-VL builder (with its `tokenizer.model`, so the GGUF converter takes the
    SentencePiece route). Q and K are RMS-normalised per head before the score, so widening their projections as
    the other builders do would change nothing: the Q/K norm weights are raised instead (softmax temperature ~1/4
    of the default init), which makes the tiny model's rankings decisive.
    """
    if moe:
        from transformers import Qwen3_5MoeConfig as config_class
        from transformers import Qwen3_5MoeForConditionalGeneration as model_class
    else:
        from transformers import Qwen3_5Config as config_class
        from transformers import Qwen3_5ForConditionalGeneration as model_class

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok, spm_model = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = tok.get_vocab_size()
    text = {
        **TINY_QWEN3_5_TEXT,
        **(TINY_QWEN3_5_MOE_MLP if moe else TINY_QWEN3_5_DENSE_MLP),
        "vocab_size": vocab_size,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = config_class(
        text_config=text,
        vision_config=TINY_QWEN3_5_VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
                p.fill_(1.0)  # zero-centred RMSNorm: scale 1 + 1 = 2 on each of Q and K
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        **QWEN3_PROCESSING,
    }
    return _write_checkpoint(out, model, tok, {"preprocessor_config.json": preprocessor}, spm_model=spm_model)


def build_tiny_qwen3_5_moe(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random Qwen3.5-MoE checkpoint (4 experts, 2 active, plus the shared expert)."""
    return build_tiny_qwen3_5(out_dir, seed, moe=True)
