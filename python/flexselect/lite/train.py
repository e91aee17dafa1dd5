"""Training the Lite ranker on teacher data (`flexselect lite-train`).

One example = one frame set (the paper: batch 1, at most 64 frames, one set); gradient accumulation makes larger
effective batches. Loss: 1 - Spearman with the pairwise soft rank (loss.py). AdamW, linear warm-up then cosine
decay to 0, bf16 autocast on a GPU (float32 master weights) or float32. A held-out split (by example key, so it is
the same on every run) is evaluated before training and after each epoch: mean Spearman rho against the teacher
and Recall@K, the share of the teacher's top-K tokens the ranker also puts in its top-K, K = the paper's keep ratio
(6.25%) of the set.

Checkpoints (`OUT/checkpoint/`: the ranker bundle + optimizer, scheduler, position) are written every
`save_every` optimizer steps and at each epoch end, by building a new folder and swapping it in, so a crash leaves
the previous checkpoint whole; running the same command again resumes from it. The final ranker bundle is written
to OUT itself.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..backends.hf.shared import resolve_device
from ..errors import FlexSelectError
from ..selection import top_k
from .bundle import MANIFEST, load_torch_ranker, save_bundle
from .layouts import INPUTS
from .loss import DEFAULT_TAU, spearman, spearman_loss
from .ranker import LiteRanker
from .teacher import TeacherData, example_key

KEEP_RATIO = 0.0625  # the paper's kept share (e.g. 7040 of ~112k tokens for Qwen2.5-VL-7B)
CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer.pt"


@dataclass
class TrainConfig:
    data: Path
    out: Path
    init: Path | None = None  # a small Qwen2-style checkpoint folder; None = random init
    ranker_config: dict | None = None  # Qwen2 config overrides (shape) for a random init
    scoring_layer: int | None = None  # default: the ranker's last layer
    epochs: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: float = 0.03  # share of optimizer steps
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "auto"  # bf16, fp32, or auto (bf16 on a GPU)
    tau: float = DEFAULT_TAU
    eval_fraction: float = 0.05
    keep_ratio: float = KEEP_RATIO
    save_every: int = 500  # optimizer steps
    seed: int = 0
    device: str = "auto"
    show_progress: bool = True


@dataclass
class EvalResult:
    spearman: float
    recall: float
    examples: int


@dataclass
class TrainSummary:
    steps: int
    epochs: int
    train_examples: int
    initial: EvalResult | None
    evals: list[EvalResult] = field(default_factory=list)
    bundle: Path | None = None
    seconds: float = 0.0
    resumed_from_step: int = 0

    def text(self) -> str:
        lines = [
            f"trained {self.steps} optimizer steps over {self.epochs} epoch(s) on {self.train_examples} "
            f"examples in {self.seconds:.0f}s"
            + (f" (resumed at step {self.resumed_from_step})" if self.resumed_from_step else "")
        ]
        if self.initial is not None:
            lines.append(
                f"held-out ({self.initial.examples} ex) at start: Spearman {self.initial.spearman:.3f}, "
                f"Recall@{KEEP_RATIO:.2%} {self.initial.recall:.3f}"
            )
        for i, e in enumerate(self.evals, 1):
            lines.append(f"held-out after epoch {i}: Spearman {e.spearman:.3f}, Recall@{KEEP_RATIO:.2%} {e.recall:.3f}")
        if self.bundle is not None:
            lines.append(f"ranker bundle: {self.bundle} (use --ranker {self.bundle}; flexselect lite-export for ONNX)")
        return "\n".join(lines)


def recall_at_k(student: torch.Tensor, teacher: torch.Tensor, keep_ratio: float = KEEP_RATIO) -> float:
    """|top-K(student) and top-K(teacher)| / K with K = ceil(keep_ratio * n)."""
    k = max(1, math.ceil(keep_ratio * teacher.numel()))
    return len(set(top_k(student, k).tolist()) & set(top_k(teacher, k).tolist())) / k


def split(data: TeacherData, eval_fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices; the held-out set is the examples with the smallest key hashes."""
    order = sorted(range(len(data)), key=lambda i: example_key(data.index[i][1]["key"], "split"))
    n_eval = min(len(data) - 1, max(1, round(eval_fraction * len(data)))) if eval_fraction > 0 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


@torch.no_grad()
def evaluate(
    ranker: LiteRanker,
    data: TeacherData,
    indices: list[int],
    device: torch.device,
    autocast,
    keep_ratio: float = KEEP_RATIO,
) -> EvalResult | None:
    if not indices:
        return None
    was_training = ranker.training
    ranker.eval()
    rhos, recalls = [], []
    for i in indices:
        ex = data[i]
        with autocast():
            s = ranker(*ranker_args(ex, device)).float().cpu()
        rhos.append(spearman(s, ex["scores"]))
        recalls.append(recall_at_k(s, ex["scores"], keep_ratio))
    ranker.train(was_training)
    return EvalResult(sum(rhos) / len(rhos), sum(recalls) / len(recalls), len(indices))


def lr_lambda(total: int, warmup: float):
    warm = max(1, math.ceil(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def ranker_args(example: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A teacher example's stored RankerInputs, in the ranker's argument order."""
    return [example[name].to(device) for name in INPUTS]


def new_ranker(cfg: TrainConfig, data: TeacherData) -> LiteRanker:
    """A ranker of the teacher data's layout, reading the features it stored (width = host.hidden_size)."""
    kwargs = {
        "layout": data.layout,
        "scoring_layer": cfg.scoring_layer,
        "aggregate": data.settings.get("aggregate", "max"),
        "special_ids": data.special_ids or None,
    }
    if cfg.init is not None:
        return LiteRanker.from_small_llm(cfg.init, data.host, data.host.hidden_size, **kwargs)
    return LiteRanker.for_host(data.host, data.host.hidden_size, cfg.ranker_config, **kwargs)


def save_checkpoint(folder: Path, ranker: LiteRanker, state: dict) -> None:
    """Build the new checkpoint beside the old one, then swap: one whole checkpoint exists at every moment."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_bundle(ranker, tmp)
    torch.save(state, tmp / TRAINER_STATE)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: Path) -> Path | None:
    for candidate in (folder, folder.with_name(folder.name + ".old")):  # .old: a crash between the two renames
        if (candidate / TRAINER_STATE).is_file() and (candidate / MANIFEST).is_file():
            return candidate
    return None


def train(cfg: TrainConfig) -> TrainSummary:
    from tqdm import tqdm

    t0 = time.perf_counter()
    data = TeacherData(cfg.data)
    train_idx, eval_idx = split(data, cfg.eval_fraction)
    if not train_idx:
        raise FlexSelectError(f"{cfg.data} has too few examples to train on ({len(data)})")
    if cfg.grad_accum < 1 or cfg.epochs < 1:
        raise FlexSelectError("--grad-accum and --epochs must be at least 1")
    device = resolve_device(cfg.device)
    precision = ("bf16" if device.type == "cuda" else "fp32") if cfg.precision == "auto" else cfg.precision
    if precision not in ("bf16", "fp32"):
        raise FlexSelectError(f"precision must be bf16, fp32 or auto, got {cfg.precision!r}")

    def autocast():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    out = Path(cfg.out)
    ckpt_dir = out / CHECKPOINT
    ckpt = find_checkpoint(ckpt_dir)
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        ranker = load_torch_ranker(ckpt)
        if ranker.host != data.host:
            raise FlexSelectError(
                f"{ckpt} is a ranker for {ranker.host}, but {cfg.data} was made with "
                f"{data.host}: use another --out folder"
            )
        state = torch.load(ckpt / TRAINER_STATE, weights_only=True)
    else:
        ranker, state = new_ranker(cfg, data), None
    ranker = ranker.to(device).train()

    steps_per_epoch = math.ceil(len(train_idx) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    params = [p for p in ranker.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.warmup))
    step, epoch, offset = 0, 0, 0
    evals: list[EvalResult] = []
    initial = None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, offset = state["step"], state["epoch"], state["offset"]
        evals = [EvalResult(**e) for e in state["evals"]]
        initial = EvalResult(**state["initial"]) if state["initial"] else None
    else:
        initial = evaluate(ranker, data, eval_idx, device, autocast, cfg.keep_ratio)
    resumed_from = step

    def checkpoint_state() -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
            "offset": offset,
            "evals": [asdict(e) for e in evals],
            "initial": asdict(initial) if initial else None,
        }

    bar = tqdm(
        total=cfg.epochs * len(train_idx),
        initial=epoch * len(train_idx) + offset,
        desc="lite-train",
        unit="ex",
        disable=not cfg.show_progress or None,
    )
    while epoch < cfg.epochs:
        # The epoch's order depends only on (seed, epoch), so a resumed run continues the same sequence.
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        optimizer.zero_grad(set_to_none=True)
        group_loss = 0.0
        for pos in range(offset, len(order)):
            ex = data[train_idx[order[pos]]]
            with autocast():
                scores = ranker(*ranker_args(ex, device))
            group = min(cfg.grad_accum, len(order) - (pos // cfg.grad_accum) * cfg.grad_accum)
            loss = spearman_loss(scores.float(), ex["scores"].to(device), cfg.tau) / group
            loss.backward()
            group_loss += loss.item()
            bar.update(1)
            if (pos + 1) % cfg.grad_accum and pos + 1 < len(order):
                continue
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, offset = step + 1, pos + 1
            bar.set_postfix(loss=f"{group_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            group_loss = 0.0
            if cfg.save_every and step % cfg.save_every == 0 and offset < len(order):
                save_checkpoint(ckpt_dir, ranker, checkpoint_state())
        result = evaluate(ranker, data, eval_idx, device, autocast, cfg.keep_ratio)
        if result is not None:
            evals.append(result)
            bar.write(f"epoch {epoch + 1}: held-out Spearman {result.spearman:.3f}, Recall@K {result.recall:.3f}")
        epoch, offset = epoch + 1, 0
        save_checkpoint(ckpt_dir, ranker, checkpoint_state())
    bar.close()

    summary = TrainSummary(step, cfg.epochs, len(train_idx), initial, evals, out, resumed_from_step=resumed_from)
    notes = {
        "teacher": data.settings,
        "train": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "held_out": {"initial": asdict(initial) if initial else None, "epochs": [asdict(e) for e in evals]},
    }
    save_bundle(ranker, out, notes)
    summary.seconds = time.perf_counter() - t0
    return summary
