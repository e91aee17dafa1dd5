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

int reference_layer_for(int num_layers) {
    namespace d = defaults::qwen2_5_vl;
    if (num_layers == d::num_layers) return d::reference_layer;
    // the same relative depth (Python's round(): ties to even), at least 1, at most the last layer
    const int layer = (int) std::nearbyint((double) d::reference_layer * num_layers / d::num_layers);
    return std::min(num_layers - 1, std::max(1, layer));
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
    if (ranker == nullptr) {
        sel.layer = opts.layer >= 0 ? opts.layer : reference_layer_for(llm.n_layers());
        if (sel.layer >= llm.n_layers()) {  // the one range check: Llm::score_set trusts it
            throw Error("reference layer " + std::to_string(sel.layer) + " is out of range: this model has layers 0.." +
                        std::to_string(llm.n_layers() - 1));
        }
    }
    if (opts.budget <= 0) {
        sel.budget = std::min(round_budget(defaults::qwen2_5_vl::budget, tpu), total);
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
    if (ranker != nullptr) index = nullptr;  // a ranker's pass has no question-independent half to keep
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
            std::vector<float> embd;
            embd.reserve(tokens.size() * (size_t) v.n_embd);
            for (int t : tokens) embd.insert(embd.end(), v.token(t), v.token(t) + v.n_embd);
            scores = ranker->score(embd.data(), (int) tokens.size(), v.n_embd, p.question);
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
