// flexselect-cli: answer a question about a long video with FlexSelect token selection, on llama.cpp.
// Prints the answer on stdout and the same stats as the Python CLI on stderr (or everything as one JSON object).
#include "flexselect/flexselect.h"
#include "flexselect/defaults_gen.h"

#include <sys/resource.h>

#include <cerrno>
#include <csignal>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <unistd.h>

using namespace flexselect;

namespace {

const char * kUsage =
    "usage: flexselect-cli -m model.gguf --mmproj mmproj.gguf --video FILE [-p \"QUESTION\" ...] [options]\n"
    "\n"
    "  -m, --model FILE         language model GGUF: Qwen2.5-VL, Qwen2-VL, Qwen3-VL (dense, MoE), Qwen3.5 (dense,\n"
    "                           MoE)\n"
    "      --mmproj FILE        its vision projector GGUF (required)\n"
    "      --ranker FILE        FlexSelect-Lite ranker (.onnx) instead of the reference-layer scoring pass\n"
    "      --video FILE         the video\n"
    "  -p, --prompt TEXT        the question; repeat -p for several, or give none to read one question per line\n"
    "                           from standard input (each set is indexed once: follow-ups decode only the question)\n"
    "frames (defaults: the model family's from defaults.json; Qwen2.5-VL's shown):\n"
    "      --frames N           sample N frames uniformly\n"
    "      --fps F              sample F frames per second (default %g)\n"
    "      --start S, --end S   only this time range (seconds)\n"
    "      --max-frames N       cap on sampled frames (default %d)\n"
    "      --max-side N         longest frame side in pixels (default %d)\n"
    "selection:\n"
    "      --budget K           visual tokens kept for the whole video (default %d, capped at the video's\n"
    "                           tokens; a larger explicit K is an error)\n"
    "      --layer L            reference layer, 0-based (default %d for a 28-layer Qwen2.5-VL, the same relative\n"
    "                           depth otherwise; Qwen3.5: a full-attention layer)\n"
    "      --set-frames S       frame units per frame set (default %d)\n"
    "      --aggregate max|mean over heads and question tokens (default %s)\n"
    "generation:\n"
    "      --max-new-tokens N   (default 128)\n"
    "      --temp T             0 = greedy (default)\n"
    "      --seed N             sampling seed when --temp > 0\n"
    "runtime:\n"
    "  -ngl, --n-gpu-layers N   layers on the GPU (-1 = all, default)\n"
    "  -t, --threads N          CPU threads (default: all)\n"
    "  -c, --ctx-size N         context size (default 32768)\n"
    "      --kv-f32             f32 KV cache instead of f16 (for exact comparisons with other runtimes)\n"
    "      --json               print one JSON object per question (answer, stats, kept token indices, answer\n"
    "                           token ids), one per line\n"
    "      --no-index           score every question's sets from scratch (no reuse between questions)\n"
    "  -v, --verbose            show llama.cpp's logs\n"
    "\n"
    "ONNX Runtime: %s\n";

void usage(FILE * out) {
    const defaults::Family & d = *defaults::find_family("qwen2_5_vl");
    std::fprintf(out, kUsage, d.fps, d.max_frames, d.max_side, d.budget, d.reference_layer, defaults::set_frames,
                 defaults::aggregate,
                 Ranker::available() ? "yes (--ranker available)"
                                     : "no (built with -DFLEXSELECT_WITH_ONNXRUNTIME=OFF)");
}

struct Args {
    LlmOptions llm;
    std::string ranker, video;
    std::vector<std::string> questions;  // none: read them from standard input, one per line
    bool index = true;
    SamplingOptions sampling;
    SelectOptions select;
    GenerationOptions gen;
    bool json = false;
};

bool is_blank(const std::string & s) { return s.find_first_not_of(" \t\r\n") == std::string::npos; }

int to_int(const std::string & flag, const char * v) {
    char * end = nullptr;
    errno = 0;
    const long x = std::strtol(v, &end, 10);
    if (!*v || *end || errno == ERANGE || x < INT_MIN || x > INT_MAX) {
        throw Error(flag + " expects an integer, got '" + v + "'");
    }
    return (int) x;
}

double to_double(const std::string & flag, const char * v) {
    char * end = nullptr;
    const double x = std::strtod(v, &end);
    if (!*v || *end || !std::isfinite(x)) throw Error(flag + " expects a finite number, got '" + v + "'");
    return x;
}

// A flag's value is checked where it is read: internally 0 / -1 mean "the default", so an explicit 0, a negative
// value or NaN must never reach the options and silently become the default.
int to_int_at_least(const std::string & flag, const char * v, int low) {
    const int x = to_int(flag, v);
    if (x < low) throw Error(flag + " must be a whole number >= " + std::to_string(low) + ", got " + v);
    return x;
}

double to_double_above(const std::string & flag, const char * v, double low, bool allow_equal) {
    const double x = to_double(flag, v);
    if (x < low || (x == low && !allow_equal)) {
        throw Error(flag + " must be a number " + (allow_equal ? ">= " : "> ") + std::to_string((int) low) + ", got " +
                    v);
    }
    return x;
}

Args parse(int argc, char ** argv) {
    Args a;  // frame defaults (0 here) come from the model's family once it is loaded
    a.select.aggregate = parse_aggregate(defaults::aggregate);
    for (int i = 1; i < argc; ++i) {
        const std::string f = argv[i];
        auto val = [&]() -> const char * {
            if (i + 1 >= argc) throw Error(f + " needs a value");
            return argv[++i];
        };
        if (f == "-h" || f == "--help") {
            usage(stdout);
            std::exit(0);
        } else if (f == "-m" || f == "--model") a.llm.model_path = val();
        else if (f == "--mmproj") a.llm.mmproj_path = val();
        else if (f == "--ranker") a.ranker = val();
        else if (f == "--video") a.video = val();
        else if (f == "-p" || f == "--prompt") a.questions.push_back(val());
        else if (f == "--frames") a.sampling.frames = to_int_at_least(f, val(), 1);
        else if (f == "--fps") a.sampling.fps = to_double_above(f, val(), 0, false);
        else if (f == "--start") a.sampling.start = to_double_above(f, val(), 0, true);
        else if (f == "--end") a.sampling.end = to_double_above(f, val(), 0, false);
        else if (f == "--max-frames") a.sampling.max_frames = to_int_at_least(f, val(), 1);
        else if (f == "--max-side") a.sampling.max_side = to_int_at_least(f, val(), 28);
        else if (f == "--budget") a.select.budget = to_int_at_least(f, val(), 1);
        else if (f == "--layer") a.select.layer = to_int_at_least(f, val(), 0);
        else if (f == "--set-frames") a.select.set_frames = to_int_at_least(f, val(), 1);
        else if (f == "--aggregate") a.select.aggregate = parse_aggregate(val());
        else if (f == "--max-new-tokens") a.gen.max_new_tokens = to_int_at_least(f, val(), 1);
        else if (f == "--temp") a.gen.temperature = (float) to_double_above(f, val(), 0, true);
        else if (f == "--seed") a.gen.seed = (uint32_t) to_int(f, val());
        else if (f == "-ngl" || f == "--n-gpu-layers") a.llm.n_gpu_layers = to_int_at_least(f, val(), -1);
        else if (f == "-t" || f == "--threads") a.llm.n_threads = to_int_at_least(f, val(), 1);
        else if (f == "-c" || f == "--ctx-size") a.llm.n_ctx = to_int_at_least(f, val(), 64);
        else if (f == "--kv-f32") a.llm.kv_f32 = true;
        else if (f == "--json") a.json = true;
        else if (f == "--no-index") a.index = false;
        else if (f == "-v" || f == "--verbose") a.llm.verbose = true;
        else throw Error("unknown option " + f + " (see --help)");
    }
    if (a.llm.model_path.empty()) throw Error("no model given: pass -m model.gguf --mmproj mmproj.gguf");
    if (a.llm.mmproj_path.empty()) {
        throw Error("--mmproj is required: the vision projector GGUF that belongs to " + a.llm.model_path);
    }
    if (a.video.empty()) throw Error("no video given: pass --video FILE");
    for (const auto & q : a.questions) {
        if (is_blank(q)) throw Error("the question is empty: pass -p \"QUESTION\" about the video");
    }
    if (a.sampling.frames > 0 && a.sampling.fps > 0) throw Error("give either --frames or --fps, not both");
    if (a.sampling.end > 0 && a.sampling.end <= a.sampling.start) throw Error("--end must be after --start");
    return a;
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 if it is not one.
size_t utf8_len(const std::string & s, size_t i) {
    const unsigned char c = s[i];
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return 0;
    for (size_t k = 1; k < n; ++k) {
        if (((unsigned char) s[i + k] >> 6) != 0x2) return 0;
    }
    return n;
}

// A JSON string; bytes that are not valid UTF-8 (a token can end inside a character) become U+FFFD.
std::string json_str(const std::string & raw) {
    std::string s;
    for (size_t i = 0; i < raw.size();) {
        const size_t n = utf8_len(raw, i);
        if (n == 0) {
            s += "\xEF\xBF\xBD";
            ++i;
        } else {
            s.append(raw, i, n);
            i += n;
        }
    }
    std::string o = "\"";
    for (unsigned char c : s) {
        switch (c) {
        case '"': o += "\\\""; break;
        case '\\': o += "\\\\"; break;
        case '\n': o += "\\n"; break;
        case '\r': o += "\\r"; break;
        case '\t': o += "\\t"; break;
        default:
            if (c < 0x20) {
                char b[8];
                std::snprintf(b, sizeof(b), "\\u%04x", c);
                o += b;
            } else {
                o += (char) c;  // UTF-8 passes through
            }
        }
    }
    return o + "\"";
}

template <typename T> std::string json_list(const std::vector<T> & v) {
    std::string o = "[";
    for (size_t i = 0; i < v.size(); ++i) o += (i ? "," : "") + std::to_string(v[i]);
    return o + "]";
}

// Seconds with 6 decimals (microseconds: finer than any container's time base).
std::string json_doubles(const std::vector<double> & v) {
    std::string o = "[";
    char b[32];
    for (size_t i = 0; i < v.size(); ++i) {
        std::snprintf(b, sizeof b, "%s%.6f", i ? ", " : "", v[i]);
        o += b;
    }
    return o + "]";
}

// The evidence of a selection: kept tokens counted per temporal unit, each unit starting at its first frame.
std::vector<EvidenceRange> evidence_of(const Selection & sel, const VisualTokens & v,
                                       const std::vector<double> & frame_timestamps) {
    std::vector<int> per_unit(v.num_units, 0);
    for (int i : sel.kept) ++per_unit[i / v.tokens_per_unit()];
    const size_t frames_per_unit = (frame_timestamps.size() + v.num_units - 1) / v.num_units;
    std::vector<double> starts(v.num_units);
    for (int u = 0; u < v.num_units; ++u) starts[u] = frame_timestamps[u * frames_per_unit];
    return evidence_ranges(per_unit, starts);
}

std::string evidence_json(const std::vector<EvidenceRange> & ranges) {
    std::string o = "[";
    char buf[128];
    for (size_t i = 0; i < ranges.size(); ++i) {
        const auto & r = ranges[i];
        std::snprintf(buf, sizeof buf, "%s{\"start_s\": %.3f, \"end_s\": %.3f, \"tokens\": %d, \"share\": %.3f}",
                      i ? ", " : "", r.start_s, r.end_s, r.tokens, r.share);
        o += buf;
    }
    return o + "]";
}

// As python/flexselect/evidence.describe: "kept 96 of 2880 tokens; 81% of them from 18.8-19.8 s, ...".
std::string evidence_text(const std::vector<EvidenceRange> & ranges, size_t kept, int total) {
    std::string o = "kept " + std::to_string(kept) + " of " + std::to_string(total) + " tokens";
    if (ranges.empty()) return o + ", spread evenly over the video";
    char buf[96];
    for (size_t i = 0; i < ranges.size() && i < 3; ++i) {
        std::snprintf(buf, sizeof buf, "%s%.0f%% %sfrom %.1f-%.1f s", i ? ", " : "; ", 100.0 * ranges[i].share,
                      i ? "" : "of them ", ranges[i].start_s, ranges[i].end_s);
        o += buf;
    }
    return o;
}

double peak_rss_mb() {
    struct rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0;  // KiB on Linux
}

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The index part of the stats: whether this question reused sets indexed by an earlier one, and what that saved.
std::string index_json(const Selection & sel, const VideoIndex * index) {
    if (index == nullptr || sel.index_built + sel.index_reused == 0) return "{\"used\": false}";
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "{\"used\": true, \"reused_sets\": %d, \"built_sets\": %d, \"saved_s\": %.4f, \"bytes\": %zu}",
                  sel.index_reused, sel.index_built, sel.index_saved_s, index->bytes());
    return buf;
}

void print_result(const Args & a, const Generation & gen, const Selection & sel, const VisualTokens & v,
                  const Clip & clip, size_t n_frames, bool lite, bool video_cached, double t_decode, double t_encode,
                  double t_select, double t_answer, double total, const VideoIndex * index) {
    const char * selector = lite ? "lite" : "reference";
    const auto evidence = evidence_of(sel, v, clip.timestamps);
    if (a.json) {
        std::string layer = sel.layer >= 0 ? std::to_string(sel.layer) : "null";
        std::printf("{\"answer\": %s, \"stats\": {\"frames\": %zu, \"frame_units\": %d, \"tokens_per_frame\": %d, "
                    "\"visual_tokens\": %d, \"kept_tokens\": %zu, \"frame_sets\": %d, \"selector\": \"%s\", "
                    "\"reference_layer\": %s, \"video_cached\": %s, \"index\": %s, \"frame_size\": [%d, %d], "
                    "\"sample_fps\": %.6g, \"timestamps\": %s, "
                    "\"seconds\": {\"decode\": %.4f, \"encode\": %.4f, \"select\": %.4f, \"ttft_answer\": %.4f, "
                    "\"answer\": %.4f, \"total\": %.4f}, \"peak_memory_mb\": {\"process_rss\": %.1f}}, "
                    "\"evidence\": %s, \"answer_token_ids\": %s, \"kept_token_indices\": %s}\n",
                    json_str(gen.text).c_str(), n_frames, v.num_units, v.tokens_per_unit(), v.num_tokens(),
                    sel.kept.size(), sel.n_sets, selector, layer.c_str(), video_cached ? "true" : "false",
                    index_json(sel, index).c_str(), clip.height, clip.width, clip.sample_fps,
                    json_doubles(clip.timestamps).c_str(), t_decode, t_encode, t_select, gen.ttft_s, t_answer, total,
                    peak_rss_mb(), evidence_json(evidence).c_str(), json_list(gen.tokens).c_str(),
                    json_list(sel.kept).c_str());
    } else {
        std::printf("%s\n", gen.text.c_str());
        std::fprintf(stderr, "evidence: %s\n", evidence_text(evidence, sel.kept.size(), v.num_tokens()).c_str());
        const double share = 100.0 * sel.kept.size() / std::max(1, v.num_tokens());
        std::string layer = sel.layer >= 0 ? ", reference layer " + std::to_string(sel.layer) : "";
        std::string reuse;
        if (index != nullptr && sel.index_reused > 0) {
            char buf[160];
            std::snprintf(buf, sizeof(buf), "index: reused %d set(s), saved %.2fs\n", sel.index_reused,
                          sel.index_saved_s);
            reuse = buf;
        } else if (index != nullptr && sel.index_built > 0) {
            char buf[160];
            std::snprintf(buf, sizeof(buf), "index: built %d set(s) (%.1f MiB) for the next questions\n",
                          sel.index_built, index->bytes() / 1048576.0);
            reuse = buf;
        }
        std::fprintf(stderr,
                     "frames: %s%zu sampled -> %d units x %d tokens | visual tokens: %d | kept: %zu (%.1f%%) in %d "
                     "frame set(s), selector %s%s\n"
                     "%s"
                     "time: decode %.2fs | encode %.2fs | select %.2fs | answer %.2fs (first token %.2fs) | "
                     "total %.2fs\n"
                     "peak memory: process_rss %.0f MiB\n",
                     video_cached ? "cached, " : "", n_frames, v.num_units, v.tokens_per_unit(), v.num_tokens(),
                     sel.kept.size(), share, sel.n_sets, selector, layer.c_str(), reuse.c_str(), t_decode, t_encode,
                     t_select, t_answer, gen.ttft_s, total, peak_rss_mb());
    }
}

int run(int argc, char ** argv) {
    Args a = parse(argc, argv);
    std::unique_ptr<Ranker> ranker;
    if (!a.ranker.empty()) {
        if (!Ranker::available()) {
            throw Error("this flexselect-cli was built without ONNX Runtime, so --ranker is not available; rebuild "
                        "with -DFLEXSELECT_WITH_ONNXRUNTIME=ON (see cpp/README.md)");
        }
        std::FILE * f = std::fopen(a.ranker.c_str(), "rb");
        if (!f) throw Error("ranker not found: " + a.ranker);
        std::fclose(f);
    }
    Llm llm(a.llm);
    // The family's rules for what the flags leave open, and the reference layer checked before any video work.
    const defaults::Family & fam = llm.family();
    if (a.sampling.frames == 0 && a.sampling.fps == 0) a.sampling.fps = fam.fps;
    if (a.sampling.max_frames == 0) a.sampling.max_frames = fam.max_frames;
    if (a.sampling.max_side == 0) a.sampling.max_side = fam.max_side;
    a.sampling.pixel_factor = llm.pixel_factor();
    std::string layer_warning;
    if (a.ranker.empty()) a.select.layer = resolve_reference_layer(llm, a.select.layer, &layer_warning);
    if (!a.ranker.empty()) {
        ranker = std::make_unique<Ranker>(a.ranker, a.llm.n_threads);
        if (ranker->feature_dim() > 0 && ranker->feature_dim() != llm.n_main()) {
            throw Error("ranker " + a.ranker + " does not match " + a.llm.model_path + ": it takes " +
                        std::to_string(ranker->feature_dim()) + "-d visual tokens, the model's are " +
                        std::to_string(llm.n_main()) + "-d");
        }
    }

    const auto t0 = Clock::now();
    Clip clip = load_clip(a.video, a.sampling);
    for (const auto & w : clip.warnings) std::fprintf(stderr, "flexselect-cli: warning: %s\n", w.c_str());
    const double t_decode = since(t0);
    const auto t1 = Clock::now();
    VisualTokens v = llm.encode(clip);
    const double t_encode = since(t1);
    const size_t n_frames = clip.frames.size();
    clip.frames.clear();  // pixels are no longer needed
    clip.frames.shrink_to_fit();

    // One question after another about the same visual tokens; with the index, a set's prefix + visual state is
    // built by the first question that scores it and only the question's tokens are decoded after that.
    VideoIndex index;
    const bool from_stdin = a.questions.empty();
    if (a.questions.size() == 1) a.index = false;  // a single question: nothing would ever reuse an index
    if (a.index && llm.hybrid() && a.ranker.empty()) {
        a.index = false;
        std::fprintf(stderr,
                     "notice: no video index for a hybrid model (%s: its linear-attention layers' state cannot "
                     "be cut back after a question): every question reruns the scoring passes\n",
                     fam.name);
    }
    const bool prompt_user = from_stdin && isatty(fileno(stdin)) && !a.json;
    for (size_t n = 0;; ++n) {
        std::string question;
        if (!from_stdin) {
            if (n == a.questions.size()) break;
            question = a.questions[n];
        } else {
            do {
                if (prompt_user) std::fputs("> ", stderr);
            } while (std::getline(std::cin, question) && is_blank(question));
            check_stop();  // Ctrl-C while waiting for a question
            if (is_blank(question)) break;  // end of input
        }
        check_stop();
        const Prompt prompt = llm.prompt(question);
        const auto t2 = Clock::now();
        const Selection sel = select_tokens(llm, ranker.get(), v, prompt, a.select, a.index ? &index : nullptr);
        const double t_select = since(t2);
        const auto t3 = Clock::now();
        const Generation gen = llm.answer(v, sel.kept, prompt, a.gen);
        const double t_answer = since(t3);
        // decode and encode are paid once, by the first question
        const double dec = n == 0 ? t_decode : 0.0, enc = n == 0 ? t_encode : 0.0;
        const double total = dec + enc + t_select + t_answer;
        print_result(a, gen, sel, v, clip, n_frames, ranker != nullptr, n > 0, dec, enc, t_select, t_answer, total,
                     a.index ? &index : nullptr);
        std::fflush(stdout);
        if (n == 0 && !layer_warning.empty()) std::fprintf(stderr, "warning: %s\n", layer_warning.c_str());
    }
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    // Ctrl-C stops at the next frame set, token or packet (a second one kills at once, as llama.cpp's tools do);
    // no SA_RESTART, so waiting for a question on standard input is interrupted too.
    struct sigaction sa{};
    sa.sa_handler = [](int) {
        request_stop();
        std::signal(SIGINT, SIG_DFL);
    };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    try {
        return run(argc, argv);
    } catch (const Interrupted &) {
        std::fprintf(stderr, "flexselect-cli: interrupted\n");
        return 130;
    } catch (const Error & e) {
        if (stop_requested()) {  // a read cut short by Ctrl-C (no SA_RESTART) fails as an error: it is the interrupt
            std::fprintf(stderr, "flexselect-cli: interrupted\n");
            return 130;
        }
        std::fprintf(stderr, "flexselect-cli: error: %s\n", e.what());
        return 2;
    } catch (const std::bad_alloc &) {
        std::fprintf(stderr, "flexselect-cli: error: out of memory; use fewer --frames, a smaller --max-side or "
                             "--budget\n");
        return 2;
    } catch (const std::exception & e) {
        std::fprintf(stderr, "flexselect-cli: internal error: %s\n", e.what());
        return 1;
    }
}
