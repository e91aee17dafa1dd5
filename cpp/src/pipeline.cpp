// Selection over all frame sets: who scores (the model's reference layer or a Lite ranker) is the only difference.
// Mirrors FlexSelect.select in python/flexselect/pipeline.py.
#include "flexselect/flexselect.h"
#include "flexselect/defaults_gen.h"

#include <algorithm>
#include <atomic>
#include <cmath>

namespace flexselect {

static std::atomic<bool> stop{false};  // lock-free: safe to set from a signal handler
void request_stop() { stop = true; }
bool stop_requested() { return stop; }
void check_stop() {
    if (stop) throw Interrupted();
}

int reference_layer_for(const defaults::Family & d, int num_layers, const std::vector<int> & candidates,
                        std::string * warning) {
    const double depth = (double) d.reference_layer * num_layers / d.num_layers;
    int layer = d.reference_layer;
    // the same relative depth (Python's round(): ties to even), at least 1, at most the last layer
    if (num_layers != d.num_layers) layer = std::min(num_layers - 1, std::max(1, (int) std::nearbyint(depth)));
    const bool hybrid = !candidates.empty() && (int) candidates.size() < num_layers;
    if (hybrid && std::find(candidates.begin(), candidates.end(), layer) == candidates.end()) {
        layer = *std::min_element(candidates.begin(), candidates.end(), [&](int a, int b) {
            const double da = std::fabs(a - depth), db = std::fabs(b - depth);
            return da != db ? da < db : a < b;
        });
    }
    if (warning == nullptr) return layer;
    char buf[512];
    if (!d.reference_layer_measured) {  // the words of flexselect.defaults.reference_layer_for
        std::snprintf(buf, sizeof buf,
                      "%s: reference layer %d of %d was never measured (the paper covers no such model): it is the %s "
                      "Qwen2.5-VL's relative depth (20 of 28). Run `flexselect layer-scan --model ...` to measure the "
                      "best one and pass it as --layer.",
                      d.name, layer, num_layers, hybrid ? "full-attention layer nearest" : "layer at");
        *warning = buf;
    } else if (num_layers != d.num_layers) {
        std::snprintf(buf, sizeof buf,
                      "%s: the paper's reference layer %d is for %d layers; this model has %d, using layer %d (same "
                      "relative depth). Run `flexselect layer-scan` to measure the best one.",
                      d.name, d.reference_layer, d.num_layers, num_layers, layer);
        *warning = buf;
    }
    return layer;
}

int resolve_reference_layer(const Llm & llm, int layer, std::string * warning) {
    const auto & valid = llm.attention_layers();
    if (layer < 0) layer = reference_layer_for(llm.family(), llm.n_layers(), valid, warning);
    if (layer >= llm.n_layers()) {
        throw Error("reference layer " + std::to_string(layer) + " is out of range: this model has layers 0.." +
                    std::to_string(llm.n_layers() - 1));
    }
    if (std::find(valid.begin(), valid.end(), layer) == valid.end()) {
        std::string list;
        for (int l : valid) list += (list.empty() ? "" : ", ") + std::to_string(l);
        throw Error("reference layer " + std::to_string(layer) +
                    " is a linear-attention layer, which has no attention map to score; this model's full-attention "
                    "layers are " +
                    list + ": pass one of them as --layer");
    }
    return layer;
}

size_t VideoIndex::bytes() const {
    size_t n = 0;
    for (const auto & s : sets) n += s.bytes();
    return n;
}

Selection select_tokens(Llm & llm, Ranker * ranker, const VisualTokens & v, const Prompt & p,
                        const SelectOptions & opts, VideoIndex * index) {
    Selection sel;
    const int total = v.num_tokens(), tpu = v.tokens_per_unit();
    if (ranker == nullptr) sel.layer = resolve_reference_layer(llm, opts.layer);  // Llm::score_set trusts it
    if (opts.budget <= 0) {
        sel.budget = std::min(round_budget(llm.family().budget, tpu), total);
    } else if (opts.budget > total) {
        throw Error("the budget of " + std::to_string(opts.budget) + " tokens is larger than the video's " +
                    std::to_string(total) + " visual tokens (" + std::to_string(v.num_units) + " frames x " +
                    std::to_string(tpu) + "); use a smaller --budget or sample more frames");
    } else {
        sel.budget = std::min(round_budget(opts.budget, tpu), total);
    }
    const auto sets = frame_sets(v.num_units, opts.set_frames > 0 ? opts.set_frames : defaults::set_frames);
    sel.n_sets = (int) sets.size();
    std::vector<int> sizes;
    for (const auto & s : sets) sizes.push_back((int) s.size() * tpu);
    const auto shares = split_budget(sel.budget, sizes);
    // a ranker's pass has no question-independent half to keep; a hybrid model's recurrent state cannot be cut back
    if (ranker != nullptr || llm.hybrid()) index = nullptr;
    if (index != nullptr &&
        (index->layer != sel.layer || index->sets.size() != sets.size() || index->prefix != p.prefix)) {
        *index = VideoIndex{};  // made for another layer, set size or prompt: never reused
        index->layer = sel.layer;
        index->prefix = p.prefix;
        index->sets.resize(sets.size());
    }

    for (size_t g = 0; g < sets.size(); ++g) {
        std::vector<int> tokens;  // global indices of the set's tokens, unit by unit
        for (int u : sets[g]) {
            for (int j = 0; j < tpu; ++j) tokens.push_back(u * tpu + j);
        }
        if (shares[g] >= (int) tokens.size()) {  // the whole set fits: no scoring pass needed
            sel.kept.insert(sel.kept.end(), tokens.begin(), tokens.end());
            continue;
        }
        if (shares[g] == 0) continue;
        std::vector<float> scores;
        if (ranker != nullptr) {
            std::vector<float> embd;  // the main embedding of each token (Qwen3-VL: without the DeepStack slices)
            embd.reserve(tokens.size() * (size_t) v.n_main);
            for (int t : tokens) embd.insert(embd.end(), v.token(t), v.token(t) + v.n_main);
            scores = ranker->score(embd.data(), (int) tokens.size(), v.n_main, p.question);
        } else if (index != nullptr) {
            SetIndex & ix = index->sets[g];
            if (ix.units != sets[g]) {
                ix = llm.index_set(v, sets[g], p, sel.layer);
                ++sel.index_built;
            } else {
                ++sel.index_reused;
                sel.index_saved_s += ix.build_s;
            }
            scores = llm.score_indexed(ix, v, p, opts.aggregate);
        } else {
            scores = llm.score_set(v, sets[g], p, sel.layer, opts.aggregate);
        }
        check_stop();
        if (std::any_of(scores.begin(), scores.end(), [](float x) { return !std::isfinite(x); })) {
            throw Error(
                std::string(ranker ? "the ranker's scores" : "the attention scores") +
                " are not finite (NaN or infinite): the model's weights are damaged; re-export or re-download it");
        }
        for (int i : top_k(scores, shares[g])) sel.kept.push_back(tokens[i]);
    }
    std::sort(sel.kept.begin(), sel.kept.end());
    return sel;
}

}  // namespace flexselect
