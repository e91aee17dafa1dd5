// Times Ranker::score (the C++ runtime's Lite ranker call) on random inputs, for bench/lite_vs_reference.py.
//   flexselect-ranker-bench RANKER.onnx N_VISUAL N_EMBD N_QUESTION [REPEATS] [THREADS]
// Prints one JSON line: {"load_s": ..., "score_s": [...], "first": <score 0>}.
#include "flexselect/flexselect.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s RANKER.onnx N_VISUAL N_EMBD N_QUESTION [REPEATS] [THREADS]\n", argv[0]);
        return 2;
    }
    const int n_visual = std::atoi(argv[2]), n_embd = std::atoi(argv[3]), n_question = std::atoi(argv[4]);
    const int repeats = argc > 5 ? std::atoi(argv[5]) : 1, threads = argc > 6 ? std::atoi(argv[6]) : 0;
    try {
        using clock = std::chrono::steady_clock;
        auto t0 = clock::now();
        flexselect::Ranker ranker(argv[1], threads);
        const double load_s = std::chrono::duration<double>(clock::now() - t0).count();
        std::mt19937 rng(0);
        std::normal_distribution<float> normal(0.0f, 0.02f);
        std::vector<float> embd((size_t) n_visual * n_embd);
        for (float & x : embd) x = normal(rng);
        std::vector<int32_t> question(n_question);
        for (int i = 0; i < n_question; ++i) question[i] = 100 + i;
        // warm-up on a small set: ONNX Runtime's first run allocates and plans
        ranker.score(embd.data(), 8, n_embd, question);
        std::string times;
        float first = 0.0f;
        for (int r = 0; r < repeats; ++r) {
            t0 = clock::now();
            const std::vector<float> s = ranker.score(embd.data(), n_visual, n_embd, question);
            times += (r ? "," : "") + std::to_string(std::chrono::duration<double>(clock::now() - t0).count());
            first = s.at(0);
        }
        std::printf("{\"load_s\": %.3f, \"score_s\": [%s], \"first\": %.9g}\n", load_s, times.c_str(), first);
    } catch (const std::exception & e) {
        std::fprintf(stderr, "flexselect-ranker-bench: %s\n", e.what());
        return 1;
    }
    return 0;
}
