"""Qwen2.5-VL / Qwen2-VL GGUFs on llama.cpp (llama-cpp-python 0.3.36's low-level API): the `Backend` protocol.

What each step does, and how it matches the transformers backend (`hf/qwen2_5_vl.py`, positions from
`flexselect.mrope`):

* **encode**: frames are resized to the transformers backend's frame size (`frame_size`: each side rounded to a
  multiple of 28, bicubic with antialias, then rounded to uint8 because mtmd takes RGB bytes) and handed to mtmd
  two at a time: both bitmaps get `mtmd_bitmap_set_mergeable(bmp, true)` and go to `mtmd_tokenize_from_parts` as
  two adjacent bitmap parts, which mtmd groups into ONE image chunk (Qwen's 2-frame temporal patch, exactly what
  transformers' video path computes); an odd last frame is paired with itself, as Qwen's processor repeats it.
  The mtmd context is created with `image_min_tokens = 1` and a large `image_max_tokens` so that mtmd's own resize
  never fires on a frame that already has the right size. `mtmd_encode_chunk` + `mtmd_get_output_embd` give the
  chunk's rows*cols embeddings, which are kept (frame-major) as `VisualTokens.embeds`.
* **prompt**: `defaults.json`'s prefix/suffix tokenized by llama.cpp with special tokens parsed, no BOS.
* **positions**: the very functions of the transformers backend (`video_positions`, `layout_positions`,
  `full_video_extent`), written for llama.cpp as 4 values per token, section-major (all t, all y, all x, zeros) in a
  `llama_batch` built here (`llama_batch_init` would allocate only one position per token).
* **score**: three `llama_decode` calls (prefix tokens; the set's embeddings through `llama_batch.embd`; suffix
  tokens), each cut into pieces of at most `n_batch` tokens. The context's `cb_eval` callback asks for the
  post-RoPE tensors `Qcur-{L}` and `Kcur-{L}` (the nodes named so whose op is ROPE; the same names are also given
  to pre-RoPE views) and copies them out per micro-batch with `ggml_backend_tensor_get`. Once both are captured in a
  micro-batch the callback returns false, and the vendored ggml scheduler (ggml-backend.cpp,
  `ggml_backend_sched_compute_splits`) then stops computing that graph split: nothing after layer L's Q/K runs.
  Splits after the one holding layer L (partial GPU offload) are cut short the same way: the callback asks for their
  first node and returns false. The KV cache of layers < L is written as usual, so the suffix's passes through
  layers 0..L-1 see the prefix and the video, exactly like one full forward. The scores are then
  `selection.question_attention_scores` on the captured rows, the formula every backend shares. The memory is
  cleared before every set.
  Alternative not taken: a GGUF truncated to L+1 layers from the export step (a second file per reference layer,
  and layer-scan would need one per layer). Measured (2 CPU threads, bench/gguf_vs_torch.py: 8-layer random LM,
  hidden 512, one set of 797 tokens, L = 6): stopped after layer 6 304 ms vs the same pass through all 8 layers
  374 ms (1.23x, about the 7/8 of the layers that run); on the tiny 4-layer model, 3072 tokens, L = 0: 29 ms vs
  394 ms. The Q/K captured with and without the stop are bit-identical (tests/test_gguf.py).
* **generate**: prefix, the kept embeddings at their ORIGINAL full-video positions, the suffix at its full-video
  positions, then one token at a time at the next position; greedy, or temperature/top-p with a seeded generator
  (the transformers backend's `sample`). TTFT is measured from the start of the answer pass to the first token.

Qwen3-VL and Qwen3.5 (dense and MoE; text architectures qwen3vl, qwen3vlmoe, qwen35, qwen35moe, projector
qwen3vl_merger) differ as their transformers adapters do (`hf/qwen3_vl.py`, `hf/qwen3_5.py`), and here as follows:

* **encode**: frames at multiples of 32 (patch 16 x merge 2); mtmd's rows are `llama_model_n_embd_inp` wide: the
  main embedding followed by one slice per DeepStack level (Qwen3.5: none). They are kept split as transformers'
  `DeepStackVisualTokens` (embeds + deepstack) and joined again for the exact tokens a pass carries, so llama.cpp's
  qwen3vl graph adds the DeepStack features of exactly those tokens after its first layers (`deepstack_out-{il}`).
* **layout**: [prefix] then per unit `<t seconds>` <|vision_start|> its tokens <|vision_end|>, then [suffix], with
  the positions of `hf/qwen3_vl.py` (text consecutive; a unit at s puts token (r, c) at (s, s + r, s + c) and the
  text after it at s + max(rows, cols); "compact" advances only by what a unit keeps). It is decoded as runs of
  text tokens and embedding rows; the mtmd image positions are the same (t, y, x) = (s, s + r, s + c).
* **scoring**: the same eval-callback capture of `Qcur-{L}` / `Kcur-{L}` (ROPE nodes: the post-Q/K-norm, post-
  M-RoPE tensors in llama.cpp's qwen3vl / qwen35 graphs; the pre-norm projections carry the same names) and the same
  stop. The visual columns are the set's token rows between the timestamp texts. Qwen3.5: only full-attention
  layers (not in `{arch}.attention.recurrent_layers`) can be the reference layer (`attention_layers`); the Gated
  DeltaNet layers before it update their convolution and recurrent state inside the stopped graph as in any decode.

Known difference to transformers: llama.cpp masks attention by position, not by sequence index. For video tokens
that share a temporal position (interval < 1, i.e. sampling faster than 4 fps) a token sees the tokens of the
other frame at the same t only where (row, col) is not after its own; transformers masks by order. With the
default 2 fps (interval 2) and any slower sampling the two masks are identical.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...defaults import family_defaults, prompt_text
from ...errors import FlexSelectError
from ...mrope import (
    PIXEL_FACTOR,
    compact_positions,
    frame_size,
    full_video_extent,
    layout_positions,
    time_interval,
    video_positions,
)
from ...selection import Aggregate, question_attention_scores
from ..base import Generation, GenerationConfig, OnToken, Progress, Prompt, VisualTokens, answer_tokens
from . import ggml
from .capture import Capture

if TYPE_CHECKING:
    from ...video import Clip

log = logging.getLogger("flexselect")

PROJECTORS = {"qwen2.5vl_merger": "qwen2_5_vl", "qwen2vl_merger": "qwen2_vl"}  # mmproj projector -> family
TEXT_ARCH = "qwen2vl"
QWEN3_ARCHS = {"qwen3vl": "qwen3_vl", "qwen3vlmoe": "qwen3_vl_moe", "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}
QWEN3_PROJECTOR = "qwen3vl_merger"
QWEN3_PIXEL_FACTOR = 32  # patch 16 x spatial merge 2
TEMPORAL_PATCH = 2
LOG_ERROR = 4
_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=5)  # llama.cpp's last error lines
_LOG_CALLBACK = None


def _usable_cores() -> int:
    """The cores this process may run on (taskset, cpusets), where the OS says; else all of them."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class LlamaSetIndex:
    """A frame set's saved scoring state on llama.cpp (see `LlamaCppBackend.index_set`)."""

    frames: tuple[int, ...]
    state: np.ndarray  # uint8: llama_state_seq_get_data of the prefix + set's KV cells
    keys: torch.Tensor  # [H_kv, C, d] layer-L keys of those cells, RoPE applied
    layer: int
    build_s: float  # what building it took: what each reuse saves
    device = "cpu"  # llama.cpp restores it from host memory

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.keys.numel() * self.keys.element_size()

    def to(self, device) -> LlamaSetIndex:
        return self


class LlamaCppBackend:
    """A Qwen2.5-VL (or Qwen2-VL) GGUF + its mmproj on llama.cpp. See the module docstring."""

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        mmproj_path: str | os.PathLike | None,
        n_ctx: int = 32768,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_batch: int = 512,
        positions: str = "original",
        abort_after_reference: bool = True,
        kv_f32: bool = False,
    ) -> None:
        try:
            import llama_cpp
            from llama_cpp import mtmd_cpp
        except ImportError as e:
            raise FlexSelectError(
                f"the llama.cpp backend needs llama-cpp-python==0.3.36 (pip install 'flexselect[gguf]'): {e}"
            ) from None
        if positions not in ("original", "compact"):
            raise FlexSelectError(f"positions must be 'original' or 'compact', got {positions!r}")
        self._ll, self._mtmd = llama_cpp, mtmd_cpp
        ggml.library()  # the eval callback's ctypes layer, checked here: an error cannot cross the C callback
        self.positions = positions
        self.abort_after_reference = abort_after_reference
        gguf_path = Path(gguf_path)
        self._check_files(gguf_path, mmproj_path)
        mmproj_path = Path(mmproj_path)
        self.paths = (gguf_path, mmproj_path)  # an on-disk index records which files it was made with
        from ..gguf_info import inspect_gguf

        text_info, proj_info = inspect_gguf(gguf_path), inspect_gguf(mmproj_path)
        if text_info["architecture"] == "clip":
            raise FlexSelectError(
                f"{gguf_path} is a vision projector (mmproj), not a language model: pass the "
                "language model GGUF as --gguf and this file as --mmproj"
            )
        arch = text_info["architecture"]
        if arch != TEXT_ARCH and arch not in QWEN3_ARCHS:
            raise FlexSelectError(
                f"{gguf_path} is a {arch!r} model; the llama.cpp backend supports Qwen2.5-VL / "
                f"Qwen2-VL ({TEXT_ARCH!r}), Qwen3-VL and Qwen3.5 ({', '.join(QWEN3_ARCHS)}) GGUFs"
            )
        if proj_info["architecture"] != "clip" or not proj_info.get("has_vision"):
            raise FlexSelectError(
                f"{mmproj_path} is not a vision projector (mmproj) GGUF; pass the mmproj "
                "written next to the model (flexselect export gguf writes mmproj.gguf)"
            )
        projector = proj_info["projector_type"]
        if arch in QWEN3_ARCHS:
            family = QWEN3_ARCHS[arch] if projector == QWEN3_PROJECTOR else None
            if family is None:
                raise FlexSelectError(
                    f"{mmproj_path} is a {projector!r} projector, but {gguf_path} is a {arch!r} "
                    f"model, which takes a {QWEN3_PROJECTOR!r} one: pass the mmproj of this model"
                )
            if proj_info["deepstack_layers"] != text_info["deepstack_layers"]:
                raise FlexSelectError(
                    f"{mmproj_path} gives {proj_info['deepstack_layers']} DeepStack levels but "
                    f"{gguf_path} takes {text_info['deepstack_layers']}: this mmproj belongs to "
                    "another model"
                )
        else:
            family = PROJECTORS.get(projector)
            if family is None:
                raise FlexSelectError(
                    f"{mmproj_path} is a {projector!r} projector; a {arch!r} model takes "
                    f"{' or '.join(map(repr, PROJECTORS))}: pass the mmproj of this model"
                )
        if proj_info["projection_dim"] != text_info["embedding_length"]:
            raise FlexSelectError(
                f"{mmproj_path} outputs {proj_info['projection_dim']}-wide embeddings but {gguf_path} takes "
                f"{text_info['embedding_length']}: this mmproj belongs to another model"
            )
        self.family = family
        self.qwen3 = arch in QWEN3_ARCHS  # timestamps as text, per-unit positions, DeepStack rows (module docstring)
        self.pixel_factor = QWEN3_PIXEL_FACTOR if self.qwen3 else PIXEL_FACTOR
        if "recurrent_layers" in text_info:  # Qwen3.5: the full-attention layers are the only ones to score
            recurrent = set(text_info["recurrent_layers"])
            self.attention_layers = [i for i in range(text_info["block_count"]) if i not in recurrent]
        self.defaults = family_defaults(family)
        self.n_ctx = self.context_length = int(n_ctx)
        self.n_batch = int(min(n_batch, n_ctx))
        self.n_threads = int(n_threads or _usable_cores())
        _LOG_TAIL.clear()
        self._install_logger()
        ll = llama_cpp
        ll.llama_backend_init()

        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.model = ll.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise FlexSelectError(f"llama.cpp could not load {gguf_path}: {self._last_error()}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.vocab_size = ll.llama_vocab_n_tokens(self.vocab)  # a Lite ranker's question embeddings must match it
        self.num_layers = ll.llama_model_n_layer(self.model)
        self.row_width = ll.llama_model_n_embd_inp(self.model)  # mtmd's rows (Qwen3-VL: main + DeepStack slices)
        self.hidden_size = ll.llama_model_n_embd(self.model) if self.qwen3 else self.row_width  # VisualTokens.embeds

        self._capture = Capture()
        self._cb = ll.ggml_backend_sched_eval_callback(self._capture)  # keep a reference: C holds the pointer
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.cb_eval = self._cb
        cparams.cb_eval_user_data = None
        cparams.no_perf = True
        if kv_f32:  # llama.cpp's KV cache is f16 even for an f32 GGUF; f32 for exact comparisons with transformers
            cparams.type_k = cparams.type_v = ggml.GGML_TYPE_F32
        if n_gpu_layers == 0 or not ll.llama_supports_gpu_offload():
            # flash attention pays off on GPUs; on CPU it made a 3072-token prefill 2.5x slower (bench/runtimes.py)
            cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise FlexSelectError(
                f"llama.cpp could not create a context of {self.n_ctx} tokens: "
                f"{self._last_error()}; try a smaller --n-ctx"
            )
        self.mem = ll.llama_get_memory(self.ctx)

        vparams = mtmd_cpp.mtmd_context_params_default()
        vparams.use_gpu = n_gpu_layers != 0
        vparams.print_timings = False
        vparams.n_threads = self.n_threads
        vparams.warmup = False
        vparams.image_min_tokens = 1  # never let mtmd resize: frames arrive at their final size
        vparams.image_max_tokens = 1 << 16
        self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.model, vparams)
        if not self.mtmd:
            self.close()
            raise FlexSelectError(f"mtmd could not load the vision projector {mmproj_path}: {self._last_error()}")
        if not mtmd_cpp.mtmd_decode_use_mrope(self.mtmd):
            self.close()
            raise FlexSelectError(f"{mmproj_path} does not use M-RoPE; expected a Qwen2.5-VL / Qwen2-VL projector")
        self.eos_token_ids = {t for t in range(self.vocab_size) if ll.llama_vocab_is_eog(self.vocab, t)}
        if self.qwen3:
            self._labels: dict[str, list[int]] = {}
            self._vision_start, self._vision_end = (self._special_id(t) for t in ("<|vision_start|>", "<|vision_end|>"))
        self.last_score_stats: dict = {}

    # -- setup helpers -------------------------------------------------------------------------------------------
    @staticmethod
    def _check_files(gguf_path: Path, mmproj_path) -> None:
        if not gguf_path.is_file():
            raise FlexSelectError(f"GGUF not found: {gguf_path}")
        if mmproj_path is None:
            raise FlexSelectError(
                f"{gguf_path} needs its vision projector: pass --mmproj mmproj.gguf "
                "(flexselect export gguf writes it next to model.gguf)"
            )
        if not Path(mmproj_path).is_file():
            raise FlexSelectError(f"mmproj not found: {mmproj_path}")
        for p in (gguf_path, Path(mmproj_path)):
            with open(p, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise FlexSelectError(f"{p} is not a GGUF file")

    def _install_logger(self) -> None:
        # llama.cpp's logger is process-wide and outlives any backend: one callback for the whole process, so a
        # freed backend never leaves llama.cpp calling into a released ctypes thunk (a crash at the next log line).
        global _LOG_CALLBACK
        if _LOG_CALLBACK is None:

            def on_log(level: int, text: bytes, _user) -> None:
                msg = text.decode("utf-8", "replace").rstrip() if text else ""
                if level >= LOG_ERROR and msg:
                    _LOG_TAIL.append(msg)
                    log.debug("llama.cpp: %s", msg)

            _LOG_CALLBACK = self._ll.llama_log_callback(on_log)
        self._ll.llama_log_set(_LOG_CALLBACK, None)
        self._mtmd.mtmd_log_set(_LOG_CALLBACK, None)

    @staticmethod
    def _last_error() -> str:
        return " | ".join(_LOG_TAIL) or "no details from llama.cpp"

    def close(self) -> None:
        if getattr(self, "mtmd", None):
            self._mtmd.mtmd_free(self.mtmd)
            self.mtmd = None
        if getattr(self, "ctx", None):
            self._ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self._ll.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- frames -> visual tokens ---------------------------------------------------------------------------------
    @staticmethod
    def frames_rgb(frames: np.ndarray, factor: int = PIXEL_FACTOR) -> np.ndarray:
        """uint8 [N, H, W, 3] at the transformers backend's frame size (same resize), still uint8 RGB for mtmd."""
        size = frame_size(frames.shape[1], frames.shape[2], factor)
        if size == tuple(frames.shape[1:3]):
            return np.ascontiguousarray(frames)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
        return x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

    def _encode_pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = self._mtmd
        bitmaps = []
        for frame in (a, b):
            h, w = frame.shape[:2]
            data = np.ascontiguousarray(frame)
            bmp = m.mtmd_bitmap_init(w, h, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
            if not bmp:
                raise FlexSelectError("mtmd could not create a bitmap for a frame")
            m.mtmd_bitmap_set_mergeable(bmp, True)  # the two frames become one temporal patch
            bitmaps.append(bmp)
        parts = [m.mtmd_input_part(text=None, bitmap=bmp) for bmp in bitmaps]
        part_ptrs = (ctypes.POINTER(m.mtmd_input_part) * 2)(*[ctypes.pointer(p) for p in parts])
        chunks = m.mtmd_input_chunks_init()
        try:
            rc = m.mtmd_tokenize_from_parts(self.mtmd, chunks, part_ptrs, 2, False)
            if rc != 0:
                raise FlexSelectError(f"mtmd could not preprocess a frame pair (code {rc}): {self._last_error()}")
            images = [m.mtmd_input_chunks_get(chunks, i) for i in range(m.mtmd_input_chunks_size(chunks))]
            images = [c for c in images if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            if len(images) != 1:
                raise FlexSelectError(f"mtmd made {len(images)} image chunks of a frame pair, expected 1 (merged)")
            chunk = images[0]
            n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
            if m.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                raise FlexSelectError(f"mtmd failed to encode a frame pair: {self._last_error()}")
            out = m.mtmd_get_output_embd(self.mtmd)
            return np.ctypeslib.as_array(out, shape=(n_tokens * self.row_width,)).reshape(n_tokens, -1).copy()
        finally:
            m.mtmd_input_chunks_free(chunks)
            for bmp in bitmaps:
                m.mtmd_bitmap_free(bmp)

    def encode(self, clip: Clip, progress: Progress | None = None) -> VisualTokens:
        frames = self.frames_rgb(np.asarray(clip.frames), self.pixel_factor)
        n = len(frames)
        if n == 0:
            raise FlexSelectError("the clip has no frames")
        h, w = frames.shape[1:3]
        grid = (h // self.pixel_factor, w // self.pixel_factor)
        units = math.ceil(n / TEMPORAL_PATCH)
        # the family's rule from defaults.json (the GGUF does not carry it): Qwen2-VL steps by 1 per unit
        interval = time_interval(self.defaults.tokens_per_second, TEMPORAL_PATCH, clip.sample_fps)
        if interval < 1 and not self.qwen3:
            log.warning(
                "sampling at %.1f fps puts several frame pairs on one temporal position; llama.cpp masks "
                "attention by position, so its answers can differ slightly from transformers' (<= 4 fps "
                "avoids this)",
                clip.sample_fps,
            )
        embeds = np.empty((units * grid[0] * grid[1], self.row_width), dtype=np.float32)
        tpf = grid[0] * grid[1]
        for u in range(units):
            a = frames[2 * u]
            b = frames[2 * u + 1] if 2 * u + 1 < n else a  # an odd last frame fills its patch with itself
            out = self._encode_pair(a, b)
            if out.shape[0] != tpf:
                raise FlexSelectError(f"mtmd gave {out.shape[0]} tokens for a {h}x{w} frame pair, expected {tpf}")
            embeds[u * tpf : (u + 1) * tpf] = out
            if progress:
                progress(min(2 * u + 2, n), n)
        if self.qwen3:
            return self._deepstack_tokens(embeds, clip, units, grid, (h, w))
        return VisualTokens(
            embeds=torch.from_numpy(embeds),
            num_frames=units,
            grid=grid,
            timestamps=np.asarray(clip.timestamps[::TEMPORAL_PATCH], dtype=np.float64),
            time_interval=interval,
            frame_size=(h, w),
            source=getattr(clip, "source", ""),
            frames_per_unit=TEMPORAL_PATCH,
        )

    def _deepstack_tokens(
        self, rows: np.ndarray, clip: Clip, units: int, grid: tuple[int, int], size: tuple[int, int]
    ) -> VisualTokens:
        """mtmd's [main | DeepStack level 0 | level 1 | ...] rows as transformers' Qwen3-VL visual tokens."""
        # one definition of the type and of the unit times: the transformers adapter's
        from ..hf.qwen3_vl import DeepStackVisualTokens, unit_seconds

        d = self.hidden_size
        rows_t = torch.from_numpy(rows)
        return DeepStackVisualTokens(
            embeds=rows_t[:, :d].contiguous(),
            num_frames=units,
            grid=grid,
            timestamps=np.asarray(clip.timestamps[::TEMPORAL_PATCH], dtype=np.float64),
            time_interval=1.0,  # unused: every unit restarts its positions
            frame_size=size,
            source=getattr(clip, "source", ""),
            frames_per_unit=TEMPORAL_PATCH,
            deepstack=rows_t[:, d:].reshape(len(rows), -1, d).transpose(0, 1).contiguous(),
            label_seconds=unit_seconds(clip.timestamps, TEMPORAL_PATCH),
        )

    # -- prompt --------------------------------------------------------------------------------------------------
    def _special_id(self, token: str) -> int:
        ids = self.tokenize(token)
        if len(ids) != 1:
            self.close()
            raise FlexSelectError(f"the model's vocabulary has no {token} token: not a Qwen3-VL / Qwen3.5 GGUF")
        return ids[0]

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._ll.llama_token * cap)()
        n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            cap = -n
            buf = (self._ll.llama_token * cap)()
            n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, cap, False, True)
        return list(buf[:n])

    def prompt(self, question: str) -> Prompt:
        prefix, suffix = prompt_text(self.family, question)
        return Prompt(
            torch.tensor(self.tokenize(prefix), dtype=torch.long),
            torch.tensor(self.tokenize(suffix), dtype=torch.long),
            question,
        )

    # -- decoding ------------------------------------------------------------------------------------------------
    def _decode(
        self,
        positions: np.ndarray,
        tokens: np.ndarray | None = None,
        embeds: np.ndarray | None = None,
        logits_last: bool = False,
    ) -> None:
        """Decode a run of tokens OR embeddings with M-RoPE positions [3, n], in pieces of at most n_batch."""
        ll = self._ll
        n_total = positions.shape[1]
        seq = (ll.llama_seq_id * 1)(0)
        for start in range(0, n_total, self.n_batch):
            stop = min(start + self.n_batch, n_total)
            n = stop - start
            batch = ll.llama_batch()
            batch.n_tokens = n
            keep = []
            if tokens is not None:
                tok = np.ascontiguousarray(tokens[start:stop], dtype=np.int32)
                pos = np.ascontiguousarray(positions[0, start:stop], dtype=np.int32)
                batch.token = tok.ctypes.data_as(ctypes.POINTER(ll.llama_token))
                keep.append(tok)
            else:
                emb = np.ascontiguousarray(embeds[start:stop], dtype=np.float32)
                pos = np.zeros((4, n), dtype=np.int32)  # section-major: all t, all y, all x, then zeros
                pos[:3] = positions[:, start:stop]
                pos = pos.reshape(-1)
                batch.embd = emb.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                keep.append(emb)
            batch.pos = pos.ctypes.data_as(ctypes.POINTER(ll.llama_pos))
            n_seq = np.ones(n, dtype=np.int32)
            seq_ids = (ctypes.POINTER(ll.llama_seq_id) * n)(*([seq] * n))
            logits = np.zeros(n, dtype=np.int8)
            if logits_last and stop == n_total:
                logits[-1] = 1
            batch.n_seq_id = n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
            batch.seq_id = seq_ids
            batch.logits = logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
            self._capture.done = False  # n_ubatch == n_batch: each llama_decode here is one micro-batch
            rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise FlexSelectError(f"llama_decode failed (code {rc}): {self._last_error()}")
            del keep, pos, n_seq, seq_ids, logits

    def _check_fits(self, n_tokens: int, what: str) -> None:
        if n_tokens > self.n_ctx:
            raise FlexSelectError(
                f"the {what} needs {n_tokens} tokens but the llama.cpp context holds {self.n_ctx}: use a smaller "
                f"--budget or fewer --frames, or a larger --n-ctx (at least {n_tokens})"
            )

    @staticmethod
    def _qwen2_runs(prompt: Prompt, embeds: np.ndarray, positions: torch.Tensor):
        """Qwen2.5-VL / Qwen2-VL's [prefix][visual rows][suffix] as decode runs (those of `_qwen3_layout`)."""
        p, v = len(prompt.prefix_ids), embeds.shape[0]
        pos = positions.numpy()
        return [
            (prompt.prefix_ids.numpy(), None, pos[:, :p]),
            (None, embeds, pos[:, p : p + v]),
            (prompt.suffix_ids.numpy(), None, pos[:, p + v :]),
        ]

    def scoring_layout(self, visual: VisualTokens, frames: list[int], prompt: Prompt):
        offsets = video_positions(len(frames), visual.grid, visual.time_interval)
        positions, _ = layout_positions(len(prompt.prefix_ids), offsets, int(offsets.max()), len(prompt.suffix_ids))
        return self._rows(visual, visual.frame_tokens(frames)), positions

    def _rows(self, visual: VisualTokens, index: torch.Tensor) -> np.ndarray:
        if visual.embeds.shape[1] != self.hidden_size:
            raise FlexSelectError(
                f"these visual tokens are {visual.embeds.shape[1]}-wide but the model takes "
                f"{self.hidden_size}: encode the video with this model"
            )
        index = index.to(visual.embeds.device)
        rows = visual.embeds[index].float().cpu()
        if self.row_width != self.hidden_size:  # Qwen3-VL: each row carries its DeepStack slices after it
            deepstack = getattr(visual, "deepstack", None)
            if deepstack is None or deepstack.shape[0] * self.hidden_size != self.row_width - self.hidden_size:
                raise FlexSelectError(
                    "these visual tokens lack this model's DeepStack features: encode the video with this model"
                )
            slices = deepstack[:, index].float().cpu().transpose(0, 1).reshape(len(rows), -1)
            rows = torch.cat([rows, slices], dim=1)
        return rows.numpy()

    # -- Qwen3-VL / Qwen3.5: timestamps as text, positions restarting per unit ----------------------------------
    def _qwen3_layout(
        self, visual: VisualTokens, units: list[int], tokens: list[torch.Tensor], prompt: Prompt, compact: bool
    ) -> tuple[list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray]], torch.Tensor, int]:
        """The sequence of `hf/qwen3_vl.py`'s layout as decode runs [(token ids | None, rows | None, positions
        [3, n])], the sequence indices of the visual tokens, and the next position. The suffix is the last run."""
        rows_, cols = visual.grid
        runs: list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray]] = []
        text: list[int] = []
        columns: list[torch.Tensor] = []
        at = pos = len(prompt.prefix_ids)
        text_pos = list(range(pos))
        text = prompt.prefix_ids.tolist()

        def flush() -> None:
            if text:
                runs.append((np.array(text, dtype=np.int32), None, np.tile(np.array(text_pos), (3, 1))))
            text.clear()
            text_pos.clear()

        def add_text(ids: list[int]) -> None:
            nonlocal pos, at
            text.extend(ids)
            text_pos.extend(range(pos, pos + len(ids)))
            pos += len(ids)
            at += len(ids)

        for unit, kept in zip(units, tokens):
            add_text([*self._label_ids(float(visual.label_seconds[unit])), self._vision_start])
            if len(kept):
                flush()
                local = kept - unit * visual.tokens_per_frame
                r, c = (local // cols).numpy(), (local % cols).numpy()
                runs.append((None, self._rows(visual, kept), np.stack([np.full_like(r, pos), pos + r, pos + c])))
                columns.append(torch.arange(at, at + len(kept)))
                at += len(kept)
            if not compact:
                pos += max(rows_, cols)
            elif len(kept):
                pos += int(max(r.max(), c.max())) + 1
            add_text([self._vision_end])
        flush()
        add_text(prompt.suffix_ids.tolist())
        flush()
        return runs, torch.cat(columns) if columns else torch.zeros(0, dtype=torch.long), pos

    def _label_ids(self, seconds: float) -> list[int]:
        # the Qwen3-VL processor's "<t seconds>", as the transformers adapter writes it
        from ..hf.qwen3_vl import timestamp_label

        label = timestamp_label(seconds)
        if label not in self._labels:
            self._labels[label] = self.tokenize(label)
        return self._labels[label]

    def _run_runs(self, runs, logits_last: bool = False) -> None:
        for i, (ids, rows, pos) in enumerate(runs):
            last = i == len(runs) - 1
            if ids is not None:
                self._decode(pos, tokens=ids, logits_last=logits_last and last)
            else:
                self._decode(pos, embeds=rows, logits_last=logits_last and last)

    def answer_layout(self, visual: VisualTokens, kept: torch.Tensor, prompt: Prompt):
        offsets = video_positions(visual.num_frames, visual.grid, visual.time_interval)[:, kept]
        if self.positions == "original":
            extent = full_video_extent(visual)
        else:
            offsets = compact_positions(offsets)
            extent = int(offsets.max())
        positions, next_position = layout_positions(len(prompt.prefix_ids), offsets, extent, len(prompt.suffix_ids))
        return self._rows(visual, kept), positions, next_position

    # -- scoring pass --------------------------------------------------------------------------------------------
    def reference_qk(
        self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int, abort: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE queries of the suffix rows [H, T, d] and keys of all positions [H_kv, N, d] at `layer` (in
        range: the pipeline checks it)."""
        if self.qwen3:
            return self._qwen3_reference_qk(visual, frames, prompt, layer, abort)[:2]
        embeds, positions = self.scoring_layout(visual, frames, prompt)
        return self._captured_qk(self._qwen2_runs(prompt, embeds, positions), layer, abort)

    def _captured_qk(self, runs, layer: int, abort: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode `runs` (the last: the question suffix) from an empty memory with the capture on: the suffix rows'
        queries [H, T, d] and the keys of all positions [H_kv, N, d] at `layer`."""
        n_total = sum(pos.shape[1] for _, _, pos in runs)
        self._check_fits(n_total, "scoring pass of one frame set")
        cap = self._capture
        cap.start(layer, self.abort_after_reference if abort is None else abort)
        try:
            self._ll.llama_memory_clear(self.mem, True)
            for i, (ids, rows, pos) in enumerate(runs):
                cap.want_q = i == len(runs) - 1  # the suffix: the question rows that score
                n_before = len(cap.q)
                self._decode(pos, tokens=ids) if ids is not None else self._decode(pos, embeds=rows)
        finally:
            cap.stop()
            self._ll.llama_memory_clear(self.mem, True)
        if cap.error:
            raise FlexSelectError(f"could not read the reference layer's tensors: {cap.error}")
        if not cap.k or any(q is None for q in cap.q[n_before:]):
            raise FlexSelectError(f"llama.cpp gave no Qcur-{layer}/Kcur-{layer} tensors at layer {layer}")
        q = torch.from_numpy(np.concatenate(cap.q[n_before:]))  # [T, H, d]
        k = torch.from_numpy(np.concatenate(cap.k))  # [N, H_kv, d]
        if k.shape[0] != n_total:
            raise FlexSelectError(f"captured keys for {k.shape[0]} of {n_total} positions")
        return q.transpose(0, 1), k.transpose(0, 1)

    def _check_attention_layer(self, layer: int) -> None:
        valid = getattr(self, "attention_layers", None)
        if valid is not None and layer not in valid:
            raise FlexSelectError(
                f"reference layer {layer} is a linear-attention layer, which has no attention map to score; this "
                f"model's full-attention layers are {', '.join(map(str, valid))}: pass one of them as --layer"
            )

    def _qwen3_reference_qk(
        self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int, abort: bool | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Qwen3-VL / Qwen3.5: (queries of the suffix rows, keys of all positions, visual columns) at `layer`."""
        self._check_attention_layer(layer)
        units = sorted(frames)
        if units != list(frames):
            raise FlexSelectError("a frame set must list its frames in time order")
        runs, columns, _ = self._qwen3_layout(
            visual, units, [visual.frame_tokens([u]) for u in units], prompt, compact=False
        )
        return *self._captured_qk(runs, layer, abort), columns

    def score(
        self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int, aggregate: Aggregate = "max"
    ) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.qwen3:
            q, k, columns = self._qwen3_reference_qk(visual, frames, prompt, layer, None)
            scores = question_attention_scores(q, k, columns, aggregate)
            self.last_score_stats = {"seconds": time.perf_counter() - t0, "tokens": k.shape[1]}
            return scores
        q, k = self.reference_qk(visual, frames, prompt, layer)
        start = len(prompt.prefix_ids)
        scores = question_attention_scores(q, k, slice(start, start + len(frames) * visual.tokens_per_frame), aggregate)
        self.last_score_stats = {"seconds": time.perf_counter() - t0, "tokens": k.shape[1]}
        return scores

    # -- the index: a set's question-independent scoring state, reused by later questions -----------------------
    # The prefix and the set's embeddings come before the question and attention is causal: their KV cache of
    # layers < L (written by the stopped pass as usual) and their layer-L keys are the same for every question.
    # `index_set` runs only them and saves the sequence's KV state (`llama_state_seq_get_data`); `score_indexed`
    # restores it (`llama_state_seq_set_data`) and decodes only the question's tokens. The scores are `score`'s.
    def index_bytes(self, visual: VisualTokens, sets: list[list[int]], prompt: Prompt, layer: int) -> int:
        """Bytes of the index before building: the saved state holds K and V of every layer (f16 by default) of
        the context cells, plus the layer-L keys as f32."""
        n_kv = self._ll.llama_model_n_head_kv(self.model) * self._head_dim()
        per_token = self.num_layers * 2 * n_kv * 2 + n_kv * 4
        return sum((len(prompt.prefix_ids) + len(f) * visual.tokens_per_frame) * per_token for f in sets)

    def _head_dim(self) -> int:
        return self._ll.llama_model_n_embd(self.model) // self._ll.llama_model_n_head(self.model)

    def index_set(
        self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int, device: str = "cpu"
    ) -> LlamaSetIndex:
        if not 0 <= layer < self.num_layers:
            raise FlexSelectError(
                f"reference layer {layer} is out of range: this model has layers 0..{self.num_layers - 1}"
            )
        t0 = time.perf_counter()
        runs = self._scoring_runs(visual, frames, prompt, layer)
        self._check_fits(sum(pos.shape[1] for _, _, pos in runs), "scoring pass of one frame set")
        n_context = sum(pos.shape[1] for _, _, pos in runs[:-1])  # all but the suffix
        cap = self._capture
        cap.start(layer, self.abort_after_reference)
        try:
            self._ll.llama_memory_clear(self.mem, True)
            cap.want_q = False
            self._run_runs(runs[:-1])
            cap.stop()
            size = self._ll.llama_state_seq_get_size(self.ctx, 0)
            state = np.empty(size, dtype=np.uint8)
            written = self._ll.llama_state_seq_get_data(
                self.ctx, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0
            )
        finally:
            cap.stop()
            self._ll.llama_memory_clear(self.mem, True)
        if cap.error:
            raise FlexSelectError(f"could not read the reference layer's tensors: {cap.error}")
        if written != size:
            raise FlexSelectError(f"llama.cpp saved {written} of {size} bytes of a frame set's state")
        keys = torch.from_numpy(np.concatenate(cap.k)).transpose(0, 1)  # [H_kv, C, d]
        if keys.shape[1] != n_context:
            raise FlexSelectError(f"captured keys for {keys.shape[1]} of {n_context} context positions")
        return LlamaSetIndex(tuple(frames), state, keys, layer, time.perf_counter() - t0)

    def score_indexed(
        self, entry: LlamaSetIndex, visual: VisualTokens, prompt: Prompt, aggregate: Aggregate = "max"
    ) -> torch.Tensor:
        t0 = time.perf_counter()
        frames = list(entry.frames)
        runs = self._scoring_runs(visual, frames, prompt, entry.layer)
        n = entry.keys.shape[1]
        if sum(pos.shape[1] for _, _, pos in runs[:-1]) != n:
            raise FlexSelectError("this index was made for another prompt or video")
        self._check_fits(n + runs[-1][2].shape[1], "scoring pass of one frame set")
        cap = self._capture
        cap.start(entry.layer, self.abort_after_reference)
        try:
            self._ll.llama_memory_clear(self.mem, True)
            read = self._ll.llama_state_seq_set_data(
                self.ctx, entry.state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), entry.state.size, 0
            )
            if read != entry.state.size:
                raise FlexSelectError(f"llama.cpp could not restore a frame set's state: {self._last_error()}")
            cap.want_q = True
            self._run_runs(runs[-1:])
        finally:
            cap.stop()
            self._ll.llama_memory_clear(self.mem, True)
        if cap.error:
            raise FlexSelectError(f"could not read the reference layer's tensors: {cap.error}")
        q = torch.from_numpy(np.concatenate(cap.q)).transpose(0, 1)  # [H, T, d]
        k = torch.from_numpy(np.concatenate(cap.k)).transpose(0, 1)
        columns = self._scoring_columns(visual, frames, prompt)
        scores = question_attention_scores(q, torch.cat([entry.keys, k], dim=1), columns, aggregate)
        self.last_score_stats = {"seconds": time.perf_counter() - t0, "tokens": n + k.shape[1], "indexed": True}
        return scores

    def _scoring_runs(self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int) -> list:
        """A scoring pass as decode runs (token ids | None, rows | None, positions); the suffix is the last."""
        if self.qwen3:  # timestamps as text: the layout `score` uses
            self._check_attention_layer(layer)
            units = list(frames)
            return self._qwen3_layout(visual, units, [visual.frame_tokens([u]) for u in units], prompt, False)[0]
        embeds, positions = self.scoring_layout(visual, frames, prompt)
        p, v, pos = len(prompt.prefix_ids), embeds.shape[0], positions.numpy()
        return [
            (prompt.prefix_ids.numpy(), None, pos[:, :p]),
            (None, embeds, pos[:, p : p + v]),
            (prompt.suffix_ids.numpy(), None, pos[:, p + v :]),
        ]

    def _scoring_columns(self, visual: VisualTokens, frames: list[int], prompt: Prompt):
        if self.qwen3:
            units = list(frames)
            return self._qwen3_layout(visual, units, [visual.frame_tokens([u]) for u in units], prompt, False)[1]
        start = len(prompt.prefix_ids)
        return slice(start, start + len(frames) * visual.tokens_per_frame)

    def index_tensors(self, entry: LlamaSetIndex) -> dict[str, torch.Tensor]:
        return {"state": torch.from_numpy(entry.state), "keys": entry.keys}

    def index_from_tensors(
        self, frames: tuple[int, ...], layer: int, build_s: float, tensors: dict[str, torch.Tensor]
    ) -> LlamaSetIndex:
        if "state" not in tensors or "keys" not in tensors:
            raise FlexSelectError("the index file lacks a frame set's saved state: it is damaged; rebuild it")
        return LlamaSetIndex(frames, tensors["state"].numpy(), tensors["keys"].float(), layer, build_s)

    def identity(self) -> dict:
        """What an on-disk index must match: the family, the model and projector files (size and content hash)."""
        from ...index import file_identity

        gguf, mmproj = self.paths
        return {
            "family": self.family,
            "runtime": "llama.cpp",
            "layers": self.num_layers,
            "gguf": file_identity(gguf),
            "mmproj": file_identity(mmproj),
        }

    # -- answer pass ---------------------------------------------------------------------------------------------
    def _logits(self) -> torch.Tensor:
        ptr = self._ll.llama_get_logits_ith(self.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy())

    def decode(self, token_ids: list[int]) -> str:
        return b"".join(self._piece(t) for t in token_ids).decode("utf-8", "replace")

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def generate(
        self,
        visual: VisualTokens,
        kept: torch.Tensor,
        prompt: Prompt,
        config: GenerationConfig,
        progress: Progress | None = None,
        on_token: OnToken | None = None,
    ) -> Generation:
        start = time.perf_counter()
        kept = kept.to(torch.long).cpu()
        self._capture.stop()
        if self.qwen3:  # every unit keeps its timestamp and delimiters, with its kept tokens (possibly none)
            owner = kept // visual.tokens_per_frame
            runs, _, next_position = self._qwen3_layout(
                visual,
                list(range(visual.num_frames)),
                [kept[owner == u] for u in range(visual.num_frames)],
                prompt,
                compact=self.positions == "compact",
            )
        else:
            embeds, positions, next_position = self.answer_layout(visual, kept, prompt)
            runs = self._qwen2_runs(prompt, embeds, positions)
        n_prompt = sum(pos.shape[1] for _, _, pos in runs)
        self._check_fits(n_prompt + 1, "answer prompt")
        self._ll.llama_memory_clear(self.mem, True)
        self._run_runs(runs, logits_last=True)
        position = next_position

        def feed(token: int) -> torch.Tensor:
            nonlocal position
            self._decode(np.full((3, 1), position, dtype=np.int64), tokens=np.array([token]), logits_last=True)
            position += 1
            return self._logits()

        token_ids, ttft, stopped = answer_tokens(
            self._logits(), feed, config, self.eos_token_ids, start, progress, on_token, room=self.n_ctx - n_prompt
        )
        if stopped == "context_full":
            log.warning("the llama.cpp context (%d tokens) is full; the answer is cut short", self.n_ctx)
        text = self.decode(token_ids).strip()
        total = time.perf_counter() - start
        return Generation(
            text=text,
            token_ids=token_ids,
            ttft_s=ttft,
            prompt_tokens=n_prompt,
            stats={"backend": "llama.cpp", "stopped": stopped, "seconds": total},
        )
