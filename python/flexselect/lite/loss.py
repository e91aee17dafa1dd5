"""The Lite training loss: 1 - Spearman(student, teacher) with a differentiable soft rank of the student's scores.

Soft rank (the paper's): rank_i = sum_j sigmoid((s_i - s_j) / tau) - 0.5, i.e. the count of smaller scores made
smooth. Teacher ranks are hard ranks with ties averaged; Spearman is the Pearson correlation of the two rank vectors.

Why our own soft rank: `torchsort` (the maintained differentiable-sort package) ships as an sdist whose C++/CUDA
extension compiles against the installed torch at install time; `pip install torchsort` here (torch 2.13 CPU,
2 cores) was still compiling after 2 minutes and was stopped, and a compiled dependency tied to one torch build is
a poor fit for a library users install over their own CUDA torch. `fast-soft-sort` and `diffsort` (not tried)
implement other relaxations (permutahedron projection, sorting networks) than the paper's pairwise sigmoid. The
pairwise form is a few lines; its only catch is n x n memory, which `SoftRank` avoids by computing forward and
backward in row chunks (O(n * chunk) memory, no n x n tensor kept for autograd).
"""

from __future__ import annotations

import torch

CHUNK = 1024  # rows of the pairwise matrix formed at once
DEFAULT_TAU = 1e-4  # the paper's temperature, on scores that are attention probabilities


class SoftRank(torch.autograd.Function):
    """rank_i = sum_j sigmoid((s_i - s_j) / tau) - 0.5, chunked in forward and backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, tau: float, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.tau, ctx.chunk = tau, chunk
        ranks = torch.empty_like(scores)
        for i in range(0, scores.shape[0], chunk):
            ranks[i : i + chunk] = torch.sigmoid((scores[i : i + chunk, None] - scores[None, :]) / tau).sum(1)
        return ranks - 0.5

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d rank_i / d s_k = sigma'(d_ik)/tau * ([i == k] * sum_j - [i != k]), and sigma' is even, so
        # grad_k = (1/tau) * sum_j sigma'(d_kj) * (g_k - g_j).
        (scores,) = ctx.saved_tensors
        out = torch.empty_like(scores)
        for i in range(0, scores.shape[0], ctx.chunk):
            p = torch.sigmoid((scores[i : i + ctx.chunk, None] - scores[None, :]) / ctx.tau)
            slope = p * (1 - p)
            out[i : i + ctx.chunk] = (slope * (grad[i : i + ctx.chunk, None] - grad[None, :])).sum(1) / ctx.tau
        return out, None, None


def soft_rank(scores: torch.Tensor, tau: float = DEFAULT_TAU, chunk: int = CHUNK) -> torch.Tensor:
    return SoftRank.apply(scores, tau, chunk)


def hard_rank(values: torch.Tensor) -> torch.Tensor:
    """0-based float64 ranks; ties get the mean of the ranks they span (scipy.stats.rankdata(method="average") - 1)."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    return (start.double() + (counts - 1) / 2.0)[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    a = a - a.mean()
    b = b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(eps)


def spearman_loss(
    student: torch.Tensor, teacher: torch.Tensor, tau: float = DEFAULT_TAU, chunk: int = CHUNK
) -> torch.Tensor:
    """1 - Pearson(soft_rank(student), hard_rank(teacher)); computed in float32 (or float64 if given)."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return 1.0 - pearson(soft_rank(student.to(dtype), tau, chunk), hard_rank(teacher.detach()).to(dtype))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho on hard ranks (the evaluation metric)."""
    return float(pearson(hard_rank(a.double()), hard_rank(b.double())))
