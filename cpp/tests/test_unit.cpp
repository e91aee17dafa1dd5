// Unit tests of the selection math, positions and video helpers: the hand-computed cases shared with the Python tests
// (tests/vectors.json, compiled in through the CMake-generated vectors_gen.h) and a few C++-only checks.
// No framework: each CHECK prints the failing expression and the test exits non-zero.
#include "flexselect/defaults_gen.h"
#include "flexselect/flexselect.h"
#include "flexselect/vectors_gen.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

using namespace flexselect;
using json = nlohmann::json;

static int g_failures = 0;
#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++g_failures;                                                                 \
        }                                                                                 \
    } while (0)

static bool near(double a, double b, double tol = 1e-6) { return std::fabs(a - b) <= tol; }

template <typename T> static bool same(const std::vector<T> & a, const std::vector<T> & b) { return a == b; }

static bool throws(const std::function<void()> & f) {
    try {
        f();
    } catch (const Error &) {
        return true;
    }
    return false;
}

// ---- the shared hand-computed cases (tests/vectors.json, also checked by tests/test_vectors.py) -----------------

static const json & vectors() {
    static const json v = json::parse(flexselect::test_vectors::json_text);
    return v;
}

static std::vector<int> ints(const json & j) { return j.get<std::vector<int>>(); }

// [a][b][c] nested arrays -> one row-major vector
static std::vector<float> flatten(const json & j) {
    std::vector<float> out;
    for (const auto & a : j) {
        for (const auto & b : a) {
            for (const auto & e : b) out.push_back(e);
        }
    }
    return out;
}

static float number(const json & j) {  // JSON has no NaN or infinity: the file writes them as strings
    if (!j.is_string()) return j.get<float>();
    const std::string s = j.get<std::string>();
    if (s == "nan") return NAN;
    if (s == "inf") return INFINITY;
    if (s == "-inf") return -INFINITY;
    throw std::runtime_error("vectors.json: unknown number " + s);
}

static void test_shared_selection_vectors() {
    for (const auto & c : vectors()["frame_sets"]) {
        const auto sets = frame_sets(c["num_frames"], c["set_frames"]);
        CHECK(sets.size() == c["sets"].size());
        for (size_t g = 0; g < sets.size() && g < c["sets"].size(); ++g) CHECK(same(sets[g], ints(c["sets"][g])));
    }
    for (const auto & c : vectors()["round_budget"]) {
        CHECK(round_budget(c["budget"], c["tokens_per_frame"]) == c["rounded"]);
    }
    for (const auto & c : vectors()["split_budget"]) {
        CHECK(same(split_budget(c["budget"], ints(c["sizes"])), ints(c["shares"])));
    }
    for (const auto & c : vectors()["top_k"]) {
        std::vector<float> scores;
        for (const auto & s : c["scores"]) scores.push_back(number(s));
        CHECK(same(top_k(scores, c["k"]), ints(c["kept"])));
    }
    for (const auto & c : vectors()["scores"]) {
        // q [rows][heads][d] and k [keys][kv_heads][d], flattened in that order as the runtime takes them
        const std::vector<float> q = flatten(c["q"]), k = flatten(c["k"]);
        const int n_rows = (int) c["q"].size(), n_heads = (int) c["q"][0].size(), head_dim = (int) c["q"][0][0].size();
        const int n_keys = (int) c["k"].size(), n_kv_heads = (int) c["k"][0].size();
        const auto got = question_attention_scores(q.data(), k.data(), n_rows, n_keys, n_heads, n_kv_heads, head_dim,
                                                   c["vis_begin"], c["vis_end"], parse_aggregate(c["aggregate"]));
        const auto & want = c["expected"];
        CHECK(got.size() == want.size());
        for (size_t i = 0; i < got.size() && i < want.size(); ++i) CHECK(near(got[i], want[i], c["tol"]));
    }
}

static void test_shared_position_vectors() {
    for (const auto & c : vectors()["time_interval"]) {
        const double tps = c["tokens_per_second"].is_null() ? 0.0 : c["tokens_per_second"].get<double>();
        CHECK(near(time_interval(tps, c["temporal_patch"], c["sample_fps"]), c["interval"], 1e-12));
    }
    for (const auto & c : vectors()["video_positions"]) {
        const int rows = c["rows"], cols = c["cols"];
        const auto off = video_offsets(c["units"], rows, cols, c["interval"]);
        std::vector<int> unit_t;
        for (size_t i = 0; i < off.size(); i += (size_t) rows * cols) unit_t.push_back(off[i].t);
        CHECK(same(unit_t, ints(c["unit_t"])));
        CHECK(video_extent(c["units"], rows, cols, c["interval"]) == c["extent"]);
    }
    for (const auto & c : vectors()["layouts"]) {
        const int rows = c["rows"], cols = c["cols"];
        auto offsets = video_offsets(c["units"], rows, cols, c["interval"]);
        if (!c["kept"].is_null()) {
            std::vector<Pos3> kept;
            for (int i : ints(c["kept"])) kept.push_back(offsets[i]);
            offsets = kept;
        }
        const int extent = video_extent(c["extent_units"], rows, cols, c["interval"]);
        const Layout l = layout_positions(c["prefix"], offsets, extent, c["suffix"]);
        std::vector<int> t, y, x;
        for (const auto * part : {&l.prefix, &l.video, &l.suffix}) {
            for (const Pos3 & p : *part) t.push_back(p.t), y.push_back(p.y), x.push_back(p.x);
        }
        CHECK(same(t, ints(c["t"])) && same(y, ints(c["y"])) && same(x, ints(c["x"])));
        CHECK(l.next == c["next"]);
    }
    for (const auto & c : vectors()["uniform_indices"]) {  // a constant 1 fps: frame k is shown at k seconds
        const int n_frames = c["num_frames"];
        std::vector<double> times(n_frames);
        for (int k = 0; k < n_frames; ++k) times[k] = k;
        SamplingOptions opts;
        opts.frames = c["n"];
        const auto got = sample_frames(times, n_frames, opts).indices;
        CHECK(same(std::vector<int>(got.begin(), got.end()), ints(c["indices"])));
    }
    for (const auto & c : vectors()["vfr_sampling"]) {
        SamplingOptions opts;
        opts.frames = c.value("frames", 0);
        opts.fps = c.value("fps", 0.0);
        opts.start = c.value("start", -1.0);
        opts.end = c.value("end", -1.0);
        const auto got = sample_frames(c["times"].get<std::vector<double>>(), c["end_s"], opts).indices;
        CHECK(same(std::vector<int>(got.begin(), got.end()), ints(c["indices"])));
    }
}

static void test_shared_evidence_vectors() {
    for (const auto & c : vectors()["evidence"]) {
        const auto got =
            evidence_ranges(ints(c["kept_per_unit"]), c["timestamps"].get<std::vector<double>>(), c["max_ranges"]);
        const auto & want = c["ranges"];
        CHECK(got.size() == want.size());
        for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
            const auto & w = want[i];
            CHECK(got[i].start_s == w["start_s"].get<double>() && got[i].end_s == w["end_s"].get<double>());
            CHECK(got[i].tokens == w["tokens"].get<int>() && near(got[i].share, w["share"], 1e-12));
        }
    }
    CHECK(throws([] { evidence_ranges({1, 2, 3}, {0.0, 1.0}); }));
}

// ---- C++-only checks: errors, invariants, llama.cpp's batch layout, the vision tower's frame size ------------------

static void test_errors_and_invariants() {
    CHECK(throws([] { frame_sets(0, 4); }));
    CHECK(throws([] { frame_sets(4, 0); }));
    CHECK(throws([] { round_budget(0, 4); }));
    // the shares always add up to min(budget, total)
    for (int b = 0; b < 40; ++b) {
        auto sh = split_budget(b, {7, 3, 11, 1});
        int sum = 0;
        for (int x : sh) sum += x;
        CHECK(sum == std::min(b, 22));
        CHECK(sh[0] <= 7 && sh[1] <= 3 && sh[2] <= 11 && sh[3] <= 1);
    }
    const float k[4] = {0.f, 0.f, 0.f, 0.f};
    const float q[2] = {1.f, 1.f};
    CHECK(throws([&] { question_attention_scores(q, k, 2, 4, 1, 1, 1, 0, 3, Aggregate::max); }));
    CHECK(parse_aggregate("mean") == Aggregate::mean);
    CHECK(throws([] { parse_aggregate("sum"); }));
    CHECK(throws([] { time_interval(2.0, 2, 0.0); }));
}

static void test_mrope_batch_layout() {
    // llama.cpp's layout: 4 values per token, section-major
    auto flat = mrope_section_major({{1, 2, 3}, {4, 5, 6}});
    CHECK(same(flat, {1, 4, 2, 5, 3, 6, 0, 0}));
}

static void test_target_size() {
    int w = 0, h = 0;
    target_size(224, 168, 560, w, h);  // multiples of 28 that fit: untouched
    CHECK(w == 224 && h == 168);
    target_size(640, 480, 560, w, h);  // 560 x 420
    CHECK(w == 560 && h == 420);
    target_size(100, 50, 560, w, h);   // 3.57 -> 4, 1.79 -> 2
    CHECK(w == 112 && h == 56);
    target_size(10, 10, 560, w, h);    // at least one patch pair
    CHECK(w == 28 && h == 28);
    target_size(1920, 1080, 448, w, h);  // 448 x 252 -> 252 = 9 * 28
    CHECK(w == 448 && h == 252);
}

static void test_target_size_qwen3() {
    int w = 0, h = 0;
    target_size(128, 96, 640, w, h, 32);  // multiples of 32 that fit: untouched
    CHECK(w == 128 && h == 96);
    target_size(1920, 1080, 640, w, h, 32);  // 640 x 360 -> 352 = 11 * 32
    CHECK(w == 640 && h == 352);
}

static void test_unit_text_sequence() {
    // prefix [1, 2]; two units of a 2 x 3 grid, labels [7] and [8, 9]; vision start 5, end 6; suffix [3, 4].
    // Unit 0 keeps tokens 1 and 5 (r, c = (0, 1), (1, 2)), unit 1 keeps none.
    const Sequence s = unit_text_sequence({1, 2}, {{7}, {8, 9}}, 5, 6, {{1, 5}, {}}, 2, 3, {3, 4});
    CHECK(s.runs.size() == 4);  // the suffix is a run of its own: its rows score
    CHECK(same(s.runs[0].ids, {1, 2, 7, 5}));  // prefix, label, vision start: positions 0..3
    CHECK(s.runs[0].pos.back().t == 3 && s.runs[0].pos.back().x == 3);
    CHECK(s.runs[1].ids.empty() && same(s.runs[1].tokens, {1, 5}));
    // the unit starts at 4: (4, 4 + r, 4 + c)
    CHECK(s.runs[1].pos[0].t == 4 && s.runs[1].pos[0].y == 4 && s.runs[1].pos[0].x == 5);
    CHECK(s.runs[1].pos[1].t == 4 && s.runs[1].pos[1].y == 5 && s.runs[1].pos[1].x == 6);
    // then the text at 4 + max(2, 3) = 7: vision end, the next unit's label, start and end (it keeps nothing but
    // still takes its extent), then the suffix
    CHECK(same(s.runs[2].ids, {6, 8, 9, 5, 6}) && same(s.runs[3].ids, {3, 4}));
    std::vector<int32_t> t;
    for (const Pos3 & q : s.runs[2].pos) t.push_back(q.t);
    for (const Pos3 & q : s.runs[3].pos) t.push_back(q.t);
    CHECK(same(t, {7, 8, 9, 10, 14, 15, 16}));
    CHECK(same(s.columns, {4, 5}) && s.next == 17 && s.size() == 13);
}

static void test_reference_layer_rules() {
    const defaults::Family & q25 = *defaults::find_family("qwen2_5_vl");
    const defaults::Family & q35 = *defaults::find_family("qwen3_5");  // 23 of 32, never measured
    std::string warning;
    CHECK(reference_layer_for(q25, 28, {}, &warning) == 20 && warning.empty());
    CHECK(reference_layer_for(q25, 4, {}, &warning) == 3 && warning.find("same relative depth") != std::string::npos);
    std::vector<int> all(32);
    for (int i = 0; i < 32; ++i) all[i] = i;
    warning.clear();
    CHECK(reference_layer_for(q35, 32, all, &warning) == 23 && warning.find("never measured") != std::string::npos);
    // hybrid: 8 layers, full attention at 3 and 7; depth 23 * 8 / 32 = 5.75 -> 6 is linear: the nearest is 7
    CHECK(reference_layer_for(q35, 8, {3, 7}, &warning) == 7 && warning.find("full-attention") != std::string::npos);
    CHECK(reference_layer_for(q35, 32, {3, 7, 11, 15, 19, 23, 27, 31}) == 23);
    CHECK(reference_layer_for(q35, 16, {1, 5, 9, 13}) == 13);  // depth 11.5: 13 is 1.5 away, 9 is 2.5
}

int main() {
    test_shared_selection_vectors();
    test_shared_position_vectors();
    test_shared_evidence_vectors();
    test_errors_and_invariants();
    test_mrope_batch_layout();
    test_target_size();
    test_target_size_qwen3();
    test_unit_text_sequence();
    test_reference_layer_rules();
    if (g_failures) {
        std::fprintf(stderr, "%d check(s) failed\n", g_failures);
        return 1;
    }
    std::printf("all unit tests passed\n");
    return 0;
}
