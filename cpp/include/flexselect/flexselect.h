// FlexSelect (NeurIPS 2025): query-aware visual token selection for long-video QA, as a small C++ library.
//
// The steps, in the order the CLI runs them (each matches a definition in python/flexselect/):
//   1. load_clip        video -> sampled RGB frames (FFmpeg; uniform or fps sampling, streamed, resized)
//   2. Llm::encode      frames -> visual tokens: one embedding row per token, frame unit after frame unit (mtmd)
//   3. frame_sets       strided sets of frame units; split_budget gives each set its share of the token budget
//   4. Llm::score_set   scoring pass over [prefix + the set's tokens + suffix] up to the reference layer only;
//                       question_attention_scores turns the captured Q/K into one score per visual token
//      (or Ranker::score, a FlexSelect-Lite ONNX ranker)
//   5. top_k            per set, mapped back to global token indices, sorted ascending
//   6. Llm::answer      answer pass over [prefix + kept tokens at their original positions + suffix], greedy
//
// A "frame unit" is the model's temporal unit (Qwen2.5-VL: two sampled frames), every unit holds the same
// rows x cols tokens, and token j of unit u has the global index u * tokens_per_unit + j.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace flexselect {

namespace defaults {
struct Family;  // a family's rules from defaults.json (defaults_gen.h)
}

// Every error the user can fix (bad file, mismatched models, too long a prompt) is thrown as this, with one clear
// message; the CLI prints it and exits with status 2.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Ctrl-C: request_stop() (async-signal-safe) makes the next check_stop() -- between frame sets, generated tokens
// and decoded packets -- throw Interrupted, so a run stops cleanly at the next step (the CLI exits 130).
struct Interrupted : std::runtime_error {
    Interrupted() : std::runtime_error("interrupted") {}
};
void request_stop();
bool stop_requested();
void check_stop();

// ---- selection math (selection.cpp; python/flexselect/selection.py) ---------------------------------------------

// G = ceil(F / S) sets; set g holds units g, g+G, g+2G, ... (each set spans the whole video).
std::vector<std::vector<int>> frame_sets(int num_units, int set_frames);

// The budget rounded up to whole units' worth of tokens.
int round_budget(int budget, int tokens_per_unit);

// Equal shares, never more than a set holds; what a small set cannot use goes to the others (earlier sets take the
// remainder first), so the shares add up to exactly min(budget, total tokens).
std::vector<int> split_budget(int budget, const std::vector<int> & set_sizes);

// Indices of the k highest scores in ascending index order; ties go to the lower index.
std::vector<int> top_k(const std::vector<float> & scores, int k);

enum class Aggregate { max, mean };
Aggregate parse_aggregate(const std::string & name);

// Score each visual token by how much the question attends to it, at one layer, from post-RoPE Q and K.
//   q: [n_rows][n_heads][head_dim]      the last n_rows positions of the sequence (the text after the video)
//   k: [n_keys][n_kv_heads][head_dim]   all positions; query head h uses KV head h / (n_heads / n_kv_heads)
// softmax over the whole key span of q.k / sqrt(head_dim), causal among the n_rows question columns, restricted to
// the columns [vis_begin, vis_end), then max (or mean) over heads and rows. Returns vis_end - vis_begin scores.
std::vector<float> question_attention_scores(const float * q, const float * k, int n_rows, int n_keys, int n_heads,
                                             int n_kv_heads, int head_dim, int vis_begin, int vis_end,
                                             Aggregate aggregate);
// The same over any key columns (Qwen3-VL: the visual tokens between the timestamp texts), each < n_keys - n_rows.
std::vector<float> question_attention_scores(const float * q, const float * k, int n_rows, int n_keys, int n_heads,
                                             int n_kv_heads, int head_dim, const std::vector<int> & columns,
                                             Aggregate aggregate);

// ---- evidence (evidence.cpp; python/flexselect/evidence.py) ------------------------------------------------------

struct EvidenceRange {
    double start_s = 0.0, end_s = 0.0;
    int tokens = 0;      // kept tokens inside the range
    double share = 0.0;  // of all kept tokens
};

// Ranked time ranges where the kept tokens concentrate: a unit is dense at >= max(1, 2 * kept / units) kept tokens;
// consecutive dense units form a range from its first unit's start to the next unit's start (the last unit lasts
// as long as the one before it); ranked by tokens, then start. Throws Error if the two lengths differ.
std::vector<EvidenceRange> evidence_ranges(const std::vector<int> & kept_per_unit,
                                           const std::vector<double> & timestamps, int max_ranges = 5);

// ---- M-RoPE positions (positions.cpp; python/flexselect/mrope.py) -----------------------------------------------

struct Pos3 {
    int32_t t, y, x;
};

// Temporal step per unit: tokens_per_second * temporal_patch / sample_fps, or 1 when tokens_per_second <= 0 (the
// family has no time scaling: Qwen2-VL; defaults.json's null).
double time_interval(double tokens_per_second, int temporal_patch, double sample_fps);

// Offsets of a video's tokens relative to its start position, unit-major then row then col:
// (floor(u * interval), r, c). floor is taken in double.
std::vector<Pos3> video_offsets(int num_units, int rows, int cols, double interval);

// The largest offset of a video in any of the three dims (the text after it resumes at start + extent + 1).
int video_extent(int num_units, int rows, int cols, double interval);

// A prompt laid out as [prefix (P tokens)] [video tokens at start P + offset] [suffix (T tokens)]:
// prefix at p in all dims, suffix consecutive from P + extent + 1. `extent` is that of the video the tokens come
// from (the full video in the answer pass, so the suffix keeps its full-video positions).
struct Layout {
    std::vector<Pos3> prefix, video, suffix;
    int32_t next;  // position of the first generated token
};
Layout layout_positions(int prefix_len, const std::vector<Pos3> & video_offsets, int extent, int suffix_len);

// llama.cpp's M-RoPE batch layout: 4 values per token, section-major (all t, all y, all x, then n zeros).
std::vector<int32_t> mrope_section_major(const std::vector<Pos3> & pos);

// A pass as llama.cpp decodes it: runs of text tokens or of visual tokens, each with its positions. Every layout
// ends with the suffix run (the question's rows, which score).
struct Run {
    std::vector<int32_t> ids;  // text token ids; empty: a run of visual tokens
    std::vector<int> tokens;   // a visual run's global token indices
    std::vector<Pos3> pos;
};
struct Sequence {
    std::vector<Run> runs;
    std::vector<int> columns;  // sequence indices of the visual tokens, in token order
    int32_t next = 0;          // position of the first generated token
    int size() const;
};

// Qwen2.5-VL / Qwen2-VL: [prefix] [the tokens at start P + offset] [suffix], as layout_positions.
Sequence video_sequence(const std::vector<int32_t> & prefix, const std::vector<int> & tokens,
                        const std::vector<Pos3> & offsets, int extent, const std::vector<int32_t> & suffix);

// Qwen3-VL / Qwen3.5 (python/flexselect/backends/hf/qwen3_vl.py): [prefix], then per unit `<t seconds>`
// <|vision_start|> its tokens <|vision_end|> (labels[i] the unit's timestamp text, tokens[i] its kept tokens, maybe
// none), then [suffix]. Text is consecutive; a unit at s puts token (r, c) at (s, s + r, s + c) and the text after
// it at s + max(rows, cols): in the answer pass these are the full video's positions of the kept tokens.
Sequence unit_text_sequence(const std::vector<int32_t> & prefix, const std::vector<std::vector<int32_t>> & labels,
                            int32_t vision_start, int32_t vision_end, const std::vector<std::vector<int>> & tokens,
                            int rows, int cols, const std::vector<int32_t> & suffix);

// ---- video (video.cpp) -------------------------------------------------------------------------------------------

struct SamplingOptions {
    int frames = 0;        // > 0: this many frames at the centres of equal segments of the span
    double fps = 0.0;      // > 0 (and frames == 0): this many frames per second
    double start = -1.0;   // seconds; < 0: from the beginning
    double end = -1.0;     // seconds; < 0: to the end
    int max_frames = 0;    // > 0: cap on sampled frames
    int max_side = 0;      // > 0: longest side at most this many pixels
    int pixel_factor = 28; // each side a multiple of this (patch x spatial merge: Qwen2.5-VL 28, Qwen3-VL 32)
};

struct Clip {
    int width = 0, height = 0;                  // as displayed (rotated), resized: multiples of the pixel factor
    std::vector<std::vector<uint8_t>> frames;   // RGB24, height * width * 3 each
    std::vector<double> timestamps;             // seconds from the first frame: each frame's presentation time
    double sample_fps = 0.0;                    // the requested fps if met, else frames / span in seconds
    int64_t source_frames = 0;                  // frames in the source
    double source_fps = 0.0;                    // its average rate
    std::vector<std::string> warnings;          // damage skipped while decoding (the CLI prints them)
};

// Which frames to decode, picked in time as python/flexselect/video.py does: `times` are the frames' presentation
// times (sorted, seconds from the first), `end_s` the end of the last frame. The span runs from the frame shown at
// start to the end of the last frame shown before end; n frames (frames, round(span * fps), or all) are the ones
// shown at the centres of n equal segments, duplicates dropped, capped by max_frames. Throws Error on an empty span.
struct FramePlan {
    std::vector<int64_t> indices;  // sorted, unique
    double span_s = 0.0;
    bool fps_met = false;          // fps sampling took all the frames it asked for
};
FramePlan sample_frames(const std::vector<double> & times, double end_s, const SamplingOptions & opts);
// Frame size fed to the vision tower: longest side <= max_side, then each side rounded to a multiple of `factor`
// (at least one: a smaller video is scaled up to one merged patch, never further; Python's frame_size is the same).
void target_size(int width, int height, int max_side, int & out_width, int & out_height, int factor = 28);

// Decodes only what is needed and keeps only the sampled frames. Throws Error on unreadable input.
Clip load_clip(const std::string & path, const SamplingOptions & opts);

// ---- the Video-LLM through llama.cpp + mtmd (llm.cpp) ------------------------------------------------------------

struct LlmOptions {
    std::string model_path, mmproj_path;
    int n_gpu_layers = -1;  // -1: all
    int n_threads = 0;      // 0: every hardware thread (as the Python backend)
    int n_ctx = 32768;
    int n_batch = 2048;     // tokens per llama_decode call; the scoring capture accumulates across micro-batches
    bool verbose = false;   // llama.cpp / mtmd logs
    bool kv_f32 = false;    // f32 KV cache (llama.cpp's is f16 even for an f32 GGUF): exact runtime comparisons
};

struct VisualTokens {
    // [num_units * rows * cols][n_embd], unit-major: mtmd's rows, llama_model_n_embd_inp wide. Qwen3-VL: the main
    // embedding (n_main) followed by one slice per DeepStack level, so a pass that carries a token carries exactly
    // its DeepStack features; a Lite ranker reads the main embedding only.
    std::vector<float> embd;
    int n_embd = 0, n_main = 0, num_units = 0, rows = 0, cols = 0;
    double interval = 1.0;            // M-RoPE temporal step per unit (Qwen2.5-VL layout)
    std::vector<double> unit_seconds; // each unit's time (mean of its frames' times): Qwen3-VL's timestamp text
    int tokens_per_unit() const { return rows * cols; }
    int num_tokens() const { return num_units * rows * cols; }
    const float * token(int i) const { return embd.data() + (size_t) i * n_embd; }
};

struct Prompt {
    std::vector<int32_t> prefix, suffix;  // token ids before / after the video
    std::vector<int32_t> question;        // the question's own ids (for a Lite ranker)
};

struct Generation {
    std::string text;
    std::vector<int32_t> tokens;
    int prompt_tokens = 0;
    double ttft_s = 0.0;  // from the start of the answer pass to the first sampled token
};

struct GenerationOptions {
    int max_new_tokens = 128;
    float temperature = 0.0f;  // 0: greedy
    uint32_t seed = 0;
};

// A frame set's question-independent scoring state (Llm::index_set): the prefix and the set's visual tokens come
// before the question and attention is causal, so their KV cache of layers < layer and their layer-`layer` keys are
// the same for every question. Llm::score_indexed restores it and decodes only the question's tokens.
struct SetIndex {
    std::vector<int> units;      // the set's frame units (empty: not built)
    int layer = -1;
    int n_context = 0;           // prefix + the set's visual tokens
    std::vector<uint8_t> state;  // llama_state_seq_get_data of the context's KV cells
    std::vector<float> k;        // [n_context][n_kv_heads][head_dim] layer-`layer` keys, RoPE applied
    double build_s = 0.0;        // what building it took: what each reuse saves
    size_t bytes() const;
};

class Llm {
  public:
    explicit Llm(const LlmOptions & opts);  // throws Error
    ~Llm();
    Llm(const Llm &) = delete;
    Llm & operator=(const Llm &) = delete;

    int n_layers() const;
    int n_embd() const;
    int n_ctx() const;
    int n_main() const;  // the main embedding's width (Qwen3-VL's rows also carry DeepStack slices)
    const defaults::Family & family() const;  // defaults.json's rules of this model's family
    int pixel_factor() const;                 // frame sides are multiples of this (mmproj patch size x merge 2)
    // The layers a reference layer can be: every layer, except in hybrid models (Qwen3.5), whose linear-attention
    // layers have no attention map: there, the full-attention ones.
    const std::vector<int> & attention_layers() const;
    bool hybrid() const;  // some layers are linear attention: no index (their recurrent state cannot be cut back)

    Prompt prompt(const std::string & question) const;
    VisualTokens encode(const Clip & clip, int temporal_patch = 2);

    // Scores of the tokens of `units` (in unit order) at `layer` (in range: select_tokens checks it): the set is
    // scored as a short video of its own.
    // The graph is cut right after layer `layer`'s Q/K (see llm.cpp); the KV cache is cleared before and after.
    std::vector<float> score_set(const VisualTokens & v, const std::vector<int> & units, const Prompt & p, int layer,
                                 Aggregate aggregate);

    // score_set in two halves: index_set runs [prefix + the set's tokens] up to `layer` and keeps its state;
    // score_indexed runs only the question's tokens against it. Same scores as score_set.
    SetIndex index_set(const VisualTokens & v, const std::vector<int> & units, const Prompt & p, int layer);
    std::vector<float> score_indexed(const SetIndex & ix, const VisualTokens & v, const Prompt & p,
                                     Aggregate aggregate);

    // Answer from [prefix + kept tokens (ascending global indices) at their full-video positions + suffix].
    Generation answer(const VisualTokens & v, const std::vector<int> & kept, const Prompt & p,
                      const GenerationOptions & g);

    struct Impl;
  private:
    std::unique_ptr<Impl> impl_;
};

// ---- FlexSelect-Lite ranker through ONNX Runtime (ranker.cpp) ----------------------------------------------------
//
// Expected ONNX model (input and output names are looked up, not assumed), e.g. `flexselect lite-export` of a
// host_embeds ranker:
//   one float32 or float16 input [n_visual, D] or [1, n_visual, D]  the frame set's visual tokens (rows of `embd`,
//                                                                   D = the LLM's n_embd_inp; checked at load)
//   one integer input (int64 or int32) [T] or [1, T]            the question's token ids (Prompt::question)
//   output 0: float32, n_visual elements (any shape)            one score per visual token, higher = keep
// Rankers of the authors' layouts (an input named vision_features) read the vision tower's pre-merger features,
// which llama.cpp does not expose: refused at load with that reason. Sessions use all of ONNX Runtime's graph
// optimizations; built with -DFLEXSELECT_ORT_CUDA=ON (against an ONNX Runtime GPU release) they run on the CUDA
// execution provider. Built without ONNX Runtime (-DFLEXSELECT_WITH_ONNXRUNTIME=OFF), the constructor throws.
class Ranker {
  public:
    Ranker(const std::string & onnx_path, int n_threads);
    ~Ranker();
    Ranker(const Ranker &) = delete;
    Ranker & operator=(const Ranker &) = delete;

    int feature_dim() const;  // D, or -1 if the model leaves it dynamic
    std::vector<float> score(const float * embd, int n_visual, int n_embd, const std::vector<int32_t> & question);

    static bool available();  // built with ONNX Runtime?

    struct Impl;
  private:
    std::unique_ptr<Impl> impl_;
};

// ---- selection over all frame sets (pipeline.cpp) -----------------------------------------------------------------

struct SelectOptions {
    int budget = 0;       // <= 0: the family default (rounded up to whole units, capped at the video's tokens)
    int layer = -1;       // < 0: the family's reference layer, scaled to this model's depth
    int set_frames = 0;   // <= 0: the default (64)
    Aggregate aggregate = Aggregate::max;
};

struct Selection {
    std::vector<int> kept;  // ascending global token indices
    int budget = 0;         // after rounding and capping
    int n_sets = 0;
    int layer = -1;         // -1 when a ranker scored
    int index_built = 0, index_reused = 0;  // sets indexed by this call / reused from an earlier question
    double index_saved_s = 0.0;             // build time of the reused sets: what the index saved
};

// A video's set indexes for one reference layer and prompt prefix, filled as sets are first scored; select_tokens
// rebuilds it when the layer, the sets or the prefix differ, so it is never reused for anything else.
struct VideoIndex {
    int layer = -1;
    std::vector<int32_t> prefix;
    std::vector<SetIndex> sets;  // in frame-set order
    size_t bytes() const;
};

// The family's reference layer, or the layer at the same relative depth for a model of another depth; in a hybrid
// model (candidates: its full-attention layers) the candidate nearest that depth, the shallower on a tie. As
// flexselect.defaults.reference_layer_for; `warning` gets its warning (never measured / another depth), if any.
int reference_layer_for(const defaults::Family & family, int num_layers, const std::vector<int> & candidates,
                        std::string * warning = nullptr);

// The layer to score at: `layer` (>= 0), or the family's default for this model; one clear Error if the model
// cannot be scored there (out of range, or a linear-attention layer: the message lists the valid ones).
int resolve_reference_layer(const Llm & llm, int layer, std::string * warning = nullptr);

// Selection over all frame sets; `ranker` may be null (then the model's reference layer scores). With `index`,
// reference-layer scoring builds each set's index on first use and reuses it for later questions.
Selection select_tokens(Llm & llm, Ranker * ranker, const VisualTokens & v, const Prompt & p,
                        const SelectOptions & opts, VideoIndex * index = nullptr);

}  // namespace flexselect
