"""The authors' released FlexSelect-Lite rankers, mapped onto our ranker (`flexselect lite-import`, `--ranker PATH`).

Established from the authors' public research code (its model definitions and the scripts that save them; read
for facts, nothing copied). Each release is a transformers `save_pretrained` folder: `config.json` (the small LM's
Qwen2 config) + `*.safetensors`, parameter names as below (a leading `model.` is accepted too):

- Qwen2.5-VL-7B (`yunzhuyunzhu/flexselect_qwen2.5vl`): decoder `embed_tokens`, `layers.N.*`; projector
  `merger_token_selector.ln_q`, `.mlp.0`, `.mlp.2` (a patch merger 4 x 1280 -> 896).
- LLaVA-Video-7B (`yunzhuyunzhu/flexselect_llava_video`): decoder `embed_tokens`, `layers.N.*`; projector
  `mm_projector.0`, `.2` (1152 -> 896, GELU) and `image_newline`.
- InternVL2.5-8B (`yunzhuyunzhu/flexselect_internvl2.5`): decoder `language_model.model.embed_tokens`,
  `language_model.model.layers.N.*`; projector `mlp1.0` (LayerNorm 4096), `.1`, `.3`; plus its Qwen2 tokenizer.

The Qwen release's config carries its rope as trained: M-RoPE sections [8, 12, 12] with YaRN (factor 4), which
`decoder_fields` keeps. All three score at their last layer; `drop_func_name` in the config picks max or mean.
The InternVL release has its own tokenizer (InternVL2.5-1B's Qwen2 vocabulary, the host's is InternLM2's): the
prompt is re-tokenized through text, as the authors' code maps ids, and `<img>` / `</img>` are its own tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FlexSelectError
from .host import HostInfo
from .ranker import LiteRanker, decoder_config, decoder_fields


@dataclass(frozen=True)
class Release:
    family: str  # host family = our layout name
    host: str  # what it was trained for
    repo: str  # where the authors publish it
    decoder_prefix: str
    projector: dict[str, str]  # released name -> our name

    @property
    def marker(self) -> str:
        return next(iter(self.projector))


RELEASES = (
    Release(
        "qwen2_5_vl",
        "Qwen2.5-VL-7B-Instruct",
        "yunzhuyunzhu/flexselect_qwen2.5vl",
        "",
        {
            "merger_token_selector.mlp.0.weight": "projector.mlp.0.weight",
            "merger_token_selector.mlp.0.bias": "projector.mlp.0.bias",
            "merger_token_selector.mlp.2.weight": "projector.mlp.2.weight",
            "merger_token_selector.mlp.2.bias": "projector.mlp.2.bias",
            "merger_token_selector.ln_q.weight": "projector.ln_q.weight",
        },
    ),
    Release(
        "llava_onevision",
        "LLaVA-Video-7B-Qwen2",
        "yunzhuyunzhu/flexselect_llava_video",
        "",
        {
            "mm_projector.0.weight": "projector.mm_projector.0.weight",
            "mm_projector.0.bias": "projector.mm_projector.0.bias",
            "mm_projector.2.weight": "projector.mm_projector.2.weight",
            "mm_projector.2.bias": "projector.mm_projector.2.bias",
            "image_newline": "projector.image_newline",
        },
    ),
    Release(
        "internvl",
        "InternVL2_5-8B",
        "yunzhuyunzhu/flexselect_internvl2.5",
        "language_model.model.",
        {
            "mlp1.1.weight": "projector.mlp1.1.weight",
            "mlp1.1.bias": "projector.mlp1.1.bias",
            "mlp1.0.weight": "projector.mlp1.0.weight",
            "mlp1.0.bias": "projector.mlp1.0.bias",
            "mlp1.3.weight": "projector.mlp1.3.weight",
            "mlp1.3.bias": "projector.mlp1.3.bias",
        },
    ),
)
UNUSED = ("norm.weight", "lm_head.weight")  # the final norm and LM head are never reached by scoring


def expected_layouts() -> str:
    return "; ".join(
        f"{r.host} ({r.repo}): config.json + *.safetensors with {r.decoder_prefix}embed_tokens.weight, "
        f"{r.decoder_prefix}layers.N.*, {', '.join(r.projector)}"
        for r in RELEASES
    )


def is_release(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin files: convert them to safetensors)" if list(folder.glob("*.bin")) else ""
        raise FlexSelectError(f"{folder} has no *.safetensors weights{hint}; expected one of: {expected_layouts()}")
    state = {}
    for f in files:
        try:
            part = load_file(f)
        except Exception as e:  # safetensors raises its own types for damaged files
            raise FlexSelectError(f"{f} is not a readable safetensors file ({e})") from None
        state.update({k.removeprefix("model."): v for k, v in part.items()})
    return state


def identify(state: dict[str, torch.Tensor], folder: Path) -> Release:
    for release in RELEASES:
        if release.marker in state and f"{release.decoder_prefix}embed_tokens.weight" in state:
            missing = [k for k in release.projector if k not in state]
            if missing:
                raise FlexSelectError(f"{folder} looks like the {release.host} ranker but lacks {missing}")
            return release
    names = ", ".join(sorted(state)[:6])
    raise FlexSelectError(
        f"{folder} is not a released FlexSelect-Lite ranker (its weights start {names}); "
        f"expected one of: {expected_layouts()}"
    )


def import_release(path: str | Path) -> LiteRanker:
    """The released ranker in `path` as our LiteRanker (float32, CPU, unbound): a lossless rename of its weights."""
    folder = Path(path)
    if not folder.is_dir():
        raise FlexSelectError(f"{folder} is not a folder; expected a released ranker folder: {expected_layouts()}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FlexSelectError(f"{folder} has no config.json; expected one of: {expected_layouts()}")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise FlexSelectError(f"{config_file} is not valid JSON ({e})") from None
    state = read_state(folder)
    release = identify(state, folder)
    prefix = release.decoder_prefix
    table = state[f"{prefix}embed_tokens.weight"]
    fields = decoder_fields(raw)
    absent = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in fields]
    if absent:
        raise FlexSelectError(f"{config_file} lacks {absent}: not the config of a released ranker")
    vision_dim = {
        "qwen2_5_vl": lambda: 4 * state["merger_token_selector.ln_q.weight"].shape[0],
        "llava_onevision": lambda: state["mm_projector.0.weight"].shape[1],
        "internvl": lambda: state["mlp1.0.weight"].shape[0],
    }[release.family]()
    tokenizer, special = None, None
    if release.family == "internvl":
        tokenizer, special = release_tokenizer(folder)
    host = HostInfo(release.family, vision_dim, table.shape[0], "vision_features")
    aggregate = "mean" if "mean" in str(raw.get("drop_func_name", "")) else "max"
    ranker = LiteRanker(
        decoder_config(release.family, fields, table.shape[0]),
        host,
        release.family,
        vision_dim,
        None,
        aggregate,
        special,
    )
    ours = {}
    for name, tensor in state.items():
        if name in release.projector:
            ours[release.projector[name]] = tensor
        elif name.startswith(prefix) and name[len(prefix) :] not in UNUSED:
            ours["llm." + name[len(prefix) :]] = tensor
    expected = set(ranker.state_dict())
    missing, extra = sorted(expected - set(ours)), sorted(set(ours) - expected)
    if missing or extra:
        raise FlexSelectError(
            f"{folder}: the weights do not fit its config.json (missing {missing[:4]}, unexpected {extra[:4]})"
        )
    try:
        ranker.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    except RuntimeError as e:
        raise FlexSelectError(f"{folder}: the weights do not fit its config.json: {str(e)[:300]}") from None
    ranker.tokenizer = tokenizer
    return ranker.eval()


def release_tokenizer(folder: Path):
    """The InternVL release's own tokenizer and the ids of its <img> / </img> tokens."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise FlexSelectError(
            f"{folder}: the InternVL ranker needs its tokenizer files beside the weights ({e})"
        ) from None
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>")}
    if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
        raise FlexSelectError(f"{folder}: the tokenizer has no <img> / </img> tokens: not the InternVL ranker's")
    return tokenizer, ids


def import_to_bundle(path: str | Path, out: str | Path) -> Path:
    """`flexselect lite-import PATH -o OUT`: write the release as one of our ranker bundles."""
    from .bundle import save_bundle

    ranker = import_release(path)
    release = next(r for r in RELEASES if r.family == ranker.layout)
    return save_bundle(
        ranker, out, {"imported_from": str(Path(path).resolve()), "release": release.repo, "trained_for": release.host}
    )
