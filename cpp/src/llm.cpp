// The Video-LLM through llama.cpp + mtmd: frames -> visual tokens, the scoring pass cut at the reference layer, and
// the answer pass with the kept tokens at their original M-RoPE positions.
#include "flexselect/flexselect.h"
#include "flexselect/defaults_gen.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"
#include "llama.h"
#include "mtmd.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <thread>

namespace flexselect {

namespace {

// ---- logging: llama.cpp/mtmd are quiet unless --verbose; their last errors go into our messages ------------------
struct LogState {
    bool verbose = false;
    std::string last_errors;
};
LogState g_log;

void log_cb(ggml_log_level level, const char * text, void *) {
    if (g_log.verbose) {
        std::fputs(text, stderr);
    }
    if (level == GGML_LOG_LEVEL_ERROR) {
        g_log.last_errors += text;
        if (g_log.last_errors.size() > 2000) g_log.last_errors.erase(0, g_log.last_errors.size() - 2000);
    }
}

std::string take_errors() {
    std::string s;
    s.swap(g_log.last_errors);
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    for (char & c : s) {
        if (c == '\n') c = ';';  // one line: the CLI prints every error as a single line
    }
    return s.empty() ? "" : " (" + s + ")";
}

// ---- RAII for the C handles --------------------------------------------------------------------------------------
struct ModelDel {
    void operator()(llama_model * m) const { llama_model_free(m); }
};
struct CtxDel {
    void operator()(llama_context * c) const { llama_free(c); }
};
struct MtmdDel {
    void operator()(mtmd_context * c) const { mtmd_free(c); }
};
struct BitmapDel {
    void operator()(mtmd_bitmap * b) const { mtmd_bitmap_free(b); }
};
struct ChunksDel {
    void operator()(mtmd_input_chunks * c) const { mtmd_input_chunks_free(c); }
};
struct SamplerDel {
    void operator()(llama_sampler * s) const { llama_sampler_free(s); }
};
struct GgufDel {
    void operator()(gguf_context * g) const { gguf_free(g); }
};

bool file_exists(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    return f.good();
}

// A llama_batch whose arrays live in vectors. Embedding batches carry 4 M-RoPE values per token, section-major
// (llama_batch_init would allocate only one).
struct Batch {
    std::vector<llama_token> tokens;
    std::vector<float> embd;
    std::vector<llama_pos> pos;
    std::vector<int32_t> n_seq_id;
    std::vector<llama_seq_id> seq_storage;
    std::vector<llama_seq_id *> seq_id;
    std::vector<int8_t> logits;

    llama_batch view(int n) {
        n_seq_id.assign(n, 1);
        seq_storage.assign(n, 0);
        seq_id.resize(n + 1);
        for (int i = 0; i < n; ++i) seq_id[i] = &seq_storage[i];
        seq_id[n] = nullptr;
        if ((int) logits.size() != n) logits.assign(n, 0);
        llama_batch b{};
        b.n_tokens = n;
        b.token = tokens.empty() ? nullptr : tokens.data();
        b.embd = embd.empty() ? nullptr : embd.data();
        b.pos = pos.data();
        b.n_seq_id = n_seq_id.data();
        b.seq_id = seq_id.data();
        b.logits = logits.data();
        return b;
    }
};

// The text of a token, however long (llama_token_to_piece returns the negated size it needs when the buffer is small).
std::string piece(const llama_vocab * vocab, llama_token tok) {
    std::string buf(64, '\0');
    int n = llama_token_to_piece(vocab, tok, buf.data(), (int32_t) buf.size(), 0, false);
    if (n < 0) {
        buf.resize(-n);
        n = llama_token_to_piece(vocab, tok, buf.data(), (int32_t) buf.size(), 0, false);
    }
    buf.resize(std::max(n, 0));
    return buf;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// What the eval callback captures during a scoring pass: the post-RoPE K (all tokens) and Q (question tokens) of
// the reference layer. The callback fires once per micro-batch, so rows are appended in token order.
struct Capture {
    bool active = false;
    bool want_q = false;
    bool cut = true;  // stop the graph once this layer's Q/K are in hand (FLEXSELECT_NO_CUT=1 turns it off)
    std::string q_name, k_name;
    bool got_q = false, got_k = false;
    std::vector<float> q, k;  // [rows][heads][head_dim], [rows][kv_heads][head_dim]
    std::vector<uint8_t> scratch;
    int cuts = 0;
    std::string error;
};

static bool is_capture_target(const Capture & c, const ggml_tensor * t, bool & is_q) {
    // Both the pre-RoPE projection and the RoPE output are named "Qcur-L"; we want the RoPE output.
    if (t->op != GGML_OP_ROPE) return false;
    if (c.want_q && c.q_name == t->name) {
        is_q = true;
        return true;
    }
    is_q = false;
    return c.k_name == t->name;
}

static void append_rows(Capture & c, const ggml_tensor * t, std::vector<float> & out) {
    // t: [head_dim, heads, tokens] (ne0 fastest), F32 or F16, possibly on a GPU: copy it to the host first.
    const size_t nbytes = ggml_nbytes(t);
    c.scratch.resize(nbytes);
    ggml_backend_tensor_get(t, c.scratch.data(), 0, nbytes);
    const int64_t d = t->ne[0], h = t->ne[1], n = t->ne[2];
    const size_t base = out.size();
    out.resize(base + (size_t) d * h * n);
    float * dst = out.data() + base;
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < h; ++j) {
            const uint8_t * row = c.scratch.data() + i * t->nb[2] + j * t->nb[1];
            for (int64_t e = 0; e < d; ++e) {
                const uint8_t * p = row + e * t->nb[0];
                float v;
                if (t->type == GGML_TYPE_F32) {
                    std::memcpy(&v, p, sizeof(float));
                } else {
                    ggml_fp16_t hv;
                    std::memcpy(&hv, p, sizeof(hv));
                    v = ggml_fp16_to_fp32(hv);
                }
                *dst++ = v;
            }
        }
    }
}

static bool eval_cb(ggml_tensor * t, bool ask, void * user_data) {
    auto & c = *static_cast<Capture *>(user_data);
    if (!c.active) return false;  // answer pass: observe nothing, the scheduler runs each split in one go
    bool is_q = false;
    if (!is_capture_target(c, t, is_q)) return ask ? false : true;
    if (ask) return true;
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16) {
        c.error = "unexpected tensor type for " + std::string(t->name);
        return true;
    }
    append_rows(c, t, is_q ? c.q : c.k);
    (is_q ? c.got_q : c.got_k) = true;
    if (c.got_k && (!c.want_q || c.got_q)) {
        c.got_q = c.got_k = false;  // the next micro-batch captures again
        if (c.cut) {
            // Returning false ends this graph split (ggml_backend_sched_compute_splits breaks out of its node loop):
            // nothing after layer L is computed. On CPU the whole model is one split; with partial GPU offload the
            // later splits still run but their results are never read.
            ++c.cuts;
            return false;
        }
    }
    return true;
}

struct Llm::Impl {
    LlmOptions opts;
    std::unique_ptr<llama_model, ModelDel> model;
    std::unique_ptr<llama_context, CtxDel> ctx;
    std::unique_ptr<mtmd_context, MtmdDel> mtmd;
    const llama_vocab * vocab = nullptr;
    Capture capture;
    std::string family;              // defaults.json's family, from the mmproj's projector type
    double tokens_per_second = 0.0;  // the family's (defaults.json: GGUFs do not carry it); 0: one step per unit
    const char * prompt_prefix = nullptr;
    const char * prompt_suffix = nullptr;
    int n_embd = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_layer = 0;

    void clear_memory() { llama_memory_clear(llama_get_memory(ctx.get()), true); }

    std::vector<int32_t> tokenize(const std::string & text, bool parse_special) const {
        int n = -llama_tokenize(vocab, text.data(), (int32_t) text.size(), nullptr, 0, false, parse_special);
        std::vector<int32_t> out(std::max(n, 0));
        if (n > 0 &&
            llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), n, false, parse_special) != n) {
            throw Error("could not tokenize the prompt");
        }
        return out;
    }

    void check_fits(int n_tokens, const char * what) const {
        const int n_ctx = (int) llama_n_ctx(ctx.get());
        if (n_tokens > n_ctx) {
            throw Error(std::string(what) + " needs " + std::to_string(n_tokens) + " tokens but the context holds " +
                        std::to_string(n_ctx) + "; use a smaller --budget or fewer --frames (or a larger --ctx-size)");
        }
    }

    // Decode text tokens at the given (1-D, all three dims equal) positions, n_batch at a time.
    void decode_tokens(const std::vector<int32_t> & ids, const std::vector<Pos3> & pos, bool logits_last) {
        const int n_batch = (int) llama_n_batch(ctx.get());
        Batch b;
        for (size_t s = 0; s < ids.size(); s += n_batch) {
            const int n = (int) std::min<size_t>(n_batch, ids.size() - s);
            b.tokens.assign(ids.begin() + s, ids.begin() + s + n);
            b.pos.resize(n);
            for (int i = 0; i < n; ++i) b.pos[i] = pos[s + i].t;  // llama.cpp repeats it into t, y, x (and 0)
            b.logits.assign(n, 0);
            if (logits_last && s + n == ids.size()) b.logits[n - 1] = 1;
            decode(b.view(n));
        }
    }

    // Decode embedding rows (one per position) at explicit M-RoPE positions, n_batch at a time.
    void decode_embd(const std::vector<const float *> & rows, const std::vector<Pos3> & pos) {
        const int n_batch = (int) llama_n_batch(ctx.get());
        Batch b;
        for (size_t s = 0; s < rows.size(); s += n_batch) {
            const int n = (int) std::min<size_t>(n_batch, rows.size() - s);
            b.embd.resize((size_t) n * n_embd);
            for (int i = 0; i < n; ++i) std::memcpy(&b.embd[(size_t) i * n_embd], rows[s + i], sizeof(float) * n_embd);
            const std::vector<Pos3> chunk(pos.begin() + s, pos.begin() + s + n);
            b.pos = mrope_section_major(chunk);  // section-major within this batch
            b.logits.assign(n, 0);
            decode(b.view(n));
        }
    }

    void decode(const llama_batch & b) {
        const int rc = llama_decode(ctx.get(), b);
        if (rc != 0) throw Error("llama_decode failed (" + std::to_string(rc) + ")" + take_errors());
        if (!capture.error.empty()) throw Error(capture.error);
    }
};

static std::once_flag g_backend_once;

Llm::Llm(const LlmOptions & opts) : impl_(std::make_unique<Impl>()) {
    auto & m = *impl_;
    m.opts = opts;
    g_log.verbose = opts.verbose;
    llama_log_set(log_cb, nullptr);
    mtmd_log_set(log_cb, nullptr);
    std::call_once(g_backend_once, [] { llama_backend_init(); });

    if (opts.model_path.empty()) throw Error("no model given: pass -m model.gguf");
    if (!file_exists(opts.model_path)) throw Error("model not found: " + opts.model_path);
    if (opts.mmproj_path.empty()) {
        throw Error("--mmproj is required: the vision projector GGUF that belongs to " + opts.model_path +
                    " (e.g. mmproj.gguf next to it)");
    }
    if (!file_exists(opts.mmproj_path)) throw Error("mmproj not found: " + opts.mmproj_path);

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = opts.n_gpu_layers;
    m.model.reset(llama_model_load_from_file(opts.model_path.c_str(), mp));
    if (!m.model)
        throw Error("cannot load model " + opts.model_path + ": not a valid GGUF language model" + take_errors());

    char arch[64] = {0};
    llama_model_meta_val_str(m.model.get(), "general.architecture", arch, sizeof(arch));
    if (std::string(arch) != "qwen2vl" || llama_model_rope_type(m.model.get()) != LLAMA_ROPE_TYPE_MROPE) {
        throw Error(opts.model_path + " is a '" + arch +
                    "' model; the C++ runtime supports Qwen2.5-VL / Qwen2-VL "
                    "(architecture qwen2vl with M-RoPE)");
    }
    m.vocab = llama_model_get_vocab(m.model.get());
    m.n_embd = llama_model_n_embd_inp(m.model.get());
    m.n_head = llama_model_n_head(m.model.get());
    m.n_head_kv = llama_model_n_head_kv(m.model.get());
    m.n_layer = llama_model_n_layer(m.model.get());
    m.head_dim = llama_model_n_embd(m.model.get()) / std::max(1, m.n_head);

    // The mmproj's own metadata: a clear message for a projector of another model, and the family (its projector
    // type), whose rules (temporal interval, prompt template) come from defaults.json as in the Python backend.
    {
        gguf_init_params gp{true, nullptr};
        std::unique_ptr<gguf_context, GgufDel> g(gguf_init_from_file(opts.mmproj_path.c_str(), gp));
        if (!g) throw Error("cannot load mmproj " + opts.mmproj_path + ": not a valid GGUF file" + take_errors());
        const int64_t kd = gguf_find_key(g.get(), "clip.vision.projection_dim");
        if (kd >= 0 && gguf_get_kv_type(g.get(), kd) == GGUF_TYPE_UINT32) {
            const int proj = (int) gguf_get_val_u32(g.get(), kd);
            if (proj != m.n_embd) {
                throw Error("mmproj " + opts.mmproj_path + " does not belong to " + opts.model_path + ": it produces " +
                            std::to_string(proj) + "-d embeddings, the model takes " + std::to_string(m.n_embd) + "-d");
            }
        }
        const int64_t kp = gguf_find_key(g.get(), "clip.projector_type");
        const std::string projector =
            kp >= 0 && gguf_get_kv_type(g.get(), kp) == GGUF_TYPE_STRING ? gguf_get_val_str(g.get(), kp) : "";
        if (projector == "qwen2.5vl_merger") {
            namespace d = defaults::qwen2_5_vl;
            m.family = d::name, m.tokens_per_second = d::tokens_per_second;
            m.prompt_prefix = d::prompt_prefix, m.prompt_suffix = d::prompt_suffix;
        } else if (projector == "qwen2vl_merger") {
            namespace d = defaults::qwen2_vl;
            m.family = d::name, m.tokens_per_second = d::tokens_per_second;
            m.prompt_prefix = d::prompt_prefix, m.prompt_suffix = d::prompt_suffix;
        } else {
            throw Error("mmproj " + opts.mmproj_path + " is a '" + projector +
                        "' projector; the C++ runtime supports "
                        "Qwen2.5-VL / Qwen2-VL projectors (qwen2.5vl_merger, qwen2vl_merger)");
        }
    }

    // Every hardware thread by default, as the Python backend (os.cpu_count()): the same threads split the same
    // sums, so both runtimes produce the same floats and keep the same tokens.
    const int n_threads = opts.n_threads > 0 ? opts.n_threads : (int) std::max(1u, std::thread::hardware_concurrency());
    mtmd_context_params vp = mtmd_context_params_default();
    vp.use_gpu = opts.n_gpu_layers != 0;
    vp.print_timings = false;
    vp.warmup = false;
    vp.n_threads = n_threads;
    vp.image_min_tokens = 1;  // frames arrive at their final size (target_size): mtmd must never scale them up
    vp.image_max_tokens = 1 << 16;
    m.mtmd.reset(mtmd_init_from_file(opts.mmproj_path.c_str(), m.model.get(), vp));
    if (!m.mtmd) {
        throw Error("cannot load mmproj " + opts.mmproj_path + " for " + opts.model_path + take_errors());
    }
    if (!mtmd_support_vision(m.mtmd.get()) || !mtmd_decode_use_mrope(m.mtmd.get())) {
        throw Error("mmproj " + opts.mmproj_path + " is not a Qwen2-VL / Qwen2.5-VL vision projector");
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = opts.n_ctx;
    cp.n_batch = std::min<uint32_t>(opts.n_batch, opts.n_ctx);
    cp.n_ubatch = std::min<uint32_t>(512, cp.n_batch);
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.no_perf = true;
    if (opts.n_gpu_layers == 0 || !llama_supports_gpu_offload()) {
        // flash attention pays off on GPUs; on CPU it made a 3072-token prefill 2.5x slower (bench/runtimes.py)
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    cp.cb_eval = eval_cb;
    cp.cb_eval_user_data = &m.capture;
    const char * no_cut = std::getenv("FLEXSELECT_NO_CUT");
    m.capture.cut = !(no_cut && *no_cut && std::string(no_cut) != "0");
    m.ctx.reset(llama_init_from_model(m.model.get(), cp));
    if (!m.ctx)
        throw Error("cannot create a llama.cpp context (n_ctx " + std::to_string(opts.n_ctx) + ")" + take_errors());
}

Llm::~Llm() = default;

int Llm::n_layers() const { return impl_->n_layer; }
int Llm::n_embd() const { return impl_->n_embd; }
int Llm::n_ctx() const { return (int) llama_n_ctx(impl_->ctx.get()); }
double Llm::tokens_per_second() const { return impl_->tokens_per_second; }
std::string Llm::family() const { return impl_->family; }

Prompt Llm::prompt(const std::string & question) const {
    // The family's chat template around the video, from defaults.json; the first {question} is replaced, as
    // flexselect.defaults.prompt_text does.
    std::string suffix = impl_->prompt_suffix;
    const std::string marker = "{question}";
    const size_t at = suffix.find(marker);
    if (at != std::string::npos) suffix.replace(at, marker.size(), question);
    Prompt p;
    p.prefix = impl_->tokenize(impl_->prompt_prefix, true);
    p.suffix = impl_->tokenize(suffix, true);
    p.question = impl_->tokenize(question, false);
    if (p.suffix.empty()) throw Error("the prompt after the video is empty");
    return p;
}

VisualTokens Llm::encode(const Clip & clip, int temporal_patch) {
    auto & m = *impl_;
    if (clip.frames.empty()) throw Error("no frames to encode");
    VisualTokens v;
    v.n_embd = m.n_embd;
    v.num_units = (int) ((clip.frames.size() + temporal_patch - 1) / temporal_patch);
    v.interval = time_interval(m.tokens_per_second, temporal_patch, clip.sample_fps);
    for (int u = 0; u < v.num_units; ++u) {
        // Two consecutive frames marked mergeable are paired by mtmd into one temporal patch (Qwen's video
        // encoding); an odd last frame goes alone, which the vision tower treats as the frame repeated, as HF does.
        std::vector<std::unique_ptr<mtmd_bitmap, BitmapDel>> bitmaps;
        std::vector<mtmd_input_part> parts;
        for (int f = u * temporal_patch; f < std::min<int>((u + 1) * temporal_patch, (int) clip.frames.size()); ++f) {
            bitmaps.emplace_back(mtmd_bitmap_init(clip.width, clip.height, clip.frames[f].data()));
            if (!bitmaps.back()) throw Error("cannot create an image for frame " + std::to_string(f));
            mtmd_bitmap_set_mergeable(bitmaps.back().get(), true);
        }
        for (auto & b : bitmaps) parts.push_back(mtmd_input_part{nullptr, b.get()});
        std::vector<const mtmd_input_part *> part_ptrs;
        for (auto & p : parts) part_ptrs.push_back(&p);
        std::unique_ptr<mtmd_input_chunks, ChunksDel> chunks(mtmd_input_chunks_init());
        if (mtmd_tokenize_from_parts(m.mtmd.get(), chunks.get(), part_ptrs.data(), part_ptrs.size(), false) != 0) {
            throw Error("mtmd could not preprocess frame unit " + std::to_string(u) + take_errors());
        }
        const mtmd_input_chunk * image = nullptr;
        int n_images = 0;
        for (size_t i = 0; i < mtmd_input_chunks_size(chunks.get()); ++i) {
            const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks.get(), i);
            if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_IMAGE) {
                image = c;
                ++n_images;
            }
        }
        if (!image || n_images != 1)
            throw Error("mtmd did not merge frame unit " + std::to_string(u) + " into one image");
        const mtmd_image_tokens * it = mtmd_input_chunk_get_tokens_image(image);
        const size_t n_tok = mtmd_input_chunk_get_n_tokens(image);
        const mtmd_decoder_pos last = mtmd_image_tokens_get_decoder_pos(it, 0, n_tok - 1);
        const int rows = (int) last.y + 1, cols = (int) last.x + 1;
        if ((size_t) rows * cols != n_tok) throw Error("unexpected visual token grid from mtmd");
        if (u == 0) {
            v.rows = rows, v.cols = cols;
            v.embd.reserve((size_t) v.num_units * n_tok * v.n_embd);
        } else if (rows != v.rows || cols != v.cols) {
            throw Error("frame units have different token grids");
        }
        if (mtmd_encode_chunk(m.mtmd.get(), image) != 0) {
            throw Error("the vision encoder failed on frame unit " + std::to_string(u) + take_errors());
        }
        const float * e = mtmd_get_output_embd(m.mtmd.get());
        v.embd.insert(v.embd.end(), e, e + n_tok * v.n_embd);
    }
    return v;
}

std::vector<float> Llm::score_set(const VisualTokens & v, const std::vector<int> & units, const Prompt & p, int layer,
                                  Aggregate aggregate) {
    auto & m = *impl_;  // `layer` is in range: select_tokens checks it, once
    const int tpu = v.tokens_per_unit();
    const int P = (int) p.prefix.size(), V = (int) units.size() * tpu, T = (int) p.suffix.size();
    m.check_fits(P + V + T, "a frame set's scoring pass");

    // The set is scored as a short video of its own units (u = 0..len-1) with the full video's interval.
    const auto offsets = video_offsets((int) units.size(), v.rows, v.cols, v.interval);
    const Layout l = layout_positions(P, offsets, video_extent((int) units.size(), v.rows, v.cols, v.interval), T);
    std::vector<const float *> rows;
    for (int u : units) {
        for (int j = 0; j < tpu; ++j) rows.push_back(v.token(u * tpu + j));
    }

    Capture & c = m.capture;
    c.q_name = "Qcur-" + std::to_string(layer);
    c.k_name = "Kcur-" + std::to_string(layer);
    c.q.clear(), c.k.clear(), c.error.clear();
    c.got_q = c.got_k = false;
    m.clear_memory();
    struct Off {  // whatever happens, the capture stops and the cache is cleared for the next pass
        Impl & m;
        ~Off() {
            m.capture.active = false;
            m.clear_memory();
        }
    } off{m};
    c.active = true;
    c.want_q = false;
    m.decode_tokens(p.prefix, l.prefix, false);
    m.decode_embd(rows, l.video);
    c.want_q = true;  // only the question rows' queries are needed
    m.decode_tokens(p.suffix, l.suffix, false);

    const size_t n_keys = (size_t) P + V + T;
    if (c.k.size() != n_keys * m.n_head_kv * m.head_dim || c.q.size() != (size_t) T * m.n_head * m.head_dim) {
        throw Error("the scoring pass did not capture layer " + std::to_string(layer) + "'s Q/K as expected");
    }
    return question_attention_scores(c.q.data(), c.k.data(), T, (int) n_keys, m.n_head, m.n_head_kv, m.head_dim, P,
                                     P + V, aggregate);
}

Generation Llm::answer(const VisualTokens & v, const std::vector<int> & kept, const Prompt & p,
                       const GenerationOptions & g) {
    auto & m = *impl_;
    const auto t0 = std::chrono::steady_clock::now();
    const int P = (int) p.prefix.size(), T = (int) p.suffix.size(), K = (int) kept.size();
    m.check_fits(P + K + T + std::max(0, g.max_new_tokens), "the answer pass");

    // Kept tokens keep their original full-video positions; the text after them its full-video positions.
    const auto full = video_offsets(v.num_units, v.rows, v.cols, v.interval);
    std::vector<Pos3> offsets;
    std::vector<const float *> rows;
    for (int i : kept) {
        if (i < 0 || i >= v.num_tokens()) throw Error("kept token index out of range");
        offsets.push_back(full[i]);
        rows.push_back(v.token(i));
    }
    const Layout l = layout_positions(P, offsets, video_extent(v.num_units, v.rows, v.cols, v.interval), T);

    m.capture.active = false;
    m.clear_memory();
    m.decode_tokens(p.prefix, l.prefix, false);
    m.decode_embd(rows, l.video);
    m.decode_tokens(p.suffix, l.suffix, true);

    std::unique_ptr<llama_sampler, SamplerDel> smpl(llama_sampler_chain_init(llama_sampler_chain_default_params()));
    if (g.temperature > 0.0f) {
        llama_sampler_chain_add(smpl.get(), llama_sampler_init_temp(g.temperature));
        llama_sampler_chain_add(smpl.get(), llama_sampler_init_dist(g.seed));
    } else {
        llama_sampler_chain_add(smpl.get(), llama_sampler_init_greedy());
    }

    Generation out;
    out.prompt_tokens = P + K + T;
    int32_t next = l.next;
    Batch b;
    for (int step = 0; step < g.max_new_tokens; ++step) {
        check_stop();
        const float * lg = llama_get_logits_ith(m.ctx.get(), -1);
        if (std::any_of(lg, lg + llama_vocab_n_tokens(m.vocab), [](float x) { return std::isnan(x); })) {
            throw Error("the next-token logits are not finite (NaN or infinite): the model's weights are damaged; "
                        "re-export or re-download it");
        }
        const llama_token tok = llama_sampler_sample(smpl.get(), m.ctx.get(), -1);
        if (step == 0) out.ttft_s = seconds_since(t0);
        if (llama_vocab_is_eog(m.vocab, tok)) break;
        out.tokens.push_back(tok);
        out.text += piece(m.vocab, tok);
        if (step + 1 == g.max_new_tokens) break;
        b.tokens.assign(1, tok);
        b.pos.assign(1, next++);
        b.logits.assign(1, 1);
        m.decode(b.view(1));
    }
    m.clear_memory();
    return out;
}

// ---- the index: a set's question-independent scoring state, reused by every later question -------------------------
// The prefix and the set's visual tokens come before the question and attention is causal, so their KV cache of
// layers < L and their layer-L keys are the same for every question. index_set runs only them (the pass stops at
// layer L as in score_set) and saves the sequence's KV state; score_indexed restores it and decodes only the
// question's tokens. The scores are score_set's: the same formula over the same keys.
size_t SetIndex::bytes() const { return state.size() + k.size() * sizeof(float); }

SetIndex Llm::index_set(const VisualTokens & v, const std::vector<int> & units, const Prompt & p, int layer) {
    auto & m = *impl_;
    if (layer < 0 || layer >= m.n_layer) {
        throw Error("reference layer " + std::to_string(layer) + " is out of range: this model has layers 0.." +
                    std::to_string(m.n_layer - 1));
    }
    const auto t0 = std::chrono::steady_clock::now();
    const int tpu = v.tokens_per_unit();
    const int P = (int) p.prefix.size(), V = (int) units.size() * tpu, T = (int) p.suffix.size();
    m.check_fits(P + V + T, "a frame set's scoring pass");
    const auto offsets = video_offsets((int) units.size(), v.rows, v.cols, v.interval);
    const Layout l = layout_positions(P, offsets, video_extent((int) units.size(), v.rows, v.cols, v.interval), T);
    std::vector<const float *> rows;
    for (int u : units) {
        for (int j = 0; j < tpu; ++j) rows.push_back(v.token(u * tpu + j));
    }
    Capture & c = m.capture;
    c.q_name = "Qcur-" + std::to_string(layer);
    c.k_name = "Kcur-" + std::to_string(layer);
    c.q.clear(), c.k.clear(), c.error.clear();
    c.got_q = c.got_k = false;
    m.clear_memory();
    struct Off {
        Impl & m;
        ~Off() {
            m.capture.active = false;
            m.clear_memory();
        }
    } off{m};
    c.active = true;
    c.want_q = false;
    m.decode_tokens(p.prefix, l.prefix, false);
    m.decode_embd(rows, l.video);
    if (c.k.size() != (size_t) (P + V) * m.n_head_kv * m.head_dim) {
        throw Error("indexing did not capture layer " + std::to_string(layer) + "'s keys as expected");
    }
    SetIndex ix;
    ix.units = units;
    ix.layer = layer;
    ix.n_context = P + V;
    ix.k.swap(c.k);
    ix.state.resize(llama_state_seq_get_size(m.ctx.get(), 0));
    if (llama_state_seq_get_data(m.ctx.get(), ix.state.data(), ix.state.size(), 0) != ix.state.size()) {
        throw Error("could not save a frame set's KV state" + take_errors());
    }
    ix.build_s = seconds_since(t0);
    return ix;
}

std::vector<float> Llm::score_indexed(const SetIndex & ix, const VisualTokens & v, const Prompt & p,
                                      Aggregate aggregate) {
    auto & m = *impl_;
    const int tpu = v.tokens_per_unit();
    const int P = (int) p.prefix.size(), V = (int) ix.units.size() * tpu, T = (int) p.suffix.size();
    if (P + V != ix.n_context) throw Error("this index was made for another prompt or video");
    m.check_fits(P + V + T, "a frame set's scoring pass");
    const auto offsets = video_offsets((int) ix.units.size(), v.rows, v.cols, v.interval);
    const Layout l = layout_positions(P, offsets, video_extent((int) ix.units.size(), v.rows, v.cols, v.interval), T);

    Capture & c = m.capture;
    c.q_name = "Qcur-" + std::to_string(ix.layer);
    c.k_name = "Kcur-" + std::to_string(ix.layer);
    c.q.clear(), c.k.clear(), c.error.clear();
    c.got_q = c.got_k = false;
    m.clear_memory();
    struct Off {
        Impl & m;
        ~Off() {
            m.capture.active = false;
            m.clear_memory();
        }
    } off{m};
    if (llama_state_seq_set_data(m.ctx.get(), ix.state.data(), ix.state.size(), 0) != ix.state.size()) {
        throw Error("could not restore a frame set's KV state" + take_errors());
    }
    c.active = true;
    c.want_q = true;
    m.decode_tokens(p.suffix, l.suffix, false);
    const size_t kv_row = (size_t) m.n_head_kv * m.head_dim;
    if (c.k.size() != (size_t) T * kv_row || c.q.size() != (size_t) T * m.n_head * m.head_dim) {
        throw Error("the question pass did not capture layer " + std::to_string(ix.layer) + "'s Q/K as expected");
    }
    std::vector<float> keys;
    keys.reserve(ix.k.size() + c.k.size());
    keys.insert(keys.end(), ix.k.begin(), ix.k.end());
    keys.insert(keys.end(), c.k.begin(), c.k.end());
    return question_attention_scores(c.q.data(), keys.data(), T, P + V + T, m.n_head, m.n_head_kv, m.head_dim, P, P + V,
                                     aggregate);
}

}  // namespace flexselect
