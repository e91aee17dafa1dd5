"""What a request costs before it runs: peak memory of each stage and FLOPs of each arm, from a model's config alone.

The shapes come from the checkpoint's config instantiated on torch's meta device (exact parameter counts for every
family, dense or MoE, no weights read). The memory of a stage is what it holds beyond the weights at its peak:

- decoded frames (host memory): frames x height x width x 3 bytes;
- vision encode: one chunk of `ENCODE_CHUNK_UNITS` units through one ViT block (activations, and the per-unit
  attention matrix where attention is materialised), plus the video's visual tokens it writes;
- scoring pass: one frame set's sequence through one decoder layer (no KV cache is kept), no attention matrix
  (the language model's attention runs in fused sdpa kernels, on CPU too: bench/cost_model.py measured this; the
  question rows' scores at the reference layer are a few MB);
- answer pass: the KV cache of the kept tokens + prompt + answer, one layer's activations, the logits row;
- video index (optional): per frame set the KV of layers 0..L-1 and the layer-L keys, held while the later sets are
  scored and the answer pass runs.

FLOPs count the matrix multiplications (2 per multiply-add) of the active parameters and the attention products,
per arm and per pass (`Pass`: tokens through layers after a cached context). Time is the FLOPs at the device's
large-product throughput plus a fixed cost per pass through a layer: a matrix product of r rows takes as long as one of
r + `pass_rows` rows at full speed (`Throughput`, measured on the device), which is what makes a question's few dozen
rows dear. The predicted *ratios* are the cost model's claim (bench/cost_model.py checks them against measurements).
`check_fits` is what every run asks before it starts.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import FlexSelectError

ENCODE_CHUNK_UNITS = 16  # as backends/hf/qwen2_5_vl.py: units per vision-tower call
TEXT_TOKENS = 64  # chat template + a typical question, the text around the video in each pass
MARGIN = 1.10  # headroom over the estimate before a request is refused (allocator slack, fragmentation)
GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of a model, read from its config."""

    family: str
    total_params: int
    vision_params: int
    embed_params: int  # input embedding table (read per token, not multiplied)
    head_params: int  # lm_head (applied to the last position only)
    layer_active_params: tuple[int, ...]  # per decoder layer, parameters one token passes through (MoE: top-k)
    hidden: int
    intermediate: int  # per token, MLP width actually computed (MoE: top-k experts' widths added)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attention_layers: tuple[int, ...]  # layers with softmax attention (all but Qwen3.5's linear ones)
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    frames_per_unit: int  # sampled frames per temporal unit (Qwen's temporal patch: 2)
    pixels_per_token: int  # side of the square of pixels one visual token covers (Qwen); 0: fixed-size input
    merge: int  # vision patches per visual token along a side (Qwen)
    fixed_tokens_per_unit: int  # tokens of a frame resized to the tower's square input (LLaVA, InternVL)
    fixed_patches_per_unit: int  # vision patches of that square input

    @property
    def num_layers(self) -> int:
        return len(self.layer_active_params)


@functools.cache
def _shape_from_config_json(config_json: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .backends import SUPPORTED

    raw = json.loads(config_json)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise FlexSelectError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}")
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):  # shapes only: nothing is allocated
        return shape_of(AutoModelForImageTextToText.from_config(config))


def shape_of(model) -> ModelShape:
    """The shape of an instantiated (or meta-device) transformers Video-LLM."""
    from .backends import SUPPORTED

    config = model.config
    text = config.get_text_config()
    lm = model.model.language_model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    experts_per_token = getattr(text, "num_experts_per_tok", None)
    layer_active, mlp_width = [], getattr(text, "intermediate_size", 0)  # MoE-only configs have none
    for layer in lm.layers:
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is None or not experts_per_token:
            layer_active.append(count(layer))
            continue
        n_experts = getattr(text, "num_experts", None) or text.n_routed_experts
        expert_params = count(experts)
        layer_active.append(count(layer) - expert_params + expert_params * experts_per_token // n_experts)
        mlp_width = getattr(text, "moe_intermediate_size", mlp_width) * experts_per_token
    types = getattr(text, "layer_types", None) or ["full_attention"] * len(lm.layers)
    vision = config.vision_config
    merge = getattr(vision, "spatial_merge_size", 2)
    pixels_per_token, fixed, fixed_patches = 0, 0, 0
    if hasattr(vision, "spatial_merge_size"):  # the Qwen families: the frame's own size, in merged patches
        pixels_per_token = vision.patch_size * merge
    else:
        first = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731  (InternVL gives [h, w])
        side = first(vision.image_size) // first(vision.patch_size)
        fixed_patches = side**2
        if hasattr(config, "downsample_ratio"):  # InternVL: pixel-shuffled grid + <img>, </img>
            fixed = int(side * config.downsample_ratio) ** 2 + 2
        else:  # LLaVA-OneVision: 2x2 bilinear pooling of the patch grid
            fixed = math.ceil(side / 2) ** 2
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(
        family=SUPPORTED[config.model_type],
        total_params=count(model),
        vision_params=count(model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower),
        embed_params=count(lm.embed_tokens),
        head_params=0 if model.lm_head.weight is lm.embed_tokens.weight else count(model.lm_head),
        layer_active_params=tuple(layer_active),
        hidden=text.hidden_size,
        intermediate=mlp_width,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        attention_layers=tuple(i for i, t in enumerate(types) if t != "linear_attention"),
        vision_hidden=vision.hidden_size,
        vision_intermediate=getattr(vision, "intermediate_size", 4 * vision.hidden_size),
        vision_heads=getattr(vision, "num_heads", None) or vision.num_attention_heads,
        frames_per_unit=getattr(vision, "temporal_patch_size", 1),
        pixels_per_token=pixels_per_token,
        merge=merge,
        fixed_tokens_per_unit=fixed,
        fixed_patches_per_unit=fixed_patches,
    )


def model_shape(model: str | os.PathLike | dict) -> ModelShape:
    """The shape of a checkpoint folder (its config.json) or of a config dict; no weights are read."""
    if isinstance(model, dict):
        return _shape_from_config_json(json.dumps(model, sort_keys=True))
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        raise FlexSelectError(f"{model} is not a transformers model folder (no config.json)")
    try:
        return _shape_from_config_json(json.dumps(json.loads(config_file.read_text()), sort_keys=True))
    except json.JSONDecodeError as e:
        raise FlexSelectError(f"{config_file} is not valid JSON ({e}); the checkpoint looks damaged") from None


@dataclass(frozen=True)
class Request:
    """A run's shape: the tokens it will handle. Build it with `request()` from a video's size and the options."""

    units: int  # temporal units (Qwen: frame pairs)
    tokens_per_unit: int
    patches_per_unit: int  # vision-tower sequence length of one unit
    frames: int  # sampled frames
    frame_hw: tuple[int, int]  # decoded frame size
    budget: int  # kept visual tokens
    set_units: int  # units per frame set
    layer: int  # reference layer
    max_new_tokens: int = 128
    index: bool = False  # a video index is built

    @property
    def visual_tokens(self) -> int:
        return self.units * self.tokens_per_unit

    @property
    def sets(self) -> int:
        return math.ceil(self.units / self.set_units)

    @property
    def set_tokens(self) -> int:
        """Tokens of the largest scoring pass: the biggest set's visual tokens and the text around them."""
        return min(self.units, self.set_units) * self.tokens_per_unit + TEXT_TOKENS


@dataclass(frozen=True)
class Pass:
    """One forward pass of the language model: `tokens` new rows through its first `layers` layers, after `context`
    cached ones."""

    tokens: int
    layers: int
    context: int = 0


@dataclass(frozen=True)
class Throughput:
    """A device's matrix-product speed: a product of r rows takes (r + pass_rows) / flops_per_s of the time per row
    of a large one. `pass_rows` (tens of rows on a CPU) is the cost of a pass as such: reading the weights and the
    small product running below peak."""

    flops_per_s: float
    pass_rows: float


@dataclass
class Estimate:
    device_bytes: dict[str, int]  # stage -> bytes held at its peak, on the model's device (weights included)
    host_bytes: dict[str, int]  # decoded frames (on CPU, the same pool as the device)
    flops: dict[str, float]  # arm -> FLOPs to the first answer token
    request: Request
    passes: dict[str, list[Pass]] = field(default_factory=dict)  # arm -> its language-model passes
    notes: list[str] = field(default_factory=list)

    def seconds(self, shape: ModelShape, throughput: Throughput) -> dict[str, float]:
        """Each arm's predicted time to the first answer token: its FLOPs, plus `pass_rows` rows through the layers
        of each of its passes, at `flops_per_s`."""
        fixed = {
            arm: sum(2.0 * throughput.pass_rows * sum(shape.layer_active_params[: p.layers]) for p in passes)
            for arm, passes in self.passes.items()
        }
        return {arm: (f + fixed.get(arm, 0.0)) / throughput.flops_per_s for arm, f in self.flops.items()}

    @property
    def peak_device_bytes(self) -> int:
        return max(self.device_bytes.values())

    def to_dict(self) -> dict:
        return {
            "request": asdict(self.request),
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "flops": self.flops,
        }


def prefill_flops(shape: ModelShape, tokens: int, layers: int, context: int = 0) -> float:
    """Matmul FLOPs of `tokens` new tokens through the first `layers` layers (after `context` cached ones): a
    `Pass`."""
    weights = 2.0 * tokens * sum(shape.layer_active_params[:layers])
    attention_layers = sum(1 for i in shape.attention_layers if i < layers)
    # q.k and p.v over the causal span: each new token sees the context and, on average, half the new tokens.
    attention = 4.0 * tokens * (context + tokens / 2) * shape.heads * shape.head_dim * attention_layers
    return weights + attention


def vision_flops(shape: ModelShape, req: Request) -> float:
    # every parameter of the tower touches each patch once (the merger's share is small); per-unit attention ignored
    return 2.0 * req.units * req.patches_per_unit * shape.vision_params


def estimate(shape: ModelShape, req: Request, dtype_bytes: int, materialised_attention: bool) -> Estimate:
    """Peak memory per stage and FLOPs per arm of one request (see the module docstring)."""
    b = dtype_bytes
    weights = shape.total_params * b
    visual = req.visual_tokens * shape.hidden * b
    chunk_patches = min(req.units, ENCODE_CHUNK_UNITS) * req.patches_per_unit
    unit_patches = req.patches_per_unit
    vision_acts = chunk_patches * (6 * shape.vision_hidden + 3 * shape.vision_intermediate) * b
    if materialised_attention:  # logits and probabilities of one unit's patches, float32
        vision_acts += 2 * shape.vision_heads * unit_patches**2 * 4
    n = req.set_tokens
    layer_acts = lambda tokens: tokens * (4 * shape.hidden + 3 * shape.intermediate) * b  # noqa: E731
    scoring = layer_acts(n)
    answer_tokens = req.budget + TEXT_TOKENS + req.max_new_tokens
    kv_per_token = 2 * len(shape.attention_layers) * shape.kv_heads * shape.head_dim * b
    answer = answer_tokens * kv_per_token + layer_acts(answer_tokens) + shape.vocab * 4
    device = {
        "weights": weights,
        "vision_encode": weights + visual + vision_acts,
        "scoring_pass": weights + visual + scoring,
        "answer_pass": weights + visual + answer,
    }
    if req.index:  # held from its first set on and through the answer pass (it is kept for the follow-ups)
        index_layers = sum(1 for i in shape.attention_layers if i < req.layer)
        per_token = (2 * index_layers + 1) * shape.kv_heads * shape.head_dim * b
        device["video_index"] = weights + visual + req.sets * n * per_token + max(scoring, answer)
    frames = req.frames * req.frame_hw[0] * req.frame_hw[1] * 3
    text = TEXT_TOKENS
    set_sizes = [min(req.set_units, req.units - g) * req.tokens_per_unit for g in range(0, req.units, req.set_units)]
    answer_passes = [Pass(req.budget + text, shape.num_layers)]
    if req.index:  # the first question builds the index: each set's context rows, then the question's against them
        scoring_passes = [p for n in set_sizes for p in (Pass(n, req.layer), Pass(text, req.layer, context=n))]
    else:
        scoring_passes = [Pass(n + text, req.layer) for n in set_sizes]
    passes = {
        "baseline": [Pass(req.visual_tokens + text, shape.num_layers)],
        "flexselect": scoring_passes + answer_passes,
        "followup_indexed": [Pass(text, req.layer, context=n) for n in set_sizes] + answer_passes,
        "answer_pass": answer_passes,
    }
    flops = {arm: sum(prefill_flops(shape, p.tokens, p.layers, p.context) for p in ps) for arm, ps in passes.items()}
    encode = vision_flops(shape, req)
    flops["baseline"] += encode
    flops["flexselect"] += encode
    return Estimate(device, {"decoded_frames": frames}, flops, req, passes)


def check_fits(
    est: Estimate, device_free: int, host_free: int | None, device_name: str, weights_loaded: bool = False
) -> None:
    """Refuse, before any work, a request whose estimated peak does not fit, saying which setting to change.
    `device_free` is what is free now: with the weights already loaded they are not counted again."""
    need = int((est.peak_device_bytes - (est.device_bytes["weights"] if weights_loaded else 0)) * MARGIN)
    if host_free is None:  # CPU: frames and model share one pool
        need += est.host_bytes["decoded_frames"]
    if need > device_free:
        weights = est.device_bytes["weights"]
        weights_fit = weights_loaded or weights * MARGIN <= device_free
        stage = max(est.device_bytes, key=est.device_bytes.get) if weights_fit else "weights"
        advice = {
            "weights": "use a smaller model or a quantised GGUF",
            "vision_encode": "sample fewer frames or lower the frame size",
            "scoring_pass": "use smaller frame sets or a lower frame size",
            "answer_pass": "keep fewer tokens (a smaller budget)",
            "video_index": "turn the video index off or sample fewer frames",
        }[stage]
        raise FlexSelectError(
            f"this run needs about {need / GiB:.1f} GiB {'more ' if weights_loaded else ''}on {device_name} "
            f"(largest stage: {stage.replace('_', ' ')}, {est.device_bytes[stage] / GiB:.1f} GiB with the model's "
            f"{weights / GiB:.1f} GiB of weights) but {device_free / GiB:.1f} GiB is free: {advice}"
        )
    frames = est.host_bytes["decoded_frames"]
    if host_free is not None and frames > host_free:
        raise FlexSelectError(
            f"the decoded frames need {frames / GiB:.1f} GiB of RAM but {host_free / GiB:.1f} GiB is free: sample "
            "fewer frames or lower the frame size"
        )


def available_memory(device: str) -> tuple[int, int | None, str]:
    """(free bytes on the device, free host RAM or None on CPU, a name for messages)."""
    host = _available_ram()
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        free, _ = torch.cuda.mem_get_info(index)
        return free, host, f"GPU {index} ({torch.cuda.get_device_name(index)})"
    return host, None, "this machine's RAM"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def request(
    shape: ModelShape,
    num_frames: int,
    width: int,
    height: int,
    budget: int | None = None,
    set_frames: int | None = None,
    layer: int | None = None,
    max_new_tokens: int = 128,
    index: bool = False,
) -> Request:
    """The request a run of `num_frames` sampled frames of `width` x `height` (after resizing) makes."""
    from .defaults import SET_FRAMES, family_defaults, reference_layer_for
    from .mrope import frame_size

    if shape.pixels_per_token:
        h, w = frame_size(height, width, shape.pixels_per_token)
        tokens_per_unit = (h // shape.pixels_per_token) * (w // shape.pixels_per_token)
        patches_per_unit = tokens_per_unit * shape.merge**2
    else:
        tokens_per_unit, patches_per_unit = shape.fixed_tokens_per_unit, shape.fixed_patches_per_unit
    units = math.ceil(num_frames / shape.frames_per_unit)
    total = units * tokens_per_unit
    budget = min(total, math.ceil((budget or family_defaults(shape.family).budget) / tokens_per_unit) * tokens_per_unit)
    layer = reference_layer_for(shape.family, shape.num_layers) if layer is None else layer
    return Request(
        units,
        tokens_per_unit,
        patches_per_unit,
        num_frames,
        (height, width),
        budget,
        set_frames or SET_FRAMES,
        layer,
        max_new_tokens,
        index,
    )


@dataclass
class Plan:
    frames: int
    max_side: int
    budget: int
    set_frames: int
    estimate: Estimate
    fits: bool


def recommend(
    shape: ModelShape,
    duration_s: float,
    width: int,
    height: int,
    device_free: int,
    host_free: int | None,
    dtype_bytes: int,
    materialised_attention: bool,
) -> Plan:
    """The richest settings that fit, trying the family's defaults first and then fewer frames, smaller frames,
    smaller frame sets and a smaller budget, in that order of preference."""
    from .defaults import family_defaults
    from .video import output_size

    d = family_defaults(shape.family)
    wanted = max(1, min(d.max_frames, round(duration_s * d.fps)))
    frame_options = sorted({f for f in (wanted, 768, 512, 384, 256, 128, 64, 32) if f <= wanted}, reverse=True)
    side_options = [s for s in (d.max_side, 448, 336, 224) if s <= d.max_side]
    last = None
    for side in side_options:
        w, h = output_size(width, height, side)
        for frames in frame_options:
            for set_frames in (64, 32, 16):
                for budget in (d.budget, d.budget // 2, d.budget // 4):
                    est = estimate(
                        shape, request(shape, frames, w, h, budget, set_frames), dtype_bytes, materialised_attention
                    )
                    last = Plan(frames, side, est.request.budget, set_frames, est, False)
                    try:
                        check_fits(est, device_free, host_free, "")
                    except FlexSelectError:
                        continue
                    last.fits = True
                    return last
    return last


def measured_throughput(device: str, dtype, shape: ModelShape) -> Throughput:
    """This device's `Throughput` on the model's MLP product (hidden -> intermediate), timed at a question's 32 rows
    and at 1024 (about a second): the time predictions' unit."""
    import time

    import torch

    weight = torch.randn(shape.intermediate, shape.hidden, device=device, dtype=dtype)

    def seconds(rows: int) -> float:
        """The median of 5 timings of about 0.1 s each (a small product's time varies from run to run)."""
        x = torch.randn(rows, shape.hidden, device=device, dtype=dtype)
        torch.nn.functional.linear(x, weight)  # warm-up
        times = []
        for _ in range(5):
            runs, t0 = 0, time.perf_counter()
            while runs < 2 or time.perf_counter() - t0 < 0.1:
                torch.nn.functional.linear(x, weight)
                runs += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / runs)
        return sorted(times)[2]

    per_row = seconds(1024) / 1024
    return Throughput(2.0 * shape.hidden * shape.intermediate / per_row, max(0.0, seconds(32) / per_row - 32))


# -- command line ------------------------------------------------------------------------------------------------
def add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="what fits: recommended settings and the memory and time of each stage",
        description="From a model's config (no weights loaded), the memory free and a video's "
        "length, recommend frames, frame size, budget and set size that fit, with the predicted "
        "peak memory of each stage and the time to the first answer token.",
    )
    p.add_argument("--model", required=True, help="transformers checkpoint folder (only config.json is read)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="the video (its length and size are read)")
    src.add_argument("--duration", type=float, help="video length in seconds, instead of --video")
    p.add_argument("--size", default="1920x1080", help="video WIDTHxHEIGHT with --duration (default 1920x1080)")
    p.add_argument("--memory", type=float, help="GiB free on the device (default: detected)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--index", action="store_true", help="also keep a video index for cheap follow-up questions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_plan)


def run_plan(args) -> int:
    import torch

    from .backends.hf.shared import resolve_device, resolve_dtype
    from .video import probe

    if args.video is not None:
        info = probe(args.video)
        duration, width, height = info.duration, info.width, info.height
    else:
        if not args.duration > 0 or not math.isfinite(args.duration):
            raise FlexSelectError(f"--duration must be a positive number of seconds, got {args.duration}")
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise FlexSelectError(f"--size {args.size!r}: give WIDTHxHEIGHT, e.g. 1920x1080") from None
        duration = args.duration
    shape = model_shape(args.model)
    device = str(resolve_device(args.device))
    dtype = resolve_dtype("auto", torch.device(device))
    free, host, name = available_memory(device)
    if args.memory is not None:
        if not args.memory > 0:
            raise FlexSelectError(f"--memory must be a positive number of GiB, got {args.memory}")
        free, name = int(args.memory * GiB), f"{args.memory:g} GiB (--memory)"
    plan = recommend(shape, duration, width, height, free, host, dtype.itemsize, device == "cpu")
    throughput = measured_throughput(device, dtype, shape)
    seconds = plan.estimate.seconds(shape, throughput)
    if args.json:
        print(
            json.dumps(
                {
                    "fits": plan.fits,
                    "frames": plan.frames,
                    "max_side": plan.max_side,
                    "budget": plan.budget,
                    "set_frames": plan.set_frames,
                    "device": name,
                    "free_bytes": free,
                    "estimate": plan.estimate.to_dict(),
                    "predicted_seconds": seconds,
                    "flops_per_s": throughput.flops_per_s,
                    "pass_rows": throughput.pass_rows,
                }
            )
        )
        return 0 if plan.fits else 2
    r = plan.estimate.request
    print(
        f"model: {shape.family}, {shape.total_params / 1e9:.2f} B parameters, {shape.num_layers} layers, "
        f"reference layer {r.layer}"
    )
    print(f"video: {duration:.1f} s, {width}x{height}; memory: {free / GiB:.1f} GiB free on {name}")
    settings = (
        f"--frames {plan.frames} --max-side {plan.max_side} --budget {plan.budget} --set-frames {plan.set_frames}"
    )
    print(("recommended: " if plan.fits else "nothing fits; the smallest tried: ") + settings)
    print(f"  {r.units} units x {r.tokens_per_unit} tokens = {r.visual_tokens} visual tokens in {r.sets} frame sets")
    for stage, need in plan.estimate.device_bytes.items():
        print(f"  {stage.replace('_', ' '):<14} {need / GiB:8.2f} GiB")
    print(f"  decoded frames {plan.estimate.host_bytes['decoded_frames'] / GiB:8.2f} GiB (host memory)")
    print(
        f"time to first token at {throughput.flops_per_s / 1e9:.0f} GFLOP/s and {throughput.pass_rows:.0f} rows "
        "per pass measured here: full tokens "
        f"{seconds['baseline']:.1f} s, FlexSelect {seconds['flexselect']:.1f} s "
        f"({seconds['baseline'] / seconds['flexselect']:.1f}x), follow-up with the index "
        f"{seconds['followup_indexed']:.1f} s (a compute-bound estimate: memory-bound stages run slower)"
    )
    return 0 if plan.fits else 2
