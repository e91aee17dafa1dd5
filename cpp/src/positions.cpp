// Qwen2.5-VL / Qwen2-VL M-RoPE positions, as python/flexselect/mrope.py defines them (the original Qwen2.5-VL rule
// the models were trained with): token (unit u, row r, col c) of a video starting at s sits at
// (s + floor(u * interval), s + r, s + c); text after the video resumes at the largest video position + 1.
#include "flexselect/flexselect.h"

#include <algorithm>
#include <cmath>

namespace flexselect {

double time_interval(double tokens_per_second, int temporal_patch, double sample_fps) {
    if (tokens_per_second <= 0.0) return 1.0;  // no time scaling (Qwen2-VL): one step per unit
    if (!(sample_fps > 0.0) || !std::isfinite(sample_fps)) throw Error("the sampling rate must be positive");
    return tokens_per_second * temporal_patch / sample_fps;
}

static int32_t unit_time(int u, double interval) { return (int32_t) std::floor((double) u * interval); }

std::vector<Pos3> video_offsets(int num_units, int rows, int cols, double interval) {
    std::vector<Pos3> out;
    out.reserve((size_t) num_units * rows * cols);
    for (int u = 0; u < num_units; ++u) {
        const int32_t t = unit_time(u, interval);
        for (int r = 0; r < rows; ++r) {
            for (int c = 0; c < cols; ++c) out.push_back({t, r, c});
        }
    }
    return out;
}

int video_extent(int num_units, int rows, int cols, double interval) {
    return std::max({(int) unit_time(num_units - 1, interval), rows - 1, cols - 1});
}

Layout layout_positions(int prefix_len, const std::vector<Pos3> & offsets, int extent, int suffix_len) {
    Layout l;
    for (int32_t p = 0; p < prefix_len; ++p) l.prefix.push_back({p, p, p});
    const int32_t s = prefix_len;
    for (const Pos3 & o : offsets) l.video.push_back({s + o.t, s + o.y, s + o.x});
    const int32_t start = s + extent + 1;
    for (int32_t i = 0; i < suffix_len; ++i) l.suffix.push_back({start + i, start + i, start + i});
    l.next = start + suffix_len;
    return l;
}

std::vector<int32_t> mrope_section_major(const std::vector<Pos3> & pos) {
    const size_t n = pos.size();
    std::vector<int32_t> out(4 * n, 0);
    for (size_t i = 0; i < n; ++i) {
        out[i] = pos[i].t;
        out[n + i] = pos[i].y;
        out[2 * n + i] = pos[i].x;
        // out[3 * n + i] stays 0: the 4th section is unused by Qwen2/2.5-VL
    }
    return out;
}

}  // namespace flexselect

namespace flexselect {

int Sequence::size() const {
    size_t n = 0;
    for (const Run & r : runs) n += r.pos.size();
    return (int) n;
}

Sequence video_sequence(const std::vector<int32_t> & prefix, const std::vector<int> & tokens,
                        const std::vector<Pos3> & offsets, int extent, const std::vector<int32_t> & suffix) {
    const Layout l = layout_positions((int) prefix.size(), offsets, extent, (int) suffix.size());
    Sequence s;
    s.runs.push_back({prefix, {}, l.prefix});
    s.runs.push_back({{}, tokens, l.video});
    s.runs.push_back({suffix, {}, l.suffix});
    for (size_t i = 0; i < tokens.size(); ++i) s.columns.push_back((int) (prefix.size() + i));
    s.next = l.next;
    return s;
}

Sequence unit_text_sequence(const std::vector<int32_t> & prefix, const std::vector<std::vector<int32_t>> & labels,
                            int32_t vision_start, int32_t vision_end, const std::vector<std::vector<int>> & tokens,
                            int rows, int cols, const std::vector<int32_t> & suffix) {
    Sequence s;
    Run text;  // the text run being gathered: consecutive positions in all three dims
    int32_t pos = 0;
    int at = 0;  // sequence index
    auto add_text = [&](const std::vector<int32_t> & ids) {
        for (int32_t id : ids) {
            text.ids.push_back(id);
            text.pos.push_back({pos, pos, pos});
            ++pos, ++at;
        }
    };
    auto flush = [&] {
        if (!text.ids.empty()) s.runs.push_back(std::move(text));
        text = Run{};
    };
    add_text(prefix);
    const int tpu = rows * cols;
    for (size_t i = 0; i < tokens.size(); ++i) {
        add_text(labels[i]);
        add_text({vision_start});
        if (!tokens[i].empty()) {
            flush();
            Run vis;
            for (int g : tokens[i]) {
                const int local = g % tpu;
                vis.tokens.push_back(g);
                vis.pos.push_back({pos, pos + local / cols, pos + local % cols});
                s.columns.push_back(at++);
            }
            s.runs.push_back(std::move(vis));
        }
        pos += std::max(rows, cols);
        add_text({vision_end});
    }
    flush();
    add_text(suffix);
    flush();
    s.next = pos;
    return s;
}

}  // namespace flexselect
