// bench.cpp — speed of libmoekernels at real Qwen3.5 MoE shapes, through the C ABI only
// (plain g++, no GPU headers; links either build/<platform>/ or build/<platform>-mma/).
//
// For every shape x format x T it times the router, align, stage 1, stage 2 and the whole
// forward. Each repetition first overwrites a 512 MiB buffer (moe_memset) so that the L2 cache
// holds nothing of the problem, then brackets the one operation with moe_timer_begin/end
// (device events). The flush is enqueued before the begin event, so the operation's kernels are
// already queued behind it when the timer starts: the time is device time, not host launch
// latency. Reported: median and min over the repetitions.
//
//   bytes  the data an operation must touch at least: its inputs, the weights (and fp8 scales)
//          of the experts the routing actually uses, and its outputs; no scratch.
//          router: x, Wg (+ws), logits, ids, weights.  align: ids, sorted pairs, block experts.
//          stage 1: x, used w13 (+scales), intermediate.  stage 2: intermediate, used w2
//          (+scales), ids/weights, output.  forward: x, Wg, used w13 and w2, output.
//   TB/s   bytes / median time.  TFLOP/s  2*M*N*K of the GEMMs / median time (router:
//          2*T*(E+1)*H; stage 1: 2*T*S*2I*H; stage 2: 2*T*S*H*I).
//
// usage: bench [--shape 35b|397b-tp1|397b-tp8|all] [--tokens 1,16,...] [--format bf16|fp8|fnuz|all]
//              [--reps N] [--split N|auto] [--time-limit SECONDS] [--csv]
#include "moe_kernels.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#define CK(call)                                                                                  \
    do {                                                                                          \
        moe_status st_ = (call);                                                                  \
        if (st_ != MOE_OK) {                                                                      \
            fprintf(stderr, "FATAL %s:%d %s -> %d: %s\n", __FILE__, __LINE__, #call, (int)st_,   \
                    moe_last_error());                                                            \
            exit(2);                                                                              \
        }                                                                                         \
    } while (0)

struct Shape {
    const char* name;
    int64_t H, I;
    int32_t E, K;
};
// FACTS.md section 4: Qwen3.5-35B-A3B, Qwen3.5-397B-A17B at TP1 and TP8 (I / 8); shared expert
// fused as slot E (shared I == I for all three), renormalized top-K.
static const Shape kShapes[] = {
    {"35b", 2048, 512, 256, 8},
    {"397b-tp1", 4096, 1024, 512, 10},
    {"397b-tp8", 4096, 128, 512, 10},
};

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Buf {
    void* p = nullptr;
    size_t n = 0;
    Buf() = default;
    explicit Buf(size_t bytes) : n(bytes) { CK(moe_malloc(&p, bytes ? bytes : 1)); }
    ~Buf() { if (p) moe_free(p); }
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    template <class T> T* as() const { return (T*)p; }
};

struct Options {
    std::vector<std::string> shapes = {"35b", "397b-tp1", "397b-tp8"};
    std::vector<int64_t> tokens = {1, 16, 64, 256, 4096};
    std::vector<int> formats = {MOE_WEIGHTS_BF16, MOE_WEIGHTS_FP8_E4M3FN};
    int reps = 20;
    int split = 0; // 0 = auto
    double time_limit = 0;
    bool csv = false;
};

static std::vector<std::string> split_list(const char* s) {
    std::vector<std::string> out;
    std::string cur;
    for (const char* c = s;; ++c) {
        if (*c == ',' || *c == 0) {
            if (!cur.empty()) out.push_back(cur);
            cur.clear();
            if (*c == 0) break;
        } else {
            cur += *c;
        }
    }
    return out;
}

static Buf* g_flush = nullptr;
static const size_t kFlushBytes = (size_t)512 << 20; // > 10x the H200's 50 MB L2

template <class F>
static void time_op(const Options& o, F&& op, std::vector<float>& ms) {
    ms.clear();
    op(); // warm-up (also first-launch module loading)
    op();
    CK(moe_synchronize());
    for (int r = 0; r < o.reps; ++r) {
        CK(moe_memset(g_flush->p, r & 0xFF, kFlushBytes));
        CK(moe_timer_begin());
        op();
        float t = 0;
        CK(moe_timer_end(&t));
        ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
}

static const char* fmt_name(int f) { return f == 0 ? "bf16" : f == 1 ? "fp8" : "fp8-fnuz"; }

static void report(const Options& o, const Shape& s, int fmt, int64_t T, int split, const char* op,
                   const std::vector<float>& ms, double bytes, double flops) {
    const double med = ms[ms.size() / 2], mn = ms.front();
    const double tbs = bytes / (med * 1e-3) / 1e12, tfl = flops / (med * 1e-3) / 1e12;
    if (o.csv)
        printf("%s,%s,%lld,%d,%s,%.4f,%.4f,%.3f,%.2f,%.0f,%.0f\n", s.name, fmt_name(fmt), (long long)T, split, op, med,
               mn, tbs, tfl, bytes, flops);
    else
        printf("%-9s %-8s T=%-5lld split=%-2d %-8s %9.4f ms (min %9.4f)  %7.3f TB/s  %8.2f TFLOP/s\n", s.name,
               fmt_name(fmt), (long long)T, split, op, med, mn, tbs, tfl);
    fflush(stdout);
}

static void run_shape(const Options& o, const Shape& s, int fmt, double t_start) {
    const int32_t E1 = s.E + 1, S = s.K + 1;
    const bool fp8 = fmt != MOE_WEIGHTS_BF16;
    const int64_t H = s.H, I = s.I;
    const int64_t nKB = (H + 127) / 128, nIB = (I + 127) / 128, nHB = (H + 127) / 128;
    const size_t wb = fp8 ? 1 : 2;
    // weights: E+1 experts (slot E = the shared expert), counter-generated on the device
    Buf w13((size_t)E1 * 2 * I * H * wb), w2((size_t)E1 * H * I * wb);
    Buf w13s(fp8 ? (size_t)E1 * 2 * nIB * nKB * 4 : 0), w2s(fp8 ? (size_t)E1 * nHB * nIB * 4 : 0);
    Buf router((size_t)s.E * H * 2), sgate((size_t)H * 2);
    if (fp8) {
        CK(moe_fill_counter(w13.p, MOE_FILL_FP8_CODE, (int64_t)(w13.n), 11, 1, 0, 0));
        CK(moe_fill_counter(w2.p, MOE_FILL_FP8_CODE, (int64_t)(w2.n), 11, 2, 0, 0));
        CK(moe_fill_counter(w13s.p, MOE_FILL_F32_POW2, (int64_t)(w13s.n / 4), 11, 3, 0, 10));
        CK(moe_fill_counter(w2s.p, MOE_FILL_F32_POW2, (int64_t)(w2s.n / 4), 11, 4, 0, 10));
    } else {
        CK(moe_fill_counter(w13.p, MOE_FILL_BF16_INT, (int64_t)(w13.n / 2), 11, 1, 0, 12));
        CK(moe_fill_counter(w2.p, MOE_FILL_BF16_INT, (int64_t)(w2.n / 2), 11, 2, 0, 12));
    }
    CK(moe_fill_counter(router.p, MOE_FILL_BF16_INT, s.E * H, 11, 5, 0, 10));
    CK(moe_fill_counter(sgate.p, MOE_FILL_BF16_INT, H, 11, 6, 0, 10));
    moe_weights w = {w13.p, w2.p, fp8 ? w13s.as<float>() : nullptr, fp8 ? w2s.as<float>() : nullptr, router.p, sgate.p};
    const double expert_w13 = (double)2 * I * H * wb + (fp8 ? 2.0 * nIB * nKB * 4 : 0);
    const double expert_w2 = (double)H * I * wb + (fp8 ? (double)nHB * nIB * 4 : 0);

    for (int64_t T : o.tokens) {
        if (o.time_limit > 0 && now_s() - t_start > o.time_limit) {
            printf("# time limit %.0f s reached; stopping\n", o.time_limit);
            return;
        }
        const int64_t pairs = T * S;
        // split-K (fp8 stage 1): auto = at decode (T <= 64) enough splits to give ~2 workgroups
        // per SM on 132 SMs, rounded down to a divisor of the K-block count; 1 above.
        int split = 1;
        if (fp8) {
            if (o.split > 0) {
                split = (int)std::min<int64_t>(o.split, nKB);
            } else if (T <= 64) {
                const int64_t groups = std::min<int64_t>(pairs, E1) * ((I + 63) / 64);
                int64_t want = std::max<int64_t>(1, 264 / std::max<int64_t>(1, groups));
                want = std::min(want, nKB);
                while (nKB % want) --want;
                split = (int)want;
            }
        }
        moe_problem p = {T, H, I, s.E, s.K, 1, 1, fmt, split};
        size_t wsb = 0;
        CK(moe_workspace_size(&p, &wsb));
        const int64_t BM = moe_align_block_size();
        const int64_t cap = (pairs + (int64_t)(s.E + 1) * (BM - 1) + BM - 1) / BM * BM;
        Buf x((size_t)T * H * 2), out((size_t)T * H * 2), ws(wsb);
        Buf logits((size_t)T * s.E * 4), ids((size_t)pairs * 4), wts((size_t)pairs * 4), gate((size_t)T * 4);
        Buf sorted((size_t)cap * 4), bexp((size_t)(cap / BM) * 4), padded(4), inter((size_t)pairs * I * 2);
        CK(moe_fill_counter(x.p, MOE_FILL_BF16_INT, T * H, 11, 7, 0, 7));
        // routing once, to feed the stages and to count the experts used
        CK(moe_router(&p, &w, x.p, logits.as<float>(), ids.as<int32_t>(), wts.as<float>(), gate.as<float>()));
        CK(moe_align(&p, ids.as<int32_t>(), sorted.as<int32_t>(), bexp.as<int32_t>(), padded.as<int32_t>()));
        CK(moe_stage1(&p, &w, x.p, ids.as<int32_t>(), sorted.as<int32_t>(), bexp.as<int32_t>(), padded.as<int32_t>(),
                      inter.p, ws.p));
        std::vector<int32_t> hid((size_t)pairs);
        CK(moe_copy_to_host(hid.data(), ids.p, hid.size() * 4));
        const double used = (double)std::set<int32_t>(hid.begin(), hid.end()).size();

        const double xb = (double)T * H * 2, ob = (double)T * H * 2, ib = (double)pairs * I * 2;
        const double rb = xb + (double)(s.E + 1) * H * 2 + (double)T * s.E * 4 + (double)pairs * 8 + T * 4;
        const double ab = (double)pairs * 4 + (double)cap * 4 + (double)(cap / BM) * 4;
        const double s1b = xb + used * expert_w13 + ib;
        const double s2b = ib + used * expert_w2 + (double)pairs * 8 + ob;
        const double fb = xb + (double)(s.E + 1) * H * 2 + used * (expert_w13 + expert_w2) + ob;
        const double rf = 2.0 * T * (s.E + 1) * H, s1f = 2.0 * pairs * 2 * I * H, s2f = 2.0 * pairs * H * I;

        std::vector<float> ms;
        time_op(o, [&] {
            CK(moe_router(&p, &w, x.p, logits.as<float>(), ids.as<int32_t>(), wts.as<float>(), gate.as<float>()));
        }, ms);
        report(o, s, fmt, T, split, "router", ms, rb, rf);
        time_op(o, [&] {
            CK(moe_align(&p, ids.as<int32_t>(), sorted.as<int32_t>(), bexp.as<int32_t>(), padded.as<int32_t>()));
        }, ms);
        report(o, s, fmt, T, split, "align", ms, ab, 0);
        time_op(o, [&] {
            CK(moe_stage1(&p, &w, x.p, ids.as<int32_t>(), sorted.as<int32_t>(), bexp.as<int32_t>(),
                          padded.as<int32_t>(), inter.p, ws.p));
        }, ms);
        report(o, s, fmt, T, split, "stage1", ms, s1b, s1f);
        time_op(o, [&] {
            CK(moe_stage2(&p, &w, inter.p, ids.as<int32_t>(), wts.as<float>(), sorted.as<int32_t>(), bexp.as<int32_t>(),
                          padded.as<int32_t>(), out.p, ws.p));
        }, ms);
        report(o, s, fmt, T, split, "stage2", ms, s2b, s2f);
        time_op(o, [&] { CK(moe_forward(&p, &w, x.p, out.p, ws.p)); }, ms);
        report(o, s, fmt, T, split, "forward", ms, fb, rf + s1f + s2f);
        // a NaN/inf or all-zero output would make the timing meaningless: say so
        std::vector<uint16_t> ho((size_t)T * H);
        CK(moe_copy_to_host(ho.data(), out.p, ho.size() * 2));
        int64_t bad = 0, zero = 0;
        for (uint16_t v : ho) {
            if ((v & 0x7F80) == 0x7F80) ++bad;
            if ((v & 0x7FFF) == 0) ++zero;
        }
        if (bad || zero == (int64_t)ho.size())
            printf("# WARNING %s %s T=%lld: output has %lld non-finite and %lld zero of %zu values\n", s.name,
                   fmt_name(fmt), (long long)T, (long long)bad, (long long)zero, ho.size());
    }
}

int main(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const char* a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
        if (!strcmp(a, "--csv")) { o.csv = true; continue; }
        if (!v) { fprintf(stderr, "bench: %s needs a value\n", a); return 2; }
        ++i;
        if (!strcmp(a, "--shape")) {
            o.shapes = !strcmp(v, "all") ? std::vector<std::string>{"35b", "397b-tp1", "397b-tp8"} : split_list(v);
        } else if (!strcmp(a, "--tokens")) {
            o.tokens.clear();
            for (auto& t : split_list(v)) o.tokens.push_back(atoll(t.c_str()));
        } else if (!strcmp(a, "--format")) {
            o.formats.clear();
            for (auto& f : split_list(v)) {
                if (f == "bf16") o.formats.push_back(MOE_WEIGHTS_BF16);
                else if (f == "fp8") o.formats.push_back(MOE_WEIGHTS_FP8_E4M3FN);
                else if (f == "fnuz") o.formats.push_back(MOE_WEIGHTS_FP8_E4M3FNUZ);
                else if (f == "all") o.formats = {MOE_WEIGHTS_BF16, MOE_WEIGHTS_FP8_E4M3FN, MOE_WEIGHTS_FP8_E4M3FNUZ};
                else { fprintf(stderr, "bench: unknown format '%s'\n", f.c_str()); return 2; }
            }
        } else if (!strcmp(a, "--reps")) {
            o.reps = std::max(1, atoi(v));
        } else if (!strcmp(a, "--split")) {
            o.split = !strcmp(v, "auto") ? 0 : std::max(1, atoi(v));
        } else if (!strcmp(a, "--time-limit")) {
            o.time_limit = atof(v);
        } else {
            fprintf(stderr, "bench: unknown option %s\n", a);
            return 2;
        }
    }
    int32_t n = 0;
    CK(moe_device_count(&n));
    if (n < 1) { fprintf(stderr, "bench: no device\n"); return 2; }
    char name[256];
    CK(moe_device_name(0, name, sizeof name));
    printf("# %s | device 0: %s | reps %d, L2 flushed (%zu MiB memset) before each\n", moe_library_name(), name, o.reps,
           kFlushBytes >> 20);
    if (o.csv) printf("shape,format,T,split,op,median_ms,min_ms,TB_per_s,TFLOP_per_s,bytes,flops\n");
    Buf flush(kFlushBytes);
    g_flush = &flush;
    const double t0 = now_s();
    for (auto& sn : o.shapes) {
        const Shape* s = nullptr;
        for (auto& k : kShapes)
            if (sn == k.name) s = &k;
        if (!s) { fprintf(stderr, "bench: unknown shape '%s' (35b, 397b-tp1, 397b-tp8)\n", sn.c_str()); return 2; }
        for (int f : o.formats) {
            if (o.time_limit > 0 && now_s() - t0 > o.time_limit) break;
            run_shape(o, *s, f, t0);
        }
    }
    printf("# done in %.1f s\n", now_s() - t0);
    return 0;
}
