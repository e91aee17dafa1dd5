"""Export a FlexSelect-Lite ranker bundle to ONNX: `ranker.onnx` (+ `manifest.json`) for ONNX Runtime and the C++ CLI.

    flexselect lite-export BUNDLE_DIR [--out DIR] [--target cpu|cuda] [--opset 23|18]

I/O (what `flexselect.lite.onnx_ranker` reads from the manifest):
- authors' layouts (qwen2_5_vl, llava_onevision, internvl): `RankerInputs` (layouts.py) -> `scores` float32 [S]:
  `input_ids` int64 [L], `vision_features` float [F, R, D], `visual_rows` int64 [V], `position_ids` int64 [K, L],
  `score_columns` int64 [S], `question_rows` int64 [T]; every size dynamic.
- host_embeds layout: the C++ runtime's two inputs, `visual_embeds` float32 [n, D_host] and `question_ids` int64
  [T] -> `scores` float32 [n] (the wrapper below builds the rest inside the graph).

What the graph computes: the decoder up to the scoring layer and, of that layer, only its input norm and Q/K (the
ranker's forward never uses the layer's attention output or MLP, so the exporter drops them as dead nodes), then
the question rows' softmax against all keys.

Targets, chosen at export time because one graph does not suit both:
- `cpu` (default): float32. Opset 23 maps SDPA to ONNX's fused `Attention` op (with `RMSNormalization` and
  `RotaryEmbedding`), run in one kernel by ONNX Runtime >= 1.23; `--opset 18` keeps the decomposed MatMul +
  Softmax graph for older runtimes (>= 1.14). ONNX Runtime's full graph optimizations are applied at load time.
  ONNX Runtime's CPU attention kernels (this `Attention`, and the contrib `GroupQueryAttention` /
  `MultiHeadAttention` its transformer optimizer would substitute; the latter's tiled flash path takes no causal
  mask) compute the whole L x L product even when causal, where torch's flash kernel skips the half above the
  diagonal; so the CPU graph runs each layer's attention in QUERY_BLOCKS query blocks against only the keys up
  to each block's end (`LiteRanker.blocked_causal_attention`), and a contrib-op graph would gain nothing here.
- `cuda`: float16 weights and activations (the scores' softmax stays float32: `question_attention_scores`
  casts), for the CUDA execution provider (onnxruntime-gpu), where the fused attention kernels take float16 and
  skip the masked blocks themselves (one query block). Not for the CPU: its float16 kernels are few and slow.

Exporter: torch.onnx's dynamo exporter (`torch.export` + onnxscript): sizes stay symbolic (the TorchScript
exporter could freeze Python-int sizes at the example's values), and tests/test_lite.py runs the graph at other
sizes against torch. Writing: a temporary folder beside the target, renamed into place weights-first, so a reader
never sees a half-written model; weights over 1.5 GiB (a float32 0.5B ranker is ~2 GB, over protobuf's 2 GiB
limit) go to `ranker.onnx.data` beside the graph.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from flexselect.errors import FlexSelectError
from flexselect.lite.bundle import MANIFEST, ONNX, load_torch_ranker, make_manifest, write_atomic
from flexselect.lite.layouts import INPUTS, RankerInputs
from flexselect.lite.ranker import LiteRanker
from flexselect.outputs import check_output_dir

OPSET = 23
OPSETS = (18, 23)
TARGETS = ("cpu", "cuda")
EMBEDS_INPUTS = ("visual_embeds", "question_ids")
OUTPUT = "scores"
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB
# Causal attention in query blocks per target (LiteRanker.blocked_causal_attention): ONNX Runtime's CPU kernels form
# the whole L x L product, so the CPU graph skips the blocks above the diagonal itself; its CUDA kernels skip them.
QUERY_BLOCKS = {"cpu": 4, "cuda": 1}


class RankerGraph(nn.Module):
    """What is traced: the ranker's exportable forward (`LiteRanker.graph_forward`) on RankerInputs."""

    def __init__(self, ranker: LiteRanker, query_blocks: int = 1) -> None:
        super().__init__()
        self.ranker, self.query_blocks = ranker, query_blocks

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.ranker.graph_forward(*inputs, query_blocks=self.query_blocks)


class EmbedsGraph(RankerGraph):
    """A host_embeds ranker behind the C++ runtime's I/O: [visual rows, question ids], 1-D positions."""

    def forward(self, visual_embeds: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        n = visual_embeds.shape[0]
        rows = torch.arange(n, device=visual_embeds.device)
        ids = torch.cat([torch.zeros_like(rows), question_ids])
        positions = torch.arange(ids.shape[0], device=visual_embeds.device)
        return super().forward(ids, visual_embeds[None], rows, positions[None], rows, positions[n:])


def example_inputs(ranker: LiteRanker) -> tuple[tuple[torch.Tensor, ...], tuple, tuple[str, ...]]:
    """Example inputs (sizes only seed the trace), their dynamic axes (as the traced forward's parameters take them)
    and names."""
    if ranker.layout == "host_embeds":
        n, t = torch.export.Dim("n_visual", min=2), torch.export.Dim("n_question", min=2)
        args = (torch.randn(40, ranker.vision_dim), torch.randint(0, ranker.config.vocab_size, (7,)))
        return args, ({0: n}, {0: t}), EMBEDS_INPUTS
    # 3 frames of 16 feature rows (LLaVA: a 4x4 patch grid -> 2x2 pooled + a newline per row = 6 tokens a frame)
    frames, rows = 3, 16
    llava = ranker.layout == "llava_onevision"
    features = torch.randn(frames, 4, 4, ranker.vision_dim) if llava else torch.randn(frames, rows, ranker.vision_dim)
    visual = frames * (6 if llava else rows)
    prefix, suffix = 5, 7
    length = prefix + visual + suffix
    example = RankerInputs(
        input_ids=torch.randint(0, ranker.config.vocab_size, (length,)),
        vision_features=features,
        visual_rows=prefix + torch.arange(visual),
        position_ids=torch.arange(length)[None].expand(3 if ranker.layout == "qwen2_5_vl" else 1, -1).contiguous(),
        score_columns=prefix + torch.arange(visual - 1),
        question_rows=torch.arange(prefix + visual, length),
    )
    # Every axis but the feature width (fixed by the projector) may vary; AUTO lets torch.export keep the relations
    # the graph implies (visual rows = projected tokens) instead of failing on them. tests/test_lite*.py run the
    # graph at other sizes than these.
    auto = torch.export.Dim.AUTO
    dynamic = {
        name: {axis: auto for axis in range(t.dim() - (name == "vision_features"))}
        for name, t in zip(INPUTS, example.as_tuple())
    }
    dynamic["position_ids"] = {1: auto}
    return example.as_tuple(), (tuple(dynamic[k] for k in INPUTS),), INPUTS  # RankerGraph.forward(*inputs)


def export_ranker(
    ranker: LiteRanker,
    out_dir: str | os.PathLike,
    opset: int = OPSET,
    target: str = "cpu",
    notes: dict | None = None,
    query_blocks: int | None = None,
) -> Path:
    """Write `out_dir/ranker.onnx` (and `manifest.json`) for `target`; returns the .onnx path. `query_blocks`
    overrides the target's (QUERY_BLOCKS), e.g. to compare graphs."""
    if opset not in OPSETS:
        raise FlexSelectError(f"--opset must be one of {OPSETS}, got {opset}")
    if target not in TARGETS:
        raise FlexSelectError(f"--target must be one of {TARGETS}, got {target!r}")
    out_dir = check_output_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if target == "cuda" else torch.float32
    ranker = ranker.to(device="cpu", dtype=dtype).eval()
    blocks = query_blocks or QUERY_BLOCKS[target]
    module = (EmbedsGraph if ranker.layout == "host_embeds" else RankerGraph)(ranker, blocks).eval()
    args, dynamic, names = example_inputs(ranker)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    param_bytes = sum(p.numel() * p.element_size() for p in ranker.parameters())
    staging = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir))
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(names),
                output_names=[OUTPUT],
                dynamic_shapes=dynamic,
                verbose=False,
            )
        program.save(str(staging / ONNX), external_data=param_bytes > EXTERNAL_DATA_BYTES)
        manifest = make_manifest(ranker, notes)
        manifest["onnx"] = {
            "file": ONNX,
            "opset": opset,
            "target": target,
            "query_blocks": blocks,
            "inputs": list(names),
            "outputs": [OUTPUT],
            "external_data": (staging / (ONNX + ".data")).is_file(),
        }
        data = staging / (ONNX + ".data")
        if data.is_file():
            os.replace(data, out_dir / data.name)
        os.replace(staging / ONNX, out_dir / ONNX)
        if ranker.tokenizer is not None:
            ranker.tokenizer.save_pretrained(out_dir / "tokenizer")
        write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
    except FlexSelectError:
        raise
    except Exception as e:  # the exporter's failures are long and internal; keep the cause, say what failed
        raise FlexSelectError(f"ONNX export of the ranker failed: {type(e).__name__}: {str(e)[:500]}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / ONNX


def export_bundle(
    bundle: str | os.PathLike, out_dir: str | os.PathLike | None = None, opset: int = OPSET, target: str = "cpu"
) -> Path:
    """Export a bundle folder's torch ranker; by default the ONNX file goes into the bundle itself."""
    from flexselect.lite.bundle import read_manifest

    bundle = Path(bundle)
    check_output_dir(out_dir or bundle)  # before loading and tracing the ranker
    notes = read_manifest(bundle / MANIFEST).get("notes", {})
    return export_ranker(load_torch_ranker(bundle), out_dir or bundle, opset, target, notes)
