"""The ranker bundle on disk, and `load_ranker`: the one entry point the pipeline, CLI and ComfyUI nodes use.

A bundle is a folder:
    manifest.json        format version, host (family, what the ranker reads and its width, vocab size), layout,
                         vision feature width, special token ids, decoder config, scoring layer, aggregate,
                         flexselect version, notes (training, or the released checkpoint it was imported from),
                         and the ONNX file's I/O if exported
    ranker.safetensors   the torch ranker's weights
    tokenizer/           optional: the ranker's own tokenizer, when it differs from the host's (InternVL)
    ranker.onnx          optional (flexselect lite-export); large rankers keep weights in ranker.onnx.data beside it

Format version 1 (the host_embeds layout only, before the authors' layouts) is still read.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import FlexSelectError
from .host import HostInfo, check_host
from .ranker import LiteRanker, decoder_config

if TYPE_CHECKING:
    from ..backends.base import Backend
    from .onnx_ranker import OnnxRanker

FORMAT = "flexselect-lite-ranker"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
WEIGHTS = "ranker.safetensors"
TOKENIZER = "tokenizer"
ONNX = "ranker.onnx"


def flexselect_version() -> str:
    try:
        return version("flexselect")
    except PackageNotFoundError:
        return "unknown"


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target and rename over it: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make bundles and shards private to their writer
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_manifest(ranker: LiteRanker, notes: dict | None = None) -> dict:
    config = {k: v for k, v in ranker.config.to_dict().items() if not k.startswith("_")}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "host": ranker.host.to_dict(),
        "layout": ranker.layout,
        "vision_dim": ranker.vision_dim,
        "special_ids": ranker.special_ids,
        "ranker_config": config,
        "scoring_layer": ranker.scoring_layer,
        "aggregate": ranker.aggregate,
        "flexselect_version": flexselect_version(),
        "notes": notes or {},
    }


def save_bundle(ranker: LiteRanker, folder: str | os.PathLike, notes: dict | None = None) -> Path:
    """Write weights then manifest (each atomically); an existing ranker.onnx is stale afterwards, so it goes."""
    from safetensors.torch import save

    folder = Path(folder)
    state = {k: v.detach().float().cpu().contiguous() for k, v in ranker.state_dict().items()}
    write_atomic(folder / WEIGHTS, save(state))
    for stale in (folder / ONNX, folder / (ONNX + ".data")):
        stale.unlink(missing_ok=True)
    if ranker.tokenizer is not None:
        ranker.tokenizer.save_pretrained(folder / TOKENIZER)
    write_atomic(folder / MANIFEST, json.dumps(make_manifest(ranker, notes), indent=2).encode())
    return folder


def read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise FlexSelectError(f"{path} not found: a ranker bundle needs its {MANIFEST} (written by lite-train)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexSelectError(f"{path} is not valid JSON ({e}); the ranker bundle looks damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FlexSelectError(f"{path} is not a FlexSelect-Lite ranker manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise FlexSelectError(
            f"{path} has format version {manifest.get('format_version')}; this flexselect reads version "
            f"{FORMAT_VERSION}: re-export the ranker with this version"
        )
    try:
        HostInfo(**manifest["host"])
        int(manifest["scoring_layer"])
        dict(manifest["ranker_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise FlexSelectError(f"{path} lacks a valid field ({e}); the ranker bundle looks damaged") from None
    return manifest


def ranker_from_manifest(manifest: dict) -> LiteRanker:
    host = HostInfo(**manifest["host"])
    layout = manifest.get("layout", "host_embeds")  # version 1 had only that layout
    config = decoder_config(layout, manifest["ranker_config"], host.vocab_size)
    return LiteRanker(
        config,
        host,
        layout,
        manifest.get("vision_dim", host.hidden_size),
        manifest["scoring_layer"],
        manifest.get("aggregate", "max"),
        manifest.get("special_ids"),
    )


def upgrade_v1_state(state: dict) -> dict:
    """Version-1 bundles named the host_embeds projector's MLP `projector.N`; it is `projector.mlp.N` now."""
    return {
        k.replace("projector.", "projector.mlp.", 1) if k.startswith("projector.") else k: v for k, v in state.items()
    }


def load_weights(ranker: LiteRanker, path: Path, version: int = FORMAT_VERSION) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FlexSelectError(f"{path} not found: the ranker bundle has no weights")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise FlexSelectError(
            f"{path} is not a readable safetensors file ({e}); the ranker bundle looks damaged"
        ) from None
    if version == 1:
        state = upgrade_v1_state(state)
    try:
        ranker.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FlexSelectError(f"{path} does not fit the ranker its manifest describes: {str(e)[:300]}") from None


def load_torch_ranker(
    folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LiteRanker:
    """The torch ranker of a bundle folder, unbound to a model (see `load_ranker`)."""
    folder = Path(folder)
    manifest = read_manifest(folder / MANIFEST)
    ranker = ranker_from_manifest(manifest)
    load_weights(ranker, folder / WEIGHTS, manifest["format_version"])
    if (folder / TOKENIZER).is_dir():
        from transformers import AutoTokenizer

        ranker.tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER)
    return ranker.to(device=device, dtype=dtype).eval()


def load_ranker(path: str | os.PathLike, backend: Backend) -> LiteRanker | OnnxRanker:
    """A ranker for `backend` from a bundle folder, its manifest.json or ranker.safetensors, a .onnx file, or the
    folder of one of the authors' released rankers (released.py).

    A folder with weights gives the torch ranker on the model's device (bf16 on a GPU, float32 on the CPU); a
    .onnx file (or a folder with only ranker.onnx) gives the ONNX Runtime ranker. The ranker is checked against
    the model (family and what it reads, see host.py) and bound to its tokenizer.
    """
    path = Path(path)
    if not path.exists():
        raise FlexSelectError(f"ranker not found: {path}")
    is_onnx = path.is_file() and path.suffix.lower() == ".onnx"
    if path.is_file() and not is_onnx and path.name not in (MANIFEST, WEIGHTS):
        raise FlexSelectError(f"{path} is not a ranker: pass a bundle folder, its {MANIFEST}, or a .onnx file")
    folder = path if path.is_dir() else path.parent
    device = getattr(backend, "device", torch.device("cpu"))
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if path.is_dir() and not (folder / MANIFEST).is_file():
        from .released import import_release, is_release

        if is_release(folder):  # one of the authors' released rankers, mapped on the fly (see lite-import)
            ranker = import_release(folder)
            check_host(ranker.host, backend, f"the ranker {path}")
            ranker = ranker.to(device=device, dtype=dtype)
            ranker.check_compatible(backend)
            return ranker
    if (folder / MANIFEST).is_file() or not is_onnx:
        # Checked before any weights are read: the likely mistake (a ranker of another model) gets the clear error.
        check_host(HostInfo(**read_manifest(folder / MANIFEST)["host"]), backend, f"the ranker {path}")
    if is_onnx or (not (folder / WEIGHTS).is_file() and (folder / ONNX).is_file()):
        from .onnx_ranker import OnnxRanker

        ranker = OnnxRanker.load(path if is_onnx else folder / ONNX)
    else:
        ranker = load_torch_ranker(folder, device, dtype)
    ranker.check_compatible(backend)
    return ranker
