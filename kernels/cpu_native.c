/* The CPU merge kernels in C: one fused pass per tensor, the same formulas and the same fp32 operations
 * in the same order as the plain-PyTorch references (ties.py, topk_threshold.py), so the bits agree.
 *
 * Built at first use by cpu_native.py (`cc -O3 -march=native -ffp-contract=off`: no FMA contraction, no
 * fast-math, so every +, *, / rounds as PyTorch's does) and called through ctypes, which releases the GIL:
 * Python threads run disjoint element ranges side by side. Inputs are fp32 (code 0) or bf16 (code 1); all
 * arithmetic is fp32. Plain C, no dependencies.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FLT_MAX_ 3.4028234663852886e38f

#define BLK 256  /* elements per block: the block-local arrays (on the stack) stay in L1/L2 */
#define MAX_T 16

/* The most experts wb_ties takes (cpu_native.py reads it from here). */
int wb_max_experts(void) { return MAX_T; }

/* dst[j] = element i0 + j of p as fp32, j < m. bf16 -> fp32 is exact: the bits shifted up. */
static void load_block(const void *p, int code, int64_t i0, int m, float *dst) {
    if (code == 0) {
        memcpy(dst, (const float *)p + i0, (size_t)m * 4);
        return;
    }
    const uint16_t *src = (const uint16_t *)p + i0;
    uint32_t *u = (uint32_t *)dst;
    for (int j = 0; j < m; j++) u[j] = (uint32_t)src[j] << 16;
}

/* The bf16 bits of an fp32 value (bits u) as PyTorch rounds it: nearest even; NaN -> 0xFFFF. */
static inline uint16_t bf16_bits(uint32_t u) {
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0xFFFF : (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

static void store_block(void *p, int code, int64_t i0, int m, const float *src) {
    if (code == 0) {
        memcpy((float *)p + i0, src, (size_t)m * 4);
        return;
    }
    const uint32_t *u = (const uint32_t *)src;
    uint16_t *dst = (uint16_t *)p + i0;
    for (int j = 0; j < m; j++) dst[j] = bf16_bits(u[j]);
}

static inline float sgn(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

/* Chris Wellons' lowbias32, as dare.py's counter-based hash. */
static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

/* DARE (dare.py) on a block of one expert, as dare_ would leave it in that expert's storage:
 * x <- b + (keep ? (x − b)·scale : 0), rounded to the expert's dtype and read back as fp32. */
static void dare_block(float *x, const float *b, int code, int64_t i0, int m, const int64_t *keys, float scale) {
    uint32_t k0 = (uint32_t)keys[0], k1 = (uint32_t)keys[1], threshold = (uint32_t)keys[2];
    for (int j = 0; j < m; j++) {
        uint64_t i = (uint64_t)(i0 + j);
        uint32_t h = lowbias32(lowbias32((uint32_t)i ^ k0) ^ (uint32_t)(i >> 32) ^ k1);
        float v = b[j] + ((h >> 8) >= threshold ? (x[j] - b[j]) * scale : 0.0f);
        if (code == 1) {
            uint32_t u;
            memcpy(&u, &v, 4);
            u = (uint32_t)bf16_bits(u) << 16;
            memcpy(&v, &u, 4);
        }
        x[j] = v;
    }
}

/* ties.py's formula on elements [start, end). method: 0 ties, 1 task_arithmetic, 2 linear.
 * params: [T][3] = (w_t, tau_hi_t, tau_lo_t), fp32. counts: [T][4] += (kept, survived, slack_admitted,
 * nonfinite). dare: NULL, or [T][3] = (k0, k1, drop threshold; 0: no drop) with dare_scale [T]: each
 * expert is first dropped and rescaled as dare_ would (DARE-TIES in one pass, the experts unchanged).
 * Returns how many results were NaN (the caller recomputes such tensors elsewhere).
 * Per block: the deltas and masks of every expert, then the election, then the disjoint mean. */
int64_t wb_ties(int64_t start, int64_t end, const void *base, int base_code, const void **experts,
                const int *codes, int T, const float *params, float lam, int method, int count_consensus,
                int normalize, int has_slack, void *out, int out_code, int64_t *counts, const int64_t *dare,
                const float *dare_scale) {
    float b[BLK], x[BLK], d[MAX_T][BLK], s[BLK], e1[BLK], e2[BLK], num[BLK], den[BLK];
    int32_t keep[MAX_T][BLK], cand[MAX_T][BLK];
    int64_t kept[MAX_T] = {0}, surv[MAX_T] = {0}, adm[MAX_T] = {0}, bad[MAX_T] = {0}, nans = 0;
    for (int64_t i0 = start; i0 < end; i0 += BLK) {
        int m = (int)(end - i0 < BLK ? end - i0 : BLK);
        if (base) load_block(base, base_code, i0, m, b);
        else memset(b, 0, sizeof(b));
        for (int t = 0; t < T; t++) {
            float hi = params[3 * t + 1], lo = params[3 * t + 2];
            int64_t k_t = 0, bad_t = 0;
            load_block(experts[t], codes[t], i0, m, x);
            if (dare && dare[3 * t + 2] > 0) dare_block(x, b, codes[t], i0, m, dare + 3 * t, dare_scale[t]);
            float *dt = d[t];
            int32_t *kt = keep[t], *ct = cand[t];
            for (int j = 0; j < m; j++) {
                float v = method == 2 ? x[j] : x[j] - b[j];
                float a = fabsf(v);
                int32_t ok = a <= FLT_MAX_;
                dt[j] = ok ? v : 0.0f;
                int32_t k = method == 0 ? (ok & (a >= hi)) : ok;
                kt[j] = k;
                ct[j] = method == 0 ? (ok & (a >= lo)) : ok;
                k_t += k;
                bad_t += 1 - ok;
            }
            kept[t] += k_t;
            bad[t] += bad_t;
        }
        if (method == 0) {
            for (int j = 0; j < m; j++) e1[j] = e2[j] = 0.0f;
            for (int t = 0; t < T; t++) {
                float w = params[3 * t];
                const float *dt = d[t];
                const int32_t *kt = keep[t], *ct = cand[t];
                for (int j = 0; j < m; j++) {
                    float v = count_consensus ? sgn(dt[j]) : dt[j] * w;
                    e1[j] = e1[j] + (kt[j] ? v : 0.0f);
                    e2[j] = e2[j] + ((ct[j] & !kt[j]) ? v : 0.0f);
                }
            }
            for (int j = 0; j < m; j++) {
                float sj = sgn(e1[j]);
                s[j] = (has_slack && sj == 0.0f) ? sgn(e2[j]) : sj;
            }
        }
        for (int j = 0; j < m; j++) num[j] = den[j] = 0.0f;
        for (int t = 0; t < T; t++) {
            float w = params[3 * t];
            const float *dt = d[t];
            const int32_t *kt = keep[t], *ct = cand[t];
            int64_t sv = 0, ad = 0;
            for (int j = 0; j < m; j++) {
                int32_t agree = method == 0 ? (ct[j] & (dt[j] * s[j] > 0.0f)) : kt[j];
                num[j] = num[j] + (agree ? dt[j] * w : 0.0f);
                den[j] = den[j] + (agree ? w : 0.0f);
                sv += agree & kt[j];
                ad += agree & !kt[j];
            }
            surv[t] += sv;
            adm[t] += ad;
        }
        int plain = method == 1 || (method == 0 && !normalize);
        int64_t nb = 0;
        for (int j = 0; j < m; j++) {
            float merged = plain ? num[j] : (den[j] != 0.0f ? num[j] / (den[j] != 0.0f ? den[j] : 1.0f) : 0.0f);
            float r = method == 2 ? merged : b[j] + lam * merged;
            nb += r != r;
            x[j] = r;
        }
        nans += nb;
        store_block(out, out_code, i0, m, x);
    }
    for (int t = 0; t < T; t++) {
        counts[4 * t] += kept[t];
        counts[4 * t + 1] += surv[t];
        counts[4 * t + 2] += adm[t];
        counts[4 * t + 3] += bad[t];
    }
    return nans;
}

/* |expert − base| in fp32 as bits, non-finite -> 0 (topk_threshold.py's ranking key), for a block. */
static void abs_delta_bits(const void *base, int base_code, const void *expert, int code, int64_t i0, int m,
                           uint32_t *bits) {
    float b[BLK], e[BLK];
    load_block(base, base_code, i0, m, b);
    load_block(expert, code, i0, m, e);
    for (int j = 0; j < m; j++) {
        float a = fabsf(e[j] - b[j]);
        a = a <= FLT_MAX_ ? a : 0.0f;
        memcpy(&bits[j], &a, 4);
    }
}

/* Radix pass 1: hist[bits >> 16] += 1 (32768 bins). */
void wb_hist_high(int64_t start, int64_t end, const void *base, int base_code, const void *expert, int code,
                  int64_t *hist) {
    uint32_t bits[BLK];
    for (int64_t i0 = start; i0 < end; i0 += BLK) {
        int m = (int)(end - i0 < BLK ? end - i0 : BLK);
        abs_delta_bits(base, base_code, expert, code, i0, m, bits);
        for (int j = 0; j < m; j++) hist[bits[j] >> 16]++;
    }
}

/* Radix pass 2: for the elements whose high half is buckets[k], hist[k][bits & 0xFFFF] += 1. */
void wb_hist_low(int64_t start, int64_t end, const void *base, int base_code, const void *expert, int code,
                 const int64_t *buckets, int nbuckets, int64_t *hist) {
    uint32_t bits[BLK];
    for (int64_t i0 = start; i0 < end; i0 += BLK) {
        int m = (int)(end - i0 < BLK ? end - i0 : BLK);
        abs_delta_bits(base, base_code, expert, code, i0, m, bits);
        for (int j = 0; j < m; j++) {
            int64_t high = bits[j] >> 16;
            for (int k = 0; k < nbuckets; k++)
                if (high == buckets[k]) hist[(int64_t)k * 65536 + (bits[j] & 0xFFFF)]++;
        }
    }
}

/* How many elements are NaN or ±Inf (the engine's input check). */
int64_t wb_nonfinite(int64_t start, int64_t end, const void *p, int code) {
    float v[BLK];
    int64_t bad = 0;
    for (int64_t i0 = start; i0 < end; i0 += BLK) {
        int m = (int)(end - i0 < BLK ? end - i0 : BLK);
        load_block(p, code, i0, m, v);
        int64_t b = 0;
        for (int j = 0; j < m; j++) b += !(fabsf(v[j]) <= FLT_MAX_);
        bad += b;
    }
    return bad;
}
