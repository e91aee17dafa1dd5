// Unit tests of the selection math, positions and video helpers on small hand-computed cases.
// No framework: each CHECK prints the failing expression and the test exits non-zero.
#include "flexselect/flexselect.h"

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

using namespace flexselect;

static int g_failures = 0;
#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++g_failures;                                                             \
        }                                                                             \
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

static void test_frame_sets() {
    auto s = frame_sets(10, 4);  // G = ceil(10 / 4) = 3, strided
    CHECK(s.size() == 3);
    CHECK(same(s[0], {0, 3, 6, 9}));
    CHECK(same(s[1], {1, 4, 7}));
    CHECK(same(s[2], {2, 5, 8}));
    auto one = frame_sets(5, 64);
    CHECK(one.size() == 1 && same(one[0], {0, 1, 2, 3, 4}));
    auto exact = frame_sets(8, 4);  // G = 2
    CHECK(exact.size() == 2 && same(exact[0], {0, 2, 4, 6}) && same(exact[1], {1, 3, 5, 7}));
    CHECK(throws([] { frame_sets(0, 4); }));
    CHECK(throws([] { frame_sets(4, 0); }));
}

static void test_budget() {
    CHECK(round_budget(100, 30) == 120);
    CHECK(round_budget(90, 30) == 90);
    CHECK(round_budget(1, 110) == 110);
    CHECK(throws([] { round_budget(0, 4); }));
    CHECK(same(split_budget(10, {8, 4, 4}), {4, 3, 3}));   // remainder to the earlier set
    CHECK(same(split_budget(7, {4, 4, 4}), {3, 2, 2}));
    CHECK(same(split_budget(12, {2, 8, 8}), {2, 5, 5}));   // uneven: the small set's leftover is redistributed
    CHECK(same(split_budget(13, {2, 8, 4}), {2, 7, 4}));   // two rounds of redistribution
    CHECK(same(split_budget(100, {3, 5}), {3, 5}));        // budget > total: everything
    CHECK(same(split_budget(5, {0, 4, 4}), {0, 3, 2}));    // empty set gets nothing
    CHECK(same(split_budget(0, {4, 4}), {0, 0}));
    // the shares always add up to min(budget, total)
    for (int b = 0; b < 40; ++b) {
        auto sh = split_budget(b, {7, 3, 11, 1});
        int sum = 0;
        for (int x : sh) sum += x;
        CHECK(sum == std::min(b, 22));
        CHECK(sh[0] <= 7 && sh[1] <= 3 && sh[2] <= 11 && sh[3] <= 1);
    }
}

static void test_top_k() {
    const std::vector<float> s = {0.5f, 0.9f, 0.5f, 0.1f, 0.9f};
    CHECK(same(top_k(s, 2), {1, 4}));        // tie at 0.9: both
    CHECK(same(top_k(s, 3), {0, 1, 4}));     // tie at 0.5: the lower index wins
    CHECK(same(top_k(s, 4), {0, 1, 2, 4}));
    CHECK(same(top_k(s, 0), {}));
    CHECK(same(top_k(s, 9), {0, 1, 2, 3, 4}));
    CHECK(same(top_k({1.f, 1.f, 1.f, 1.f}, 2), {0, 1}));
    CHECK(same(top_k({NAN, 0.2f, 0.1f}, 2), {1, 2}));  // NaN never wins
}

static void test_positions() {
    // tokens_per_second 2, temporal patch 2, 10 sampled frames over 4 s -> sample_fps 2.5 -> interval 1.6
    const double iv = time_interval(2.0, 2, 10.0 / 4.0);
    CHECK(near(iv, 1.6));
    auto off = video_offsets(5, 2, 3, iv);  // 5 units of 2 x 3 tokens
    CHECK(off.size() == 30);
    const int expect_t[5] = {0, 1, 3, 4, 6};  // floor(u * 1.6)
    for (int u = 0; u < 5; ++u) CHECK(off[u * 6].t == expect_t[u]);
    CHECK(off[6 + 5].t == 1 && off[6 + 5].y == 1 && off[6 + 5].x == 2);  // unit 1, row 1, col 2
    CHECK(video_extent(5, 2, 3, iv) == 6);
    CHECK(video_extent(2, 2, 3, iv) == 2);   // the columns dominate a short video
    CHECK(video_extent(1, 4, 3, 7.0) == 3);

    // full video of 2 units after a 3-token prefix, 2 suffix tokens
    auto l = layout_positions(3, video_offsets(2, 2, 3, iv), video_extent(2, 2, 3, iv), 2);
    CHECK(l.prefix.size() == 3 && l.prefix[2].t == 2 && l.prefix[2].y == 2 && l.prefix[2].x == 2);
    CHECK(l.video[0].t == 3 && l.video[0].y == 3 && l.video[0].x == 3);
    CHECK(l.video[11].t == 4 && l.video[11].y == 4 && l.video[11].x == 5);
    CHECK(l.suffix[0].t == 6 && l.suffix[0].y == 6 && l.suffix[0].x == 6);  // 3 + extent 2 + 1
    CHECK(l.suffix[1].t == 7 && l.next == 8);

    // answer pass: kept tokens keep their full-video positions, the suffix its full-video start
    auto full = video_offsets(5, 2, 3, iv);
    std::vector<Pos3> kept = {full[1], full[23], full[29]};  // offsets (0,0,1) (4,1,2) (6,1,2)
    auto a = layout_positions(3, kept, video_extent(5, 2, 3, iv), 1);
    CHECK(a.video[0].t == 3 && a.video[0].y == 3 && a.video[0].x == 4);
    CHECK(a.video[1].t == 7 && a.video[1].y == 4 && a.video[1].x == 5);
    CHECK(a.video[2].t == 9 && a.video[2].y == 4 && a.video[2].x == 5);
    CHECK(a.suffix[0].t == 10);  // 3 + 6 + 1

    // llama.cpp layout: 4 values per token, section-major
    auto flat = mrope_section_major({{1, 2, 3}, {4, 5, 6}});
    CHECK(same(flat, {1, 4, 2, 5, 3, 6, 0, 0}));
    CHECK(throws([] { time_interval(2.0, 2, 0.0); }));
}

static void test_scores() {
    // keys: [v0, v1, q0, q1], d = 1, scale 1; q rows = [1], k = [0, ln2, 0, ln4]
    // row 0 (position 2) sees keys 0..2: exp = 1, 2, 1 -> 0.25, 0.5, 0.25
    // row 1 (position 3) sees keys 0..3: exp = 1, 2, 1, 4 -> 0.125, 0.25, 0.125, 0.5
    const float k[4] = {0.f, (float) std::log(2.0), 0.f, (float) std::log(4.0)};
    const float q1[2] = {1.f, 1.f};
    auto mx = question_attention_scores(q1, k, 2, 4, 1, 1, 1, 0, 2, Aggregate::max);
    CHECK(mx.size() == 2 && near(mx[0], 0.25) && near(mx[1], 0.5));
    auto mean = question_attention_scores(q1, k, 2, 4, 1, 1, 1, 0, 2, Aggregate::mean);
    CHECK(near(mean[0], 0.1875) && near(mean[1], 0.375));
    auto only1 = question_attention_scores(q1, k, 2, 4, 1, 1, 1, 1, 2, Aggregate::max);
    CHECK(only1.size() == 1 && near(only1[0], 0.5));

    // GQA: 2 query heads share 1 KV head; head 1 has q = 0 -> uniform rows (1/3 then 1/4)
    const float q2[4] = {1.f, 0.f, 1.f, 0.f};  // [row][head][d]
    auto g = question_attention_scores(q2, k, 2, 4, 2, 1, 1, 0, 2, Aggregate::max);
    CHECK(near(g[0], 1.0 / 3.0) && near(g[1], 0.5));
    auto gm = question_attention_scores(q2, k, 2, 4, 2, 1, 1, 0, 2, Aggregate::mean);
    CHECK(near(gm[0], (0.25 + 0.125 + 1.0 / 3.0 + 0.25) / 4.0));
    CHECK(near(gm[1], (0.5 + 0.25 + 1.0 / 3.0 + 0.25) / 4.0));

    // head_dim 2, scale 1/sqrt(2): q = (1, 1), k_v0 = (s, s) with s = ln(3) / sqrt(2) -> logit ln3; others 0
    const float s = (float) (std::log(3.0) / std::sqrt(2.0));
    const float k2[6] = {s, s, 0.f, 0.f, 0.f, 0.f};
    const float q3[2] = {1.f, 1.f};
    auto d2 = question_attention_scores(q3, k2, 1, 3, 1, 1, 2, 0, 2, Aggregate::max);
    CHECK(near(d2[0], 0.6, 1e-5) && near(d2[1], 0.2, 1e-5));
    CHECK(throws([&] { question_attention_scores(q1, k, 2, 4, 1, 1, 1, 0, 3, Aggregate::max); }));
    CHECK(parse_aggregate("mean") == Aggregate::mean);
    CHECK(throws([] { parse_aggregate("sum"); }));
}

static void test_video_helpers() {
    CHECK(same(uniform_indices(10, 4), {1, 3, 6, 8}));  // centres of 4 segments of 2.5 frames
    CHECK(same(uniform_indices(4, 4), {0, 1, 2, 3}));
    CHECK(same(uniform_indices(3, 1), {1}));
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

int main() {
    test_frame_sets();
    test_budget();
    test_top_k();
    test_positions();
    test_scores();
    test_video_helpers();
    if (g_failures) {
        std::fprintf(stderr, "%d check(s) failed\n", g_failures);
        return 1;
    }
    std::printf("all unit tests passed\n");
    return 0;
}
