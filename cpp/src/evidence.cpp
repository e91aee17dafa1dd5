// Evidence: where in the video the kept tokens come from, as ranked time ranges (python/flexselect/evidence.py;
// both are held to the hand-computed "evidence" cases of tests/vectors.json).
#include "flexselect/flexselect.h"

#include <algorithm>
#include <numeric>

namespace flexselect {

std::vector<EvidenceRange> evidence_ranges(const std::vector<int> & kept_per_unit,
                                           const std::vector<double> & timestamps, int max_ranges) {
    const size_t n = kept_per_unit.size();
    if (n != timestamps.size()) {
        throw Error(std::to_string(n) + " unit counts for " + std::to_string(timestamps.size()) + " timestamps");
    }
    const long total = std::accumulate(kept_per_unit.begin(), kept_per_unit.end(), 0L);
    std::vector<EvidenceRange> ranges;
    if (total == 0) return ranges;
    const double threshold = std::max(1.0, 2.0 * (double) total / (double) n);
    // A unit ends where the next starts; the last lasts as long as the one before it (1 s if it is alone).
    auto unit_end = [&](size_t u) {
        if (u + 1 < n) return timestamps[u + 1];
        return timestamps[u] + (n > 1 ? timestamps[u] - timestamps[u - 1] : 1.0);
    };
    size_t u = 0;
    while (u < n) {
        if (kept_per_unit[u] < threshold) {
            ++u;
            continue;
        }
        const size_t first = u;
        int tokens = 0;
        for (; u < n && kept_per_unit[u] >= threshold; ++u) tokens += kept_per_unit[u];
        ranges.push_back({timestamps[first], unit_end(u - 1), tokens, (double) tokens / (double) total});
    }
    std::stable_sort(ranges.begin(), ranges.end(), [](const EvidenceRange & a, const EvidenceRange & b) {
        return a.tokens != b.tokens ? a.tokens > b.tokens : a.start_s < b.start_s;
    });
    if ((int) ranges.size() > max_ranges) ranges.resize(std::max(0, max_ranges));
    return ranges;
}

}  // namespace flexselect
