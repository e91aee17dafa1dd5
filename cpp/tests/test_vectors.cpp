// The hand-computed cases of tests/vectors/*.json, which the Python tests read too: both runtimes must give the
// same answers. Usage: flexselect-vectors DIR (the tests/vectors folder).
#include "flexselect/flexselect.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

using namespace flexselect;
using json = nlohmann::json;

static int g_failures = 0;

static void fail(const std::string & name, const std::string & what) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), what.c_str());
    ++g_failures;
}

static json read(const std::string & path) {
    std::ifstream in(path);
    if (!in) throw Error("cannot read " + path);
    return json::parse(in);
}

static void test_evidence(const json & cases) {
    for (const auto & c : cases) {
        const std::string name = c["name"];
        const auto got = evidence_ranges(c["kept_per_unit"].get<std::vector<int>>(),
                                         c["timestamps"].get<std::vector<double>>(), c["max_ranges"].get<int>());
        const auto & want = c["ranges"];
        if (got.size() != want.size()) {
            fail(name, "got " + std::to_string(got.size()) + " ranges, want " + std::to_string(want.size()));
            continue;
        }
        for (size_t i = 0; i < got.size(); ++i) {
            const auto & w = want[i];
            if (got[i].start_s != w["start_s"].get<double>() || got[i].end_s != w["end_s"].get<double>() ||
                got[i].tokens != w["tokens"].get<int>() || std::fabs(got[i].share - w["share"].get<double>()) > 1e-12) {
                fail(name, "range " + std::to_string(i) + " differs");
            }
        }
    }
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s TESTS_VECTORS_DIR\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[1];
    test_evidence(read(dir + "/evidence.json")["cases"]);
    if (g_failures) {
        std::fprintf(stderr, "%d vector case(s) failed\n", g_failures);
        return 1;
    }
    std::printf("all vector cases passed\n");
    return 0;
}
