"""The model-agnostic selection math: frame sets, budget split, top-k, the score formula."""

import math

import pytest
import torch

from flexselect.errors import FlexSelectError
from flexselect.selection import frame_sets, question_attention_scores, round_budget, split_budget, top_k


@pytest.mark.parametrize("frames,set_frames", [(1, 64), (64, 64), (65, 64), (512, 64), (10, 3)])
def test_frame_sets_are_strided_and_cover_every_frame_once(frames, set_frames):
    sets = frame_sets(frames, set_frames)
    assert len(sets) == math.ceil(frames / set_frames)
    assert sorted(f for s in sets for f in s) == list(range(frames))
    assert all(len(s) <= set_frames for s in sets)
    for g, s in enumerate(sets):  # set g holds g, g+G, g+2G, ...
        assert s == list(range(g, frames, len(sets)))


def test_frame_sets_reject_empty_video():
    with pytest.raises(FlexSelectError, match="no frames"):
        frame_sets(0, 64)


def test_budget_rounds_up_to_whole_frames():
    assert round_budget(7040, 220) == 7040
    assert round_budget(7000, 220) == 7040
    assert round_budget(1, 220) == 220


@pytest.mark.parametrize(
    "budget,sizes", [(30, [12, 12, 12]), (31, [12, 12, 12]), (30, [20, 4, 20]), (100, [8, 8]), (7, [3, 0, 3, 3])]
)
def test_split_budget_is_fair_capped_and_exact(budget, sizes):
    shares = split_budget(budget, sizes)
    assert sum(shares) == min(budget, sum(sizes))
    assert all(0 <= s <= size for s, size in zip(shares, sizes))
    uncapped = [s for s, size in zip(shares, sizes) if s < size]
    assert not uncapped or max(uncapped) - min(uncapped) <= 1  # equal shares among sets with room left


def test_top_k_breaks_ties_towards_lower_index_and_returns_time_order():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert top_k(scores, 3).tolist() == [0, 1, 3]
    assert top_k(scores, 4).tolist() == [0, 1, 2, 3]


def brute_force(q, k, visual, aggregate):
    """Full causal attention over the whole sequence (every row), then the question rows: the definition."""
    n_heads, t, d = q.shape
    n = k.shape[1]
    k = k.repeat_interleave(n_heads // k.shape[0], dim=0)
    full_q = torch.zeros(n_heads, n, d)
    full_q[:, n - t :] = q
    probs = (
        ((full_q @ k.transpose(1, 2)) / math.sqrt(d))
        .masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        .softmax(-1)
    )
    rows = probs[:, n - t :, visual]
    return rows.amax(dim=(0, 1)) if aggregate == "max" else rows.mean(dim=(0, 1))


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("head_chunk", [1, 3, 8])
def test_question_scores_equal_full_attention(aggregate, head_chunk):
    torch.manual_seed(0)
    q, k = torch.randn(6, 5, 16), torch.randn(2, 40, 16)  # grouped KV heads
    got = question_attention_scores(q, k, slice(7, 30), aggregate, head_chunk=head_chunk)
    torch.testing.assert_close(got, brute_force(q, k, slice(7, 30), aggregate), rtol=1e-5, atol=1e-6)
