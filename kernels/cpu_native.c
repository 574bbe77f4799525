/* The CPU merge kernels in C: one fused pass per tensor, the same formulas and the same fp32 operations
 * in the same order as the plain-PyTorch references (ties.py, topk_threshold.py), so the bits agree.
 *
 * Built at first use by cpu_native.py (`cc -O3 -march=native -ffp-contract=off`: no FMA contraction, no
 * fast-math, so every +, *, / rounds as PyTorch's does) and called through ctypes, which releases the GIL:
 * Python threads run disjoint element ranges side by side. Inputs are fp32 or bf16; all arithmetic is
 * fp32. Plain C, no dependencies. The enums and structs are mirrored in cpu_native.py; `wb_abi` lets it
 * check the mirror against this file.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLK 256  /* elements per block: the block-local arrays (on the stack) stay in L1/L2 */
#define MAX_T 16

static const float FLT_MAX_ = 3.4028234663852886e38f;

enum wb_dtype { WB_FP32 = 0, WB_BF16 = 1 };
enum wb_method { WB_TIES = 0, WB_TASK_ARITHMETIC = 1, WB_LINEAR = 2 };  /* merge_codes.Method */
enum wb_count {                                                   /* merge_codes.Count */
    WB_KEPT, WB_KEPT_ENTERED, WB_PROTECTED, WB_PROTECTED_ENTERED, WB_KEPT_ENTERED_PLAIN,
    WB_PROTECTED_ENTERED_PLAIN, WB_NONFINITE, WB_COUNTS
};

/* One expert of a merge over one element range. The trim keeps |δ| > keep_tau and, of the elements with
 * |δ| = keep_tau (non-finite δ ranks as 0), the first keep_quota in flat order; the protection likewise
 * with protect_tau / protect_quota (tau +inf and quota 0: protects nothing). Quotas are consumed. */
typedef struct {
    const void *data;
    int32_t dtype;
    float weight, keep_tau, protect_tau;
    int64_t keep_quota, protect_quota;
    /* DARE (dare.py), applied on the fly: drop threshold 0 means no drop. */
    uint32_t dare_k0, dare_k1, dare_threshold;
    float dare_scale;
} wb_expert;

typedef struct {
    int64_t start, end;
    const void *base;  /* NULL for linear */
    int32_t base_dtype;
    void *out;
    int32_t out_dtype;
    int32_t method, num_experts, count_consensus, normalize, has_protect;
    float lam;
    wb_expert *experts;
    int64_t *counts;   /* [num_experts][WB_COUNTS], added to */
} wb_merge_args;

/* A radix pass over one element range: hist[k][digit] += 1 for every element whose key's bits above the
 * digit equal prefixes[k] (num_prefixes 0: every element, one row). key = the bits of |δ| in fp32. */
typedef struct {
    int64_t start, end;
    const void *base, *expert;
    int32_t base_dtype, expert_dtype, shift, width, num_prefixes;
    const int64_t *prefixes;
    int64_t *hist;     /* [max(1, num_prefixes)][1 << width] */
} wb_hist_args;

/* The layout facts cpu_native.py checks its mirror against. */
int64_t wb_abi(int what) {
    switch (what) {
        case 0: return MAX_T;
        case 1: return (int64_t)sizeof(wb_expert);
        case 2: return (int64_t)sizeof(wb_merge_args);
        case 3: return (int64_t)sizeof(wb_hist_args);
        case 4: return WB_COUNTS;
        case 5: return WB_LINEAR;
        default: return -1;
    }
}

/* dst[j] = element i0 + j of p as fp32, j < m. bf16 -> fp32 is exact: the bits shifted up. */
static void load_block(const void *p, int dtype, int64_t i0, int m, float *dst) {
    if (dtype == WB_FP32) {
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

static void store_block(void *p, int dtype, int64_t i0, int m, const float *src) {
    if (dtype == WB_FP32) {
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
static void dare_block(float *x, const float *b, const wb_expert *e, int64_t i0, int m) {
    /* Locals, not the struct's fields, in the loop: stores to x could alias them, which would keep the
     * loop from being vectorized. */
    const uint32_t k0 = e->dare_k0, k1 = e->dare_k1, threshold = e->dare_threshold;
    const float scale = e->dare_scale;
    const int bf16 = e->dtype == WB_BF16;
    for (int j = 0; j < m; j++) {
        uint64_t i = (uint64_t)(i0 + j);
        uint32_t h = lowbias32(lowbias32((uint32_t)i ^ k0) ^ (uint32_t)(i >> 32) ^ k1);
        float v = b[j] + ((h >> 8) >= threshold ? (x[j] - b[j]) * scale : 0.0f);
        if (bf16) {
            uint32_t u;
            memcpy(&u, &v, 4);
            u = (uint32_t)bf16_bits(u) << 16;
            memcpy(&v, &u, 4);
        }
        x[j] = v;
    }
}

/* The exact top-k membership of a block (topk_threshold.py): key[j] = |δ| (0 where not finite), ok[j] = δ
 * finite. Ties at tau are taken in order while *quota lasts; a block the quota covers whole (or not at all)
 * needs no running count. */
static void topk_member(const float *key, const int32_t *ok, int m, float tau, int64_t *quota, int32_t *member) {
    int64_t q = *quota;
    if (q <= 0) {
        for (int j = 0; j < m; j++) member[j] = ok[j] & (key[j] > tau);
        return;
    }
    if (q >= m) {
        int64_t ties = 0;
        for (int j = 0; j < m; j++) {
            ties += key[j] == tau;
            member[j] = ok[j] & (key[j] >= tau);
        }
        *quota = q - ties;
        return;
    }
    for (int j = 0; j < m; j++) {
        int32_t take = (key[j] == tau) & (q > 0);
        q -= take;
        member[j] = ok[j] & ((key[j] > tau) | take);
    }
    *quota = q;
}

/* ties.py's formula on elements [start, end): per block, each expert's delta and masks, then the election
 * (TIES-SV: the protected vote where it is not 0, else the trimmed vote), then the disjoint mean; task
 * arithmetic and linear (no trim, no election) in one fused loop per expert.
 * Returns how many results were NaN (the caller recomputes such tensors elsewhere). */
int64_t wb_merge(wb_merge_args *a) {
    float b[BLK], x[BLK], key[BLK], d[MAX_T][BLK], s[BLK], s_plain[BLK], e_keep[BLK], e_prot[BLK];
    float num[BLK], den[BLK];
    int32_t ok[MAX_T][BLK], keep[MAX_T][BLK], prot[MAX_T][BLK];
    int64_t counts[MAX_T][WB_COUNTS];
    int64_t nans = 0;
    /* Every parameter in a local: the inner loops store through int32/float pointers, which the compiler
     * must otherwise assume may alias the struct's fields, reloading them and not vectorizing. */
    wb_expert ex[MAX_T];
    const int T = a->num_experts, ties = a->method == WB_TIES, protect = ties && a->has_protect;
    const int linear = a->method == WB_LINEAR, count_consensus = a->count_consensus;
    const int plain_sum = a->method == WB_TASK_ARITHMETIC || (ties && !a->normalize);
    const float lam = a->lam;
    const int64_t start = a->start, end = a->end;
    const void *base = a->base;
    memcpy(ex, a->experts, (size_t)T * sizeof(wb_expert));
    memset(counts, 0, sizeof(counts));
    for (int64_t i0 = start; i0 < end; i0 += BLK) {
        int m = (int)(end - i0 < BLK ? end - i0 : BLK);
        if (base) load_block(base, a->base_dtype, i0, m, b);
        else memset(b, 0, sizeof(b));
        if (!ties) {
            /* Task arithmetic and linear: no trim, no election, so every finite δ enters. The loop below
             * with its masks fused away: the same operations in the same order, so the same bits. */
            for (int j = 0; j < m; j++) num[j] = den[j] = 0.0f;
            for (int t = 0; t < T; t++) {
                const wb_expert *e = &ex[t];
                const float w = e->weight;
                int64_t entered = 0;
                load_block(e->data, e->dtype, i0, m, x);
                if (e->dare_threshold > 0) dare_block(x, b, e, i0, m);
                for (int j = 0; j < m; j++) {
                    float v = linear ? x[j] : x[j] - b[j];
                    int32_t finite = fabsf(v) <= FLT_MAX_;
                    num[j] = num[j] + (finite ? v * w : 0.0f);
                    den[j] = den[j] + (finite ? w : 0.0f);
                    entered += finite;
                }
                counts[t][WB_NONFINITE] += m - entered;
                counts[t][WB_KEPT] += entered;
                counts[t][WB_KEPT_ENTERED] += entered;
                counts[t][WB_KEPT_ENTERED_PLAIN] += entered;
            }
        } else {
            for (int t = 0; t < T; t++) {
                wb_expert *e = &ex[t];
                float *dt = d[t];
                int32_t *okt = ok[t];
                int64_t bad = 0;
                load_block(e->data, e->dtype, i0, m, x);
                if (e->dare_threshold > 0) dare_block(x, b, e, i0, m);
                for (int j = 0; j < m; j++) {
                    float v = x[j] - b[j];
                    int32_t finite = fabsf(v) <= FLT_MAX_;
                    dt[j] = finite ? v : 0.0f;
                    key[j] = fabsf(dt[j]);
                    okt[j] = finite;
                    bad += 1 - finite;
                }
                counts[t][WB_NONFINITE] += bad;
                topk_member(key, okt, m, e->keep_tau, &e->keep_quota, keep[t]);
                if (protect) topk_member(key, okt, m, e->protect_tau, &e->protect_quota, prot[t]);
                else memset(prot[t], 0, sizeof(prot[t]));
                int64_t k = 0, p = 0;
                for (int j = 0; j < m; j++) {
                    k += keep[t][j];
                    p += prot[t][j];
                }
                counts[t][WB_KEPT] += k;
                counts[t][WB_PROTECTED] += p;
            }
            for (int j = 0; j < m; j++) e_keep[j] = e_prot[j] = 0.0f;
            for (int t = 0; t < T; t++) {
                const float w = ex[t].weight;
                const float *dt = d[t];
                const int32_t *kt = keep[t], *pt = prot[t];
                for (int j = 0; j < m; j++) {
                    float v = count_consensus ? sgn(dt[j]) : dt[j] * w;
                    e_keep[j] = e_keep[j] + (kt[j] ? v : 0.0f);
                    if (protect) e_prot[j] = e_prot[j] + (pt[j] ? v : 0.0f);
                }
            }
            for (int j = 0; j < m; j++) {
                s_plain[j] = sgn(e_keep[j]);
                float sp = sgn(e_prot[j]);
                s[j] = (protect && sp != 0.0f) ? sp : s_plain[j];
            }
            for (int j = 0; j < m; j++) num[j] = den[j] = 0.0f;
            for (int t = 0; t < T; t++) {
                const float w = ex[t].weight;
                const float *dt = d[t];
                const int32_t *kt = keep[t], *pt = prot[t];
                int64_t ke = 0, pe = 0, kp = 0, pp = 0;
                for (int j = 0; j < m; j++) {
                    int32_t agree = kt[j] & (dt[j] * s[j] > 0.0f);
                    num[j] = num[j] + (agree ? dt[j] * w : 0.0f);
                    den[j] = den[j] + (agree ? w : 0.0f);
                    ke += agree;
                    pe += agree & pt[j];
                }
                if (protect) {
                    for (int j = 0; j < m; j++) {
                        int32_t agree_plain = kt[j] & (dt[j] * s_plain[j] > 0.0f);
                        kp += agree_plain;
                        pp += agree_plain & pt[j];
                    }
                } else {
                    kp = ke;
                    pp = pe;
                }
                counts[t][WB_KEPT_ENTERED] += ke;
                counts[t][WB_PROTECTED_ENTERED] += pe;
                counts[t][WB_KEPT_ENTERED_PLAIN] += kp;
                counts[t][WB_PROTECTED_ENTERED_PLAIN] += pp;
            }
        }
        int64_t nb = 0;
        for (int j = 0; j < m; j++) {
            float merged = plain_sum ? num[j] : (den[j] != 0.0f ? num[j] / (den[j] != 0.0f ? den[j] : 1.0f) : 0.0f);
            float r = linear ? merged : b[j] + lam * merged;
            nb += r != r;
            x[j] = r;
        }
        nans += nb;
        store_block(a->out, a->out_dtype, i0, m, x);
    }
    for (int t = 0; t < T; t++)
        for (int c = 0; c < WB_COUNTS; c++) a->counts[t * WB_COUNTS + c] += counts[t][c];
    return nans;
}

/* |expert − base| in fp32 as bits, non-finite -> 0: the ranking key of topk_threshold.py, for a block. */
static void abs_delta_bits(const void *base, int base_dtype, const void *expert, int dtype, int64_t i0, int m,
                           uint32_t *bits) {
    float b[BLK], e[BLK];
    load_block(base, base_dtype, i0, m, b);
    load_block(expert, dtype, i0, m, e);
    for (int j = 0; j < m; j++) {
        float v = fabsf(e[j] - b[j]);
        v = v <= FLT_MAX_ ? v : 0.0f;
        memcpy(&bits[j], &v, 4);
    }
}

void wb_radix_hist(const wb_hist_args *a) {
    uint32_t bits[BLK];
    int32_t cand[BLK];
    /* Locals, not the struct's fields, in the loops: the histogram stores could alias them. */
    const int shift = a->shift, above = a->shift + a->width, num_prefixes = a->num_prefixes;
    const uint32_t digit_mask = (1u << a->width) - 1u;
    const int64_t bins = (int64_t)1 << a->width, start = a->start, end = a->end;
    int64_t *hist = a->hist;
    if (num_prefixes == 0) {
        for (int64_t i0 = start; i0 < end; i0 += BLK) {
            int m = (int)(end - i0 < BLK ? end - i0 : BLK);
            abs_delta_bits(a->base, a->base_dtype, a->expert, a->expert_dtype, i0, m, bits);
            for (int j = 0; j < m; j++) hist[(bits[j] >> shift) & digit_mask]++;
        }
        return;
    }
    /* The bits above the digit (a key's high part) of few elements equal a prefix: each block first lists
     * the elements whose high part lies in [lowest, highest prefix] (branch-free), then counts those. */
    uint32_t lo = UINT32_MAX, hi = 0;
    for (int k = 0; k < num_prefixes; k++) {
        int64_t p = a->prefixes[k];
        if (p < 0 || (above < 32 && p >> (32 - above)) || (above >= 32 && p != 0)) continue;  /* matches no key */
        if ((uint32_t)p < lo) lo = (uint32_t)p;
        if ((uint32_t)p > hi) hi = (uint32_t)p;
    }
    if (lo > hi) return;
    const uint32_t span = hi - lo;
    const int high_shift = above >= 32 ? 0 : above;
    const uint32_t high_mask = above >= 32 ? 0u : UINT32_MAX;
    for (int64_t i0 = start; i0 < end; i0 += BLK) {
        int m = (int)(end - i0 < BLK ? end - i0 : BLK);
        abs_delta_bits(a->base, a->base_dtype, a->expert, a->expert_dtype, i0, m, bits);
        int c = 0;
        for (int j = 0; j < m; j++) {
            cand[c] = j;
            c += (((bits[j] >> high_shift) & high_mask) - lo) <= span;
        }
        for (int i = 0; i < c; i++) {
            uint32_t key = bits[cand[i]];
            int64_t prefix = (int64_t)((key >> high_shift) & high_mask);
            for (int k = 0; k < num_prefixes; k++)
                if (prefix == a->prefixes[k]) hist[k * bins + ((key >> shift) & digit_mask)]++;
        }
    }
}

/* How many elements of [start, end) have key = the bits of tau (a threshold's ties). */
int64_t wb_count_equal(int64_t start, int64_t end, const void *base, int32_t base_dtype, const void *expert,
                       int32_t expert_dtype, float tau) {
    uint32_t bits[BLK], target;
    int64_t count = 0;
    memcpy(&target, &tau, 4);
    for (int64_t i0 = start; i0 < end; i0 += BLK) {
        int m = (int)(end - i0 < BLK ? end - i0 : BLK);
        abs_delta_bits(base, base_dtype, expert, expert_dtype, i0, m, bits);
        int64_t c = 0;
        for (int j = 0; j < m; j++) c += bits[j] == target;
        count += c;
    }
    return count;
}

/* How many elements are NaN or ±Inf (the engine's input check). */
int64_t wb_nonfinite(int64_t start, int64_t end, const void *p, int32_t dtype) {
    float v[BLK];
    int64_t bad = 0;
    for (int64_t i0 = start; i0 < end; i0 += BLK) {
        int m = (int)(end - i0 < BLK ? end - i0 : BLK);
        load_block(p, dtype, i0, m, v);
        int64_t c = 0;
        for (int j = 0; j < m; j++) c += !(fabsf(v[j]) <= FLT_MAX_);
        bad += c;
    }
    return bad;
}
