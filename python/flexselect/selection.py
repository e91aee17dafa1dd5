"""The model-agnostic selection math of FlexSelect: frame sets, budget split, the score formula, top-k, merge.

Every backend (transformers, llama.cpp, the Lite ranker, the C++ runtime) follows these definitions; tests check
that they agree. A "frame" here is the model's temporal unit (for Qwen2.5-VL a pair of frames), and every frame
holds the same number of visual tokens, so token j of frame f has the global index f * tokens_per_frame + j.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .errors import FlexSelectError

Aggregate = Literal["max", "mean"]


def frame_sets(num_frames: int, set_frames: int) -> list[list[int]]:
    """Strided frame sets: G = ceil(F / S) sets, set g holds frames g, g+G, g+2G, ... so each spans the whole video."""
    if num_frames <= 0:
        raise FlexSelectError("the video has no frames to select from")
    if set_frames <= 0:
        raise FlexSelectError(f"set_frames must be positive, got {set_frames}")
    n_sets = math.ceil(num_frames / set_frames)
    return [list(range(g, num_frames, n_sets)) for g in range(n_sets)]


def round_budget(budget: int, tokens_per_frame: int) -> int:
    """The budget rounded up to whole frames' worth of tokens, as in the paper's code."""
    if budget <= 0:
        raise FlexSelectError(f"the token budget must be positive, got {budget}")
    return math.ceil(budget / tokens_per_frame) * tokens_per_frame


def split_budget(budget: int, set_sizes: list[int]) -> list[int]:
    """Give each set an equal share of the budget, never more than it holds.

    What a small set cannot use goes to the others, so the shares add up to exactly min(budget, total tokens)
    (the paper's code uses floor(B / G) per set and can fall short of B). Earlier sets take the remainder first.
    """
    shares = [0] * len(set_sizes)
    left = min(budget, sum(set_sizes))
    open_sets = [i for i, size in enumerate(set_sizes) if size > 0]
    while left > 0:
        each, extra = divmod(left, len(open_sets))
        still_open = []
        for rank, i in enumerate(open_sets):
            want = each + (1 if rank < extra else 0)
            give = min(want, set_sizes[i] - shares[i])
            shares[i] += give
            left -= give
            if shares[i] < set_sizes[i]:
                still_open.append(i)
        open_sets = still_open
    return shares


def check_finite(values: torch.Tensor, what: str, masked_ok: bool = False) -> None:
    """Scores or logits that are NaN or infinite come from damaged weights (a NaN in a GGUF, an ONNX ranker) or an
    overflow: say so instead of answering from noise. `masked_ok`: -inf is a masked logit, not damage."""
    bad = values.isnan() | values.isposinf() if masked_ok else ~values.isfinite()
    if bool(bad.any()):
        raise FlexSelectError(
            f"{what} are not finite (NaN or infinite): the model's weights are damaged or overflow in this "
            "precision; re-export or re-download the model, or run it in float32"
        )


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores in ascending index order; ties go to the lower index and a NaN score is never
    preferred to a number, not even to -inf (as in the C++ runtime)."""
    scores = scores.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(scores[order].isnan().to(torch.uint8), stable=True).indices]  # NaN after everything
    return torch.sort(order[:k]).values


def question_attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    visual: slice,
    aggregate: Aggregate = "max",
    head_chunk: int = 8,
) -> torch.Tensor:
    """Score each visual token by how much the question attends to it.

    queries: [H, T, d] for the last T positions of the sequence (the text after the video), RoPE applied.
    keys:    [H or H_kv, N, d] for all N positions, RoPE applied (grouped KV heads are repeated to all heads).
    Returns [visual.stop - visual.start] scores: softmax over the whole key span of q.k / sqrt(d), causal among the
    T question columns, restricted to the visual columns, then max (or mean) over heads and question rows.
    Only the T question rows are ever formed, never the N x N matrix; heads are processed in chunks.
    """
    n_heads, n_rows, head_dim = queries.shape
    n_keys = keys.shape[1]
    if keys.shape[0] != n_heads:
        keys = keys.repeat_interleave(n_heads // keys.shape[0], dim=0)
    # Row t sits at position n_keys - n_rows + t and may not look at the question tokens after it.
    row_pos = torch.arange(n_keys - n_rows, n_keys, device=queries.device)[:, None]
    hidden = torch.arange(n_keys, device=queries.device)[None, :] > row_pos
    result = None
    for h0 in range(0, n_heads, head_chunk):
        q = queries[h0 : h0 + head_chunk].float()
        k = keys[h0 : h0 + head_chunk].float()
        logits = (q @ k.transpose(1, 2)) / math.sqrt(head_dim)
        probs = logits.masked_fill(hidden, float("-inf")).softmax(dim=-1)[:, :, visual]
        part = probs.amax(dim=(0, 1)) if aggregate == "max" else probs.sum(dim=(0, 1))
        result = part if result is None else (torch.maximum(result, part) if aggregate == "max" else result + part)
    if aggregate == "mean":
        result = result / (n_heads * n_rows)
    return result
