// The model-agnostic selection math, mirroring python/flexselect/selection.py line for line in meaning:
// tests on both sides check the same hand-computed cases.
#include "flexselect/flexselect.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace flexselect {

std::vector<std::vector<int>> frame_sets(int num_units, int set_frames) {
    if (num_units <= 0) throw Error("the video has no frames to select from");
    if (set_frames <= 0) throw Error("set_frames must be positive, got " + std::to_string(set_frames));
    const int n_sets = (num_units + set_frames - 1) / set_frames;
    std::vector<std::vector<int>> sets(n_sets);
    for (int g = 0; g < n_sets; ++g) {
        for (int f = g; f < num_units; f += n_sets) sets[g].push_back(f);
    }
    return sets;
}

int round_budget(int budget, int tokens_per_unit) {
    if (budget <= 0) throw Error("the token budget must be positive, got " + std::to_string(budget));
    if (tokens_per_unit <= 0) throw Error("tokens per frame must be positive");
    const int64_t units = ((int64_t) budget + tokens_per_unit - 1) / tokens_per_unit;
    return (int) std::min<int64_t>(units * tokens_per_unit, std::numeric_limits<int>::max());
}

std::vector<int> split_budget(int budget, const std::vector<int> & set_sizes) {
    std::vector<int> shares(set_sizes.size(), 0);
    const int64_t total = std::accumulate(set_sizes.begin(), set_sizes.end(), (int64_t) 0);
    int64_t left = std::min<int64_t>(std::max(budget, 0), total);
    std::vector<size_t> open;
    for (size_t i = 0; i < set_sizes.size(); ++i) {
        if (set_sizes[i] > 0) open.push_back(i);
    }
    // Each round hands out equal shares (earlier sets get the remainder); sets that fill up leave the round.
    // Every round either exhausts `left` or closes at least one set, so this ends.
    while (left > 0 && !open.empty()) {
        const int64_t each = left / (int64_t) open.size();
        const int64_t extra = left % (int64_t) open.size();
        std::vector<size_t> still_open;
        for (size_t rank = 0; rank < open.size(); ++rank) {
            const size_t i = open[rank];
            const int64_t want = each + ((int64_t) rank < extra ? 1 : 0);
            const int64_t give = std::min<int64_t>(want, set_sizes[i] - shares[i]);
            shares[i] += (int) give;
            left -= give;
            if (shares[i] < set_sizes[i]) still_open.push_back(i);
        }
        open.swap(still_open);
    }
    return shares;
}

std::vector<int> top_k(const std::vector<float> & scores, int k) {
    std::vector<int> order(scores.size());
    std::iota(order.begin(), order.end(), 0);
    k = std::max(0, std::min<int>(k, (int) scores.size()));
    // Descending score, ties to the lower index (a strict weak order, so no stable sort is needed). NaN sorts last.
    auto better = [&](int a, int b) {
        const float sa = scores[a], sb = scores[b];
        const bool na = std::isnan(sa), nb = std::isnan(sb);
        if (na != nb) return nb;
        if (!na && sa != sb) return sa > sb;
        return a < b;
    };
    std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
    order.resize(k);
    std::sort(order.begin(), order.end());
    return order;
}

Aggregate parse_aggregate(const std::string & name) {
    if (name == "max") return Aggregate::max;
    if (name == "mean") return Aggregate::mean;
    throw Error("aggregate must be 'max' or 'mean', got '" + name + "'");
}

std::vector<float> question_attention_scores(const float * q, const float * k, int n_rows, int n_keys, int n_heads,
                                             int n_kv_heads, int head_dim, int vis_begin, int vis_end,
                                             Aggregate aggregate) {
    if (vis_begin < 0 || vis_end < vis_begin) throw Error("question_attention_scores: inconsistent shapes");
    std::vector<int> columns(vis_end - vis_begin);
    for (int v = 0; v < vis_end - vis_begin; ++v) columns[v] = vis_begin + v;
    return question_attention_scores(q, k, n_rows, n_keys, n_heads, n_kv_heads, head_dim, columns, aggregate);
}

std::vector<float> question_attention_scores(const float * q, const float * k, int n_rows, int n_keys, int n_heads,
                                             int n_kv_heads, int head_dim, const std::vector<int> & columns,
                                             Aggregate aggregate) {
    if (n_rows <= 0 || n_rows > n_keys || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 ||
        head_dim <= 0 ||
        std::any_of(columns.begin(), columns.end(), [&](int c) { return c < 0 || c >= n_keys - n_rows; })) {
        throw Error("question_attention_scores: inconsistent shapes");
    }
    const int n_vis = (int) columns.size();
    const int group = n_heads / n_kv_heads;
    const double scale = 1.0 / std::sqrt((double) head_dim);
    std::vector<double> acc(n_vis, 0.0);  // probabilities are >= 0: the start of both max and sum
    std::vector<double> logits(n_keys);
    for (int h = 0; h < n_heads; ++h) {
        const int hk = h / group;
        for (int t = 0; t < n_rows; ++t) {
            const float * qv = q + ((size_t) t * n_heads + h) * head_dim;
            // row t sits at position n_keys - n_rows + t and sees keys up to and including itself
            const int n_seen = n_keys - n_rows + t + 1;
            double mx = -std::numeric_limits<double>::infinity();
            for (int j = 0; j < n_seen; ++j) {
                const float * kv = k + ((size_t) j * n_kv_heads + hk) * head_dim;
                double dot = 0.0;
                for (int d = 0; d < head_dim; ++d) dot += (double) qv[d] * kv[d];
                logits[j] = dot * scale;
                mx = std::max(mx, logits[j]);
            }
            double sum = 0.0;
            for (int j = 0; j < n_seen; ++j) sum += std::exp(logits[j] - mx);
            for (int v = 0; v < n_vis; ++v) {
                const double p = std::exp(logits[columns[v]] - mx) / sum;
                if (aggregate == Aggregate::max) {
                    // NaN (damaged weights) propagates, as torch's max does, so the caller can say so
                    if (!std::isnan(acc[v]) && !(p <= acc[v])) acc[v] = p;
                } else {
                    acc[v] += p;
                }
            }
        }
    }
    std::vector<float> out(n_vis);
    const double denom = aggregate == Aggregate::mean ? (double) n_heads * n_rows : 1.0;
    for (int v = 0; v < n_vis; ++v) out[v] = (float) (acc[v] / denom);
    return out;
}

}  // namespace flexselect
