// FlexSelect-Lite ranker through ONNX Runtime's C API. The model's I/O is looked up, not assumed (see the header):
// one float input (the set's visual tokens), one integer input (the question's token ids), output 0 = scores.
// Built with FLEXSELECT_ORT_CUDA (an ONNX Runtime GPU release), sessions run on the CUDA execution provider.
#include "flexselect/flexselect.h"

#ifdef FLEXSELECT_WITH_ONNXRUNTIME

#include <onnxruntime_c_api.h>

#include <cmath>
#include <cstring>

namespace flexselect {

namespace {

const OrtApi & ort() {
    // Ask for the API version of the headers we compiled with; a newer runtime still serves it.
    static const OrtApi * api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
    if (!api)
        throw Error("the ONNX Runtime library is older than its headers (API " + std::to_string(ORT_API_VERSION) + ")");
    return *api;
}

void check(OrtStatus * st, const std::string & what) {
    if (!st) return;
    std::string msg = ort().GetErrorMessage(st);
    ort().ReleaseStatus(st);
    throw Error(what + ": " + msg);
}

template <typename T, void (*Release)(T *)> struct Handle {
    T * p = nullptr;
    Handle() = default;
    Handle(const Handle &) = delete;
    Handle & operator=(const Handle &) = delete;
    ~Handle() {
        if (p) Release(p);
    }
};
void rel_env(OrtEnv * p) { ort().ReleaseEnv(p); }
void rel_session(OrtSession * p) { ort().ReleaseSession(p); }
void rel_options(OrtSessionOptions * p) { ort().ReleaseSessionOptions(p); }
void rel_meminfo(OrtMemoryInfo * p) { ort().ReleaseMemoryInfo(p); }
void rel_value(OrtValue * p) { ort().ReleaseValue(p); }
void rel_typeinfo(OrtTypeInfo * p) { ort().ReleaseTypeInfo(p); }
void rel_shape(OrtTensorTypeAndShapeInfo * p) { ort().ReleaseTensorTypeAndShapeInfo(p); }
#ifdef FLEXSELECT_ORT_CUDA
void rel_cuda(OrtCUDAProviderOptionsV2 * p) { ort().ReleaseCUDAProviderOptions(p); }
#endif

// IEEE half from float, round to nearest even: graphs exported for CUDA (lite-export --target cuda) take float16.
uint16_t to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return (uint16_t) (sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));  // inf / nan
    if (x >= 0x477ff000u) return (uint16_t) (sign | 0x7c00u);                                    // overflow
    if (x < 0x38800000u) {                                                                       // subnormal
        const float m = std::ldexp(std::fabs(f), 24);
        return (uint16_t) (sign | (uint32_t) std::nearbyint(m));
    }
    const uint32_t mant = x & 0x7fffffu, exp = (x >> 23) - 112;
    uint32_t h = (exp << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return (uint16_t) (sign | h);
}

struct IoInfo {
    std::string name;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> dims;
};

IoInfo describe(OrtSession * s, size_t i, bool input, OrtAllocator * alloc) {
    IoInfo io;
    char * name = nullptr;
    check(input ? ort().SessionGetInputName(s, i, alloc, &name) : ort().SessionGetOutputName(s, i, alloc, &name),
          "ranker: reading I/O names");
    io.name = name;
    check(ort().AllocatorFree(alloc, name), "ranker");
    Handle<OrtTypeInfo, rel_typeinfo> ti;
    check(input ? ort().SessionGetInputTypeInfo(s, i, &ti.p) : ort().SessionGetOutputTypeInfo(s, i, &ti.p), "ranker");
    const OrtTensorTypeAndShapeInfo * tsi = nullptr;
    check(ort().CastTypeInfoToTensorInfo(ti.p, &tsi), "ranker");
    if (!tsi) throw Error("ranker: I/O '" + io.name + "' is not a tensor");
    check(ort().GetTensorElementType(tsi, &io.type), "ranker");
    size_t rank = 0;
    check(ort().GetDimensionsCount(tsi, &rank), "ranker");
    io.dims.resize(rank);
    check(ort().GetDimensions(tsi, io.dims.data(), rank), "ranker");
    return io;
}

}  // namespace

struct Ranker::Impl {
    Handle<OrtEnv, rel_env> env;
    Handle<OrtSession, rel_session> session;
    IoInfo features, ids, scores;
};

bool Ranker::available() { return true; }

Ranker::Ranker(const std::string & path, int n_threads) : impl_(std::make_unique<Impl>()) {
    auto & m = *impl_;
    check(ort().CreateEnv(ORT_LOGGING_LEVEL_ERROR, "flexselect", &m.env.p), "ranker: ONNX Runtime");
    Handle<OrtSessionOptions, rel_options> so;
    check(ort().CreateSessionOptions(&so.p), "ranker");
    if (n_threads > 0) check(ort().SetIntraOpNumThreads(so.p, n_threads), "ranker");
    check(ort().SetSessionGraphOptimizationLevel(so.p, ORT_ENABLE_ALL), "ranker");
#ifdef FLEXSELECT_ORT_CUDA
    {
        Handle<OrtCUDAProviderOptionsV2, rel_cuda> cuda;
        check(ort().CreateCUDAProviderOptions(&cuda.p), "ranker: CUDA execution provider");
        check(ort().SessionOptionsAppendExecutionProvider_CUDA_V2(so.p, cuda.p),
              "ranker: this ONNX Runtime has no CUDA execution provider (built with FLEXSELECT_ORT_CUDA; use an "
              "ONNX Runtime GPU release)");
    }
#endif
    check(ort().CreateSession(m.env.p, path.c_str(), so.p, &m.session.p), "cannot load ranker " + path);

    OrtAllocator * alloc = nullptr;
    check(ort().GetAllocatorWithDefaultOptions(&alloc), "ranker");
    size_t n_in = 0, n_out = 0;
    check(ort().SessionGetInputCount(m.session.p, &n_in), "ranker");
    check(ort().SessionGetOutputCount(m.session.p, &n_out), "ranker");
    for (size_t i = 0; i < n_in; ++i) {
        IoInfo io = describe(m.session.p, i, true, alloc);
        if (io.name == "vision_features") {
            throw Error("ranker " + path +
                        " reads the vision tower's pre-merger features (the authors' layout), "
                        "which llama.cpp gives no access to: the C++ runtime runs host_embeds rankers (flexselect "
                        "lite-teacher --layout host_embeds, lite-train, lite-export)");
        }
        const bool is_float =
            io.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || io.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
        const bool is_int =
            io.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || io.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
        if (is_float && m.features.name.empty() && (io.dims.size() == 2 || io.dims.size() == 3)) {
            m.features = io;
        } else if (is_int && m.ids.name.empty() && (io.dims.size() == 1 || io.dims.size() == 2)) {
            m.ids = io;
        } else {
            throw Error("ranker " + path + ": unexpected input '" + io.name +
                        "' (expected one float [n, D] or "
                        "[1, n, D] input for visual tokens and one integer [T] or [1, T] input for question ids)");
        }
    }
    if (m.features.name.empty() || m.ids.name.empty() || n_out < 1) {
        throw Error("ranker " + path +
                    " needs a float visual-token input, an integer question-id input and a "
                    "score output");
    }
    m.scores = describe(m.session.p, 0, false, alloc);
    if (m.scores.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw Error("ranker " + path + ": output 0 must be float");
}

Ranker::~Ranker() = default;

int Ranker::feature_dim() const {
    const auto & d = impl_->features.dims;
    return d.back() > 0 ? (int) d.back() : -1;
}

std::vector<float> Ranker::score(const float * embd, int n_visual, int n_embd, const std::vector<int32_t> & question) {
    auto & m = *impl_;
    if (feature_dim() > 0 && feature_dim() != n_embd) {
        throw Error("the ranker takes " + std::to_string(feature_dim()) + "-d visual tokens but this model's are " +
                    std::to_string(n_embd) + "-d: the ranker was made for another model");
    }
    if (question.empty()) throw Error("the ranker needs a non-empty question");
    Handle<OrtMemoryInfo, rel_meminfo> mem;
    check(ort().CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem.p), "ranker");

    std::vector<int64_t> fshape = {n_visual, n_embd};
    if (m.features.dims.size() == 3) fshape.insert(fshape.begin(), 1);
    Handle<OrtValue, rel_value> fv;
    const size_t n_values = (size_t) n_visual * n_embd;
    std::vector<uint16_t> half;
    if (m.features.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
        half.resize(n_values);
        for (size_t i = 0; i < n_values; ++i) half[i] = to_half(embd[i]);
    }
    void * fdata = half.empty() ? (void *) embd : (void *) half.data();
    check(ort().CreateTensorWithDataAsOrtValue(mem.p, fdata, n_values * (half.empty() ? sizeof(float) : 2),
                                               fshape.data(), fshape.size(), m.features.type, &fv.p),
          "ranker input");

    std::vector<int64_t> ishape = {(int64_t) question.size()};
    if (m.ids.dims.size() == 2) ishape.insert(ishape.begin(), 1);
    std::vector<int64_t> ids64(question.begin(), question.end());
    std::vector<int32_t> ids32(question.begin(), question.end());
    const bool i64 = m.ids.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    Handle<OrtValue, rel_value> iv;
    check(ort().CreateTensorWithDataAsOrtValue(mem.p, i64 ? (void *) ids64.data() : (void *) ids32.data(),
                                               question.size() * (i64 ? 8 : 4), ishape.data(), ishape.size(),
                                               m.ids.type, &iv.p),
          "ranker input");

    const char * in_names[2] = {m.features.name.c_str(), m.ids.name.c_str()};
    const OrtValue * inputs[2] = {fv.p, iv.p};
    const char * out_names[1] = {m.scores.name.c_str()};
    Handle<OrtValue, rel_value> out;
    check(ort().Run(m.session.p, nullptr, in_names, inputs, 2, out_names, 1, &out.p), "the ranker failed");

    Handle<OrtTensorTypeAndShapeInfo, rel_shape> si;
    check(ort().GetTensorTypeAndShape(out.p, &si.p), "ranker");
    size_t count = 0;
    check(ort().GetTensorShapeElementCount(si.p, &count), "ranker");
    if (count != (size_t) n_visual) {
        throw Error("the ranker returned " + std::to_string(count) + " scores for " + std::to_string(n_visual) +
                    " visual tokens");
    }
    float * data = nullptr;
    check(ort().GetTensorMutableData(out.p, (void **) &data), "ranker");
    return std::vector<float>(data, data + count);
}

}  // namespace flexselect

#else  // built without ONNX Runtime

namespace flexselect {

struct Ranker::Impl {};

bool Ranker::available() { return false; }

Ranker::Ranker(const std::string &, int) {
    throw Error("this flexselect-cli was built without ONNX Runtime, so --ranker is not available; rebuild with "
                "-DFLEXSELECT_WITH_ONNXRUNTIME=ON (see cpp/README.md)");
}

Ranker::~Ranker() = default;
int Ranker::feature_dim() const { return -1; }
std::vector<float> Ranker::score(const float *, int, int, const std::vector<int32_t> &) { return {}; }

}  // namespace flexselect

#endif
