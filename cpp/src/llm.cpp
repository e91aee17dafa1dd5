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
#include <map>
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
    const defaults::Family * family = nullptr;  // defaults.json's rules (budget, layer, prompt, fps, frame size)
    bool unit_text = false;                     // Qwen3-VL / Qwen3.5: timestamps as text, positions per unit
    int32_t vision_start = -1, vision_end = -1;
    std::map<std::string, std::vector<int32_t>> labels;  // "<t seconds>" -> its token ids
    std::vector<int> attention_layers;                   // layers with a softmax attention map
    int pixel_factor = 28;
    int n_embd = 0, n_main = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_layer = 0;

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

    int32_t special_id(const char * token) const {
        const auto ids = tokenize(token, true);
        if (ids.size() != 1) {
            throw Error(opts.model_path + "'s vocabulary has no " + token + " token: not a Qwen3-VL / Qwen3.5 GGUF");
        }
        return ids[0];
    }

    // The Qwen3-VL processor's "<t seconds>" (one decimal), as hf/qwen3_vl.py: timestamp_label writes it.
    const std::vector<int32_t> & label(double seconds) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "<%.1f seconds>", seconds);
        auto it = labels.find(buf);
        if (it == labels.end()) it = labels.emplace(buf, tokenize(buf, true)).first;
        return it->second;
    }

    // The scoring pass of a frame set: the set as a short video of its own (Qwen2.5-VL: u = 0..len-1 with the full
    // video's interval; Qwen3-VL: each unit with its own timestamp).
    Sequence scoring_sequence(const VisualTokens & v, const std::vector<int> & units, const Prompt & p) {
        const int tpu = v.tokens_per_unit();
        std::vector<std::vector<int>> per_unit;
        for (int u : units) {
            per_unit.emplace_back(tpu);
            for (int j = 0; j < tpu; ++j) per_unit.back()[j] = u * tpu + j;
        }
        return layout(v, units, per_unit, p, false);
    }

    // The answer pass: the kept tokens (ascending) at their original full-video positions; Qwen3-VL: every unit
    // keeps its timestamp and delimiters, with its kept tokens (possibly none).
    Sequence answer_sequence(const VisualTokens & v, const std::vector<int> & kept, const Prompt & p) {
        std::vector<int> units(v.num_units);
        std::vector<std::vector<int>> per_unit(v.num_units);
        for (int u = 0; u < v.num_units; ++u) units[u] = u;
        for (int i : kept) {
            if (i < 0 || i >= v.num_tokens()) throw Error("kept token index out of range");
            per_unit[i / v.tokens_per_unit()].push_back(i);
        }
        return layout(v, units, per_unit, p, true);
    }

    Sequence layout(const VisualTokens & v, const std::vector<int> & units,
                    const std::vector<std::vector<int>> & per_unit, const Prompt & p, bool full_video) {
        if (unit_text) {
            std::vector<std::vector<int32_t>> unit_labels;
            for (int u : units) unit_labels.push_back(label(v.unit_seconds.at(u)));
            return unit_text_sequence(p.prefix, unit_labels, vision_start, vision_end, per_unit, v.rows, v.cols,
                                      p.suffix);
        }
        const int n_units = full_video ? v.num_units : (int) units.size();
        const auto grid = video_offsets(n_units, v.rows, v.cols, v.interval);
        std::vector<int> tokens;
        std::vector<Pos3> offsets;
        for (size_t i = 0; i < units.size(); ++i) {
            for (int g : per_unit[i]) {
                tokens.push_back(g);
                // the set's own short video (unit i) in a scoring pass, the full video's in the answer pass
                offsets.push_back(grid[full_video ? g : (int) i * v.tokens_per_unit() + g % v.tokens_per_unit()]);
            }
        }
        return video_sequence(p.prefix, tokens, offsets, video_extent(n_units, v.rows, v.cols, v.interval), p.suffix);
    }

    void check_fits(int n_tokens, const char * what) const {
        const int n_ctx = (int) llama_n_ctx(ctx.get());
        if (n_tokens > n_ctx) {
            throw Error(std::string(what) + " needs " + std::to_string(n_tokens) + " tokens but the context holds " +
                        std::to_string(n_ctx) + "; use a smaller --budget or fewer --frames (or a larger --ctx-size)");
        }
    }

    // Decode runs [begin, end) of a sequence, each cut into pieces of at most n_batch; logits for the last token
    // of the last run if asked. `want_q_last`: capture the queries of the last run only (the question's rows).
    void decode_runs(const VisualTokens & v, const Sequence & s, size_t begin, size_t end, bool want_q_last,
                     bool logits_last) {
        for (size_t r = begin; r < end; ++r) {
            capture.want_q = want_q_last && r + 1 == end;
            const Run & run = s.runs[r];
            if (!run.ids.empty()) {
                decode_tokens(run.ids, run.pos, logits_last && r + 1 == end);
            } else {
                std::vector<const float *> rows;
                for (int g : run.tokens) rows.push_back(v.token(g));
                decode_embd(rows, run.pos);
            }
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

    // One stopped pass: capture layer `layer`'s Q/K while decoding runs [begin, end) of `s` (queries of the last
    // run only when `want_q`), after restoring `state` if given. The capture stops and the cache is cleared
    // afterwards unless `keep` (index_set reads the state first); either way, whatever happens, the capture stops.
    void capture_pass(const VisualTokens & v, const Sequence & s, size_t begin, size_t end, int layer, bool want_q,
                      const std::vector<uint8_t> * state) {
        Capture & c = capture;
        c.q_name = "Qcur-" + std::to_string(layer);
        c.k_name = "Kcur-" + std::to_string(layer);
        c.q.clear(), c.k.clear(), c.error.clear();
        c.got_q = c.got_k = false;
        clear_memory();
        if (state != nullptr && llama_state_seq_set_data(ctx.get(), state->data(), state->size(), 0) != state->size()) {
            throw Error("could not restore a frame set's KV state" + take_errors());
        }
        struct Off {
            Capture & c;
            ~Off() { c.active = false; }
        } off{c};
        c.active = true;
        decode_runs(v, s, begin, end, want_q, false);
    }

    std::vector<float> scores(const float * keys, int n_keys, int n_rows, const std::vector<int> & columns, int layer,
                              Aggregate aggregate) const {
        if (capture.q.size() != (size_t) n_rows * n_head * head_dim) {
            throw Error("the scoring pass did not capture layer " + std::to_string(layer) + "'s Q/K as expected");
        }
        return question_attention_scores(capture.q.data(), keys, n_rows, n_keys, n_head, n_head_kv, head_dim, columns,
                                         aggregate);
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

    // The text architecture decides the layout (as the Python backend's QWEN3_ARCHS); the family's rules come from
    // defaults.json.
    static const std::map<std::string, const char *> kUnitTextArchs = {
        {"qwen3vl", "qwen3_vl"}, {"qwen3vlmoe", "qwen3_vl_moe"}, {"qwen35", "qwen3_5"}, {"qwen35moe", "qwen3_5_moe"}};
    char arch_buf[64] = {0};
    llama_model_meta_val_str(m.model.get(), "general.architecture", arch_buf, sizeof(arch_buf));
    const std::string arch = arch_buf;
    const auto unit_text = kUnitTextArchs.find(arch);
    m.unit_text = unit_text != kUnitTextArchs.end();
    const int rope = llama_model_rope_type(m.model.get());
    if (!(arch == "qwen2vl" && rope == LLAMA_ROPE_TYPE_MROPE) &&
        !(m.unit_text && (rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE))) {
        throw Error(opts.model_path + " is a '" + arch +
                    "' model; the C++ runtime supports Qwen2.5-VL / Qwen2-VL (qwen2vl), Qwen3-VL (qwen3vl, "
                    "qwen3vlmoe) and Qwen3.5 (qwen35, qwen35moe) GGUFs");
    }
    m.vocab = llama_model_get_vocab(m.model.get());
    m.n_embd = llama_model_n_embd_inp(m.model.get());  // mtmd's rows: main embedding + DeepStack slices (Qwen3-VL)
    m.n_main = llama_model_n_embd(m.model.get());
    m.n_head = llama_model_n_head(m.model.get());
    m.n_head_kv = llama_model_n_head_kv(m.model.get());
    m.n_layer = llama_model_n_layer(m.model.get());
    m.head_dim = m.n_main / std::max(1, m.n_head);
    {
        char buf[32] = {0};
        const std::string key = arch + ".attention.key_length";  // Qwen3: head_dim is not n_embd / n_head
        if (llama_model_meta_val_str(m.model.get(), key.c_str(), buf, sizeof(buf)) > 0) m.head_dim = std::atoi(buf);
    }

    // The model file's own metadata, which llama.h does not expose: the DeepStack levels (Qwen3-VL) and which
    // layers are linear attention (Qwen3.5: `{arch}.attention.recurrent_layers`, one flag per layer).
    gguf_init_params gp{true, nullptr};
    int text_deepstack = 0;
    {
        std::unique_ptr<gguf_context, GgufDel> g(gguf_init_from_file(opts.model_path.c_str(), gp));
        if (!g) throw Error("cannot read the metadata of " + opts.model_path + take_errors());
        const int64_t kd = gguf_find_key(g.get(), (arch + ".n_deepstack_layers").c_str());
        if (kd >= 0 && gguf_get_kv_type(g.get(), kd) == GGUF_TYPE_UINT32)
            text_deepstack = gguf_get_val_u32(g.get(), kd);
        const int64_t kr = gguf_find_key(g.get(), (arch + ".attention.recurrent_layers").c_str());
        std::vector<bool> recurrent(m.n_layer, false);
        if (kr >= 0 && gguf_get_kv_type(g.get(), kr) == GGUF_TYPE_ARRAY &&
            gguf_get_arr_type(g.get(), kr) == GGUF_TYPE_BOOL) {
            const auto * flags = static_cast<const int8_t *>(gguf_get_arr_data(g.get(), kr));
            for (size_t i = 0; i < gguf_get_arr_n(g.get(), kr) && (int) i < m.n_layer; ++i) recurrent[i] = flags[i];
        }
        for (int i = 0; i < m.n_layer; ++i) {
            if (!recurrent[i]) m.attention_layers.push_back(i);
        }
    }

    // The mmproj's own metadata: a clear message for a projector of another model, and the family (its projector
    // type; Qwen3: the text architecture), whose rules come from defaults.json as in the Python backend.
    {
        std::unique_ptr<gguf_context, GgufDel> g(gguf_init_from_file(opts.mmproj_path.c_str(), gp));
        if (!g) throw Error("cannot load mmproj " + opts.mmproj_path + ": not a valid GGUF file" + take_errors());
        const int64_t kd = gguf_find_key(g.get(), "clip.vision.projection_dim");
        if (kd >= 0 && gguf_get_kv_type(g.get(), kd) == GGUF_TYPE_UINT32) {
            const int proj = (int) gguf_get_val_u32(g.get(), kd);
            if (proj != m.n_main) {
                throw Error("mmproj " + opts.mmproj_path + " does not belong to " + opts.model_path + ": it produces " +
                            std::to_string(proj) + "-d embeddings, the model takes " + std::to_string(m.n_main) + "-d");
            }
        }
        const int64_t kp = gguf_find_key(g.get(), "clip.projector_type");
        const std::string projector =
            kp >= 0 && gguf_get_kv_type(g.get(), kp) == GGUF_TYPE_STRING ? gguf_get_val_str(g.get(), kp) : "";
        const int64_t ks = gguf_find_key(g.get(), "clip.vision.patch_size");
        if (ks >= 0 && gguf_get_kv_type(g.get(), ks) == GGUF_TYPE_UINT32) {
            m.pixel_factor = 2 * (int) gguf_get_val_u32(g.get(), ks);  // Qwen's 2 x 2 spatial merge
        }
        const char * family = nullptr;
        if (m.unit_text) {
            if (projector != "qwen3vl_merger") {
                throw Error("mmproj " + opts.mmproj_path + " is a '" + projector + "' projector, but " +
                            opts.model_path + " is a '" + arch +
                            "' model, which takes a 'qwen3vl_merger' one: pass the mmproj of this model");
            }
            int proj_deepstack = 0;
            const int64_t kf = gguf_find_key(g.get(), "clip.vision.is_deepstack_layers");
            if (kf >= 0 && gguf_get_kv_type(g.get(), kf) == GGUF_TYPE_ARRAY &&
                gguf_get_arr_type(g.get(), kf) == GGUF_TYPE_BOOL) {
                const auto * flags = static_cast<const int8_t *>(gguf_get_arr_data(g.get(), kf));
                for (size_t i = 0; i < gguf_get_arr_n(g.get(), kf); ++i) proj_deepstack += flags[i] != 0;
            }
            if (proj_deepstack != text_deepstack || m.n_embd != m.n_main * (1 + text_deepstack)) {
                throw Error("mmproj " + opts.mmproj_path + " does not belong to " + opts.model_path + ": it gives " +
                            std::to_string(proj_deepstack) + " DeepStack levels, the model takes " +
                            std::to_string(text_deepstack));
            }
            family = unit_text->second;
        } else if (projector == "qwen2.5vl_merger") {
            family = "qwen2_5_vl";
        } else if (projector == "qwen2vl_merger") {
            family = "qwen2_vl";
        } else {
            throw Error("mmproj " + opts.mmproj_path + " is a '" + projector + "' projector; a '" + arch +
                        "' model takes a Qwen2.5-VL / Qwen2-VL one (qwen2.5vl_merger, qwen2vl_merger)");
        }
        m.family = defaults::find_family(family);
        if (m.family == nullptr) throw Error(std::string("defaults.json has no family ") + family);
    }
    if (m.unit_text) {
        m.vision_start = m.special_id("<|vision_start|>");
        m.vision_end = m.special_id("<|vision_end|>");
    }

    // Every hardware thread by default, as the Python backend (os.cpu_count()): the same threads split the same
    // sums, so both runtimes produce the same floats and keep the same tokens.
    const int n_threads = opts.n_threads > 0 ? opts.n_threads : (int) std::max(1u, std::thread::hardware_concurrency());
    mtmd_context_params vp = mtmd_context_params_default();
    vp.use_gpu = opts.n_gpu_layers != 0;
    vp.print_timings = false;
    vp.warmup = false;
    vp.image_min_tokens = 1;  // never let mtmd resize: frames arrive at their final size (as the Python backend)
    vp.image_max_tokens = 1 << 16;
    vp.n_threads = n_threads;
    vp.image_min_tokens = 1;  // frames arrive at their final size (target_size): mtmd must never scale them up
    vp.image_max_tokens = 1 << 16;
    m.mtmd.reset(mtmd_init_from_file(opts.mmproj_path.c_str(), m.model.get(), vp));
    if (!m.mtmd) {
        throw Error("cannot load mmproj " + opts.mmproj_path + " for " + opts.model_path + take_errors());
    }
    if (!mtmd_support_vision(m.mtmd.get()) || !mtmd_decode_use_mrope(m.mtmd.get())) {
        throw Error("mmproj " + opts.mmproj_path + " is not a Qwen vision projector with M-RoPE");
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = opts.n_ctx;
    cp.n_batch = std::min<uint32_t>(opts.n_batch, opts.n_ctx);
    cp.n_ubatch = std::min<uint32_t>(512, cp.n_batch);
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.no_perf = true;
    if (opts.kv_f32) cp.type_k = cp.type_v = GGML_TYPE_F32;
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
int Llm::n_main() const { return impl_->n_main; }
int Llm::n_ctx() const { return (int) llama_n_ctx(impl_->ctx.get()); }
const defaults::Family & Llm::family() const { return *impl_->family; }
int Llm::pixel_factor() const { return impl_->pixel_factor; }
const std::vector<int> & Llm::attention_layers() const { return impl_->attention_layers; }
bool Llm::hybrid() const { return (int) impl_->attention_layers.size() < impl_->n_layer; }

Prompt Llm::prompt(const std::string & question) const {
    // The family's chat template around the video, from defaults.json; the first {question} is replaced, as
    // flexselect.defaults.prompt_text does.
    std::string suffix = impl_->family->prompt_suffix;
    const std::string marker = "{question}";
    const size_t at = suffix.find(marker);
    if (at != std::string::npos) suffix.replace(at, marker.size(), question);
    Prompt p;
    p.prefix = impl_->tokenize(impl_->family->prompt_prefix, true);
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
    v.n_main = m.n_main;
    v.num_units = (int) ((clip.frames.size() + temporal_patch - 1) / temporal_patch);
    v.interval = time_interval(m.family->tokens_per_second, temporal_patch, clip.sample_fps);
    if (clip.timestamps.size() != clip.frames.size()) throw Error("every frame needs its timestamp");
    for (int u = 0; u < v.num_units; ++u) {
        // as hf/qwen3_vl.py: unit_seconds: the mean of the unit's first and last frame (a short last unit repeats
        // its last frame)
        const size_t first = (size_t) u * temporal_patch;
        const size_t last = std::min(first + temporal_patch, clip.timestamps.size()) - 1;
        v.unit_seconds.push_back((clip.timestamps[first] + clip.timestamps[last]) / 2);
    }
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
    auto & m = *impl_;  // `layer` is valid: select_tokens checks it, once
    const Sequence s = m.scoring_sequence(v, units, p);
    const int n = s.size(), T = (int) p.suffix.size();
    m.check_fits(n, "a frame set's scoring pass");
    struct Clear {  // the cache is cleared for the next pass, whatever happens
        Impl & m;
        ~Clear() { m.clear_memory(); }
    } clear{m};
    m.capture_pass(v, s, 0, s.runs.size(), layer, true, nullptr);
    if (m.capture.k.size() != (size_t) n * m.n_head_kv * m.head_dim) {
        throw Error("the scoring pass did not capture layer " + std::to_string(layer) + "'s keys as expected");
    }
    return m.scores(m.capture.k.data(), n, T, s.columns, layer, aggregate);
}

Generation Llm::answer(const VisualTokens & v, const std::vector<int> & kept, const Prompt & p,
                       const GenerationOptions & g) {
    auto & m = *impl_;
    const auto t0 = std::chrono::steady_clock::now();
    const Sequence s = m.answer_sequence(v, kept, p);
    m.check_fits(s.size() + std::max(0, g.max_new_tokens), "the answer pass");

    m.capture.active = false;
    m.clear_memory();
    m.decode_runs(v, s, 0, s.runs.size(), false, true);

    std::unique_ptr<llama_sampler, SamplerDel> smpl(llama_sampler_chain_init(llama_sampler_chain_default_params()));
    if (g.temperature > 0.0f) {
        llama_sampler_chain_add(smpl.get(), llama_sampler_init_temp(g.temperature));
        llama_sampler_chain_add(smpl.get(), llama_sampler_init_dist(g.seed));
    } else {
        llama_sampler_chain_add(smpl.get(), llama_sampler_init_greedy());
    }

    Generation out;
    out.prompt_tokens = s.size();
    int32_t next = s.next;
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
// Everything before the suffix (the prefix, the set's visual tokens and, for Qwen3-VL, their timestamp texts) comes
// before the question and attention is causal, so its KV cache of layers < L and its layer-L keys are the same for
// every question. index_set runs only that (the pass stops at layer L as in score_set) and saves the sequence's KV
// state; score_indexed restores it and decodes only the suffix. The scores are score_set's: the same formula over the
// same keys. Not for hybrid models (Qwen3.5): the linear-attention layers' recurrent state is not cut per token.
size_t SetIndex::bytes() const { return state.size() + k.size() * sizeof(float); }

SetIndex Llm::index_set(const VisualTokens & v, const std::vector<int> & units, const Prompt & p, int layer) {
    auto & m = *impl_;
    if (layer < 0 || layer >= m.n_layer) {
        throw Error("reference layer " + std::to_string(layer) + " is out of range: this model has layers 0.." +
                    std::to_string(m.n_layer - 1));
    }
    if (hybrid()) throw Error("a hybrid (linear-attention) model cannot index a video");
    const auto t0 = std::chrono::steady_clock::now();
    const Sequence s = m.scoring_sequence(v, units, p);
    const int n_context = s.size() - (int) s.runs.back().pos.size();
    m.check_fits(s.size(), "a frame set's scoring pass");
    struct Clear {
        Impl & m;
        ~Clear() { m.clear_memory(); }
    } clear{m};
    m.capture_pass(v, s, 0, s.runs.size() - 1, layer, false, nullptr);
    if (m.capture.k.size() != (size_t) n_context * m.n_head_kv * m.head_dim) {
        throw Error("indexing did not capture layer " + std::to_string(layer) + "'s keys as expected");
    }
    SetIndex ix;
    ix.units = units;
    ix.layer = layer;
    ix.n_context = n_context;
    ix.k.swap(m.capture.k);
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
    const Sequence s = m.scoring_sequence(v, ix.units, p);
    const int n = s.size(), T = (int) p.suffix.size();
    if (n - T != ix.n_context) throw Error("this index was made for another prompt or video");
    m.check_fits(n, "a frame set's scoring pass");
    struct Clear {
        Impl & m;
        ~Clear() { m.clear_memory(); }
    } clear{m};
    m.capture_pass(v, s, s.runs.size() - 1, s.runs.size(), ix.layer, true, &ix.state);
    if (m.capture.k.size() != (size_t) T * m.n_head_kv * m.head_dim) {
        throw Error("the question pass did not capture layer " + std::to_string(ix.layer) + "'s keys as expected");
    }
    std::vector<float> keys;
    keys.reserve(ix.k.size() + m.capture.k.size());
    keys.insert(keys.end(), ix.k.begin(), ix.k.end());
    keys.insert(keys.end(), m.capture.k.begin(), m.capture.k.end());
    return m.scores(keys.data(), n, T, s.columns, ix.layer, aggregate);
}

}  // namespace flexselect
