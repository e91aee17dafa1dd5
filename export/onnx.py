"""Export a FlexSelect-Lite ranker bundle to ONNX: `ranker.onnx` (+ `manifest.json`) for ONNX Runtime and the C++ CLI.

    flexselect lite-export BUNDLE_DIR [--out DIR] [--opset 18]

I/O (what `flexselect.lite.onnx_ranker` and the C++ runtime look up): `visual_embeds` float32 [n_visual, D_host],
`question_ids` int64 [n_question] -> `scores` float32 [n_visual], both token counts dynamic.

Exporter: torch.onnx's dynamo exporter (`torch.export` + onnxscript), the default in current torch. The older
TorchScript exporter is deprecated and works by tracing, where sizes that pass through Python ints (the question
rows `h[:, -T:]`, the visual columns `slice(0, N)`) can be frozen at the example's values; `torch.export` keeps
them symbolic, and tests/test_lite.py runs the graph at other sizes against torch. Opset 18: torchlib's native
opset in torch 2.13 (no version-conversion pass), run by ONNX Runtime >= 1.14, below the `onnxruntime>=1.18` this
package asks for. There SDPA becomes MatMul + mask + Softmax, and on CPU the Softmax over [heads, N, N] is half the
run time; `--opset 23` maps it to ONNX's Attention op (with RMSNormalization and RotaryEmbedding), which a recent
ONNX Runtime runs in one kernel: 2.9 s instead of 3.5 s for one 1760-token set of bench/lite_vs_reference.py's
quarter-width ranker on 2 CPU cores (ONNX Runtime 1.32), same scores to 2e-10. Not the default, as older runtimes
cannot load it.

Writing: everything goes to a temporary folder beside the target and is renamed into place, the weights file
(if any) before `ranker.onnx`, so a reader never sees a half-written model under the final name. Rankers whose
weights exceed 1.5 GiB (the 0.5B default in float32 is ~2 GB, over protobuf's 2 GiB limit) keep them in
`ranker.onnx.data` beside the graph.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from flexselect.errors import FlexSelectError
from flexselect.outputs import check_output_dir
from flexselect.lite.bundle import MANIFEST, ONNX, load_torch_ranker, make_manifest, write_atomic
from flexselect.lite.ranker import LiteRanker

OPSET = 18
INPUTS = ("visual_embeds", "question_ids")
OUTPUT = "scores"
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB


def export_ranker(ranker: LiteRanker, out_dir: str | os.PathLike, opset: int = OPSET,
                  notes: dict | None = None) -> Path:
    """Write `out_dir/ranker.onnx` (and `manifest.json`) for a float32 CPU copy of `ranker`; returns the .onnx path."""
    out_dir = check_output_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranker = ranker.float().cpu().eval()
    # Example sizes only seed the trace; both axes stay symbolic (min 2 avoids torch.export's 0/1 specialisation).
    visual = torch.randn(40, ranker.host.hidden_size)
    ids = torch.randint(0, ranker.host.vocab_size, (7,))
    n_visual = torch.export.Dim("n_visual", min=2)
    n_question = torch.export.Dim("n_question", min=2)
    param_bytes = sum(p.numel() * 4 for p in ranker.parameters())
    staging = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir))
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                ranker, (visual, ids), dynamo=True, opset_version=opset, input_names=list(INPUTS),
                output_names=[OUTPUT], dynamic_shapes={"visual": {0: n_visual}, "question_ids": {0: n_question}},
                verbose=False,
            )
        program.save(str(staging / ONNX), external_data=param_bytes > EXTERNAL_DATA_BYTES)
        manifest = make_manifest(ranker, notes)
        manifest["onnx"] = {"file": ONNX, "opset": opset, "inputs": list(INPUTS), "outputs": [OUTPUT],
                            "external_data": (staging / (ONNX + ".data")).is_file()}
        data = staging / (ONNX + ".data")
        if data.is_file():
            os.replace(data, out_dir / data.name)
        os.replace(staging / ONNX, out_dir / ONNX)
        write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
    except FlexSelectError:
        raise
    except Exception as e:  # the exporter's failures are long and internal; keep the cause, say what failed
        raise FlexSelectError(f"ONNX export of the ranker failed: {type(e).__name__}: {str(e)[:500]}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / ONNX


def export_bundle(bundle: str | os.PathLike, out_dir: str | os.PathLike | None = None, opset: int = OPSET) -> Path:
    """Export a bundle folder's torch ranker; by default the ONNX file goes into the bundle itself."""
    from flexselect.lite.bundle import read_manifest

    bundle = Path(bundle)
    check_output_dir(out_dir or bundle)  # before loading and tracing the ranker
    notes = read_manifest(bundle / MANIFEST).get("notes", {})
    return export_ranker(load_torch_ranker(bundle), out_dir or bundle, opset, notes)
