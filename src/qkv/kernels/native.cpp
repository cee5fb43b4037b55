// The native kernel: attention forward in float32, blocks of queries computed transposed.
//
// Letters: r queries of a block (rp: r rounded up to the vector width), nk keys in its
// span, D / Dv head widths, V floats in one vector: 16 with AVX-512, 8 with AVX2.
//
// torch's fused CPU kernel runs at about 70% of the machine's matrix-multiply speed on
// long spans and about half of it on the ~288-key spans of a sliding window's sub-blocks.
// Here a block of up to CHUNK = 4·V queries is computed transposed, every vector running
// across queries, over even slices of at most KEYS = 512 keys merged by the online softmax:
//
//   Sᵀ[j][·] = scale · Σ_d K[j][d] · Qᵀ[d][·]        (keys × queries, + mask)
//   m' = max(m, max_j Sᵀ[j][·]),  Pᵀ = exp(Sᵀ − m'),  α = exp(m − m')
//   l = α·l + Σ_j Pᵀ[j][·],   Oᵀ[e][·] = α·Oᵀ[e][·] + Σ_j V[j][e] · Pᵀ[j][·]
//   out[i][e] = Oᵀ[e][i] / l[i],  lse[i] = m[i] + log l[i]
//
// so the max, the exponentials and the sums are element-wise vector operations (no
// reduction across lanes), a slice's scores stay near the core, and both products are one
// register-blocked kernel (`product`): a few scalars of A broadcast against a few vectors
// of Y, all accumulators in registers (AVX-512, measured alone: ~160 GFLOP/s on one core,
// above the library GEMM's 147). Rows that see no key get out 0 and lse −inf; NaN
// propagates.
//
// One source for two instruction sets: QKV_VECTOR_BITS (512 or 256, set by native.py from
// the CPU's flags) fixes V; the code is GCC vector extensions, and the few operations they
// cannot say — exp's scaling by 2ⁿ, rounding, partial loads and stores, a register
// transpose, streaming stores — are the small per-ISA helpers below.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <immintrin.h>
#include <omp.h>

#ifndef QKV_VECTOR_BITS
#define QKV_VECTOR_BITS 512
#endif

#if QKV_VECTOR_BITS == 512
#ifndef __AVX512F__
#error "QKV_VECTOR_BITS=512 needs AVX-512 (-mavx512f)"
#endif
#elif QKV_VECTOR_BITS == 256
#if !defined(__AVX2__) || !defined(__FMA__)
#error "QKV_VECTOR_BITS=256 needs AVX2 and FMA (-mavx2 -mfma)"
#endif
#else
#error "QKV_VECTOR_BITS must be 512 or 256"
#endif

// One call of the kernel: n_items = n_groups × n_blocks sub-blocks, item = g·n_blocks + i.
// Element offsets of group g are q_off[g] ... (from the tensors' first elements); block i
// adds i·*_step. Row strides *_row. Block i reads nk + i·grow keys. mask: additive (0 / −inf),
// transposed (keys × m_row, m_row ≥ r rounded up to V) per item at mask + m_off[g] +
// i·m_step, or null; with tail > 0 it covers only the last `tail` keys of the span (the
// others all visible: a causal block's diagonal tile). out rows hold Dv floats (stride 1).
// native.py mirrors this layout in a ctypes Structure and checks it against
// qkv_native_layout() when it loads the library: one definition of the call, by name.
extern "C" struct qkv_native_job {
    const float *q, *k, *v, *mask;
    float *out, *lse;
    const int64_t *q_off, *k_off, *v_off, *m_off, *o_off, *l_off;
    int64_t n_items, n_blocks;
    int64_t q_step, k_step, v_step, m_step, o_step, l_step;
    int64_t q_row, k_row, v_row, m_row, o_row, l_row;
    int32_t r, nk, grow, tail, D, Dv;
    float scale;
    int32_t threads;
};

namespace {

constexpr int V = QKV_VECTOR_BITS / 32;
typedef float vf __attribute__((vector_size(4 * V)));
typedef float vfu __attribute__((vector_size(4 * V), aligned(4)));

inline vf load(const float *p) { return *reinterpret_cast<const vfu *>(p); }
inline void prefetch(const float *p) { _mm_prefetch(reinterpret_cast<const char *>(p), _MM_HINT_T1); }
inline void store(float *p, vf x) { *reinterpret_cast<vfu *>(p) = x; }

// ---- the per-ISA helpers ---------------------------------------------------------------
#if QKV_VECTOR_BITS == 512
typedef __m512 reg;

inline vf splat(float x) { return (vf)_mm512_set1_ps(x); }  // a broadcast load, no add

// round to the nearest integer; p · 2ⁿ where live, else 0
inline vf round_nearest(vf x) {
    return (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vf scale_live(vf p, vf n, vf x, float floor) {
    const __mmask16 live = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(floor), _CMP_NLT_UQ);
    return (vf)_mm512_maskz_scalef_ps(live, (__m512)p, (__m512)n);
}
// the first `count` floats at p (the rest 0), and stores of the first `count` lanes
inline reg load_part(const float *p, int count) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p);
}
inline void store_part(float *p, reg x, int count) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << count) - 1), x);
}
inline reg times(reg x, float s) { return _mm512_mul_ps(x, _mm512_set1_ps(s)); }
inline void store_stream(float *p, reg x) { _mm512_stream_ps(p, x); }
inline reg zero() { return _mm512_setzero_ps(); }

// Sixteen rows of sixteen floats transposed in registers: x[i][j] becomes x[j][i].
inline void transpose_tile(reg x[V]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved
        t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // then quadruples
        x[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        x[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        x[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        x[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)  // 128-bit lanes within eight rows
        for (int i = 0; i < 4; ++i) {
            t[h + i] = _mm512_shuffle_f32x4(x[h + i], x[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(x[h + i], x[h + i + 4], 0xDD);
        }
    for (int i = 0; i < 8; ++i) {  // and across the two halves
        x[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        x[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

// Most rows of A per product step with NV vectors of Y: AB·NV accumulators, NV vectors and
// a broadcast within the 32 vector registers.
constexpr int most_rows(int NV) { return NV == 4 ? 6 : NV == 2 ? 12 : 24; }
constexpr int WIDEST = 4;  // vectors of Y per product step, at most

#else  // AVX2 + FMA
typedef __m256 reg;

inline vf splat(float x) { return (vf)_mm256_set1_ps(x); }

inline vf round_nearest(vf x) {
    return (vf)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// 2ⁿ built in the exponent field: n is in [−126, 0] wherever x ≥ floor (≈ −87.3) and
// x ≤ 0, so (n + 127) << 23 is a normal float; lanes below the floor are cleared.
inline vf scale_live(vf p, vf n, vf x, float floor) {
    const __m256 live = _mm256_cmp_ps((__m256)x, _mm256_set1_ps(floor), _CMP_NLT_UQ);
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32((__m256)n), _mm256_set1_epi32(127)), 23);
    return (vf)_mm256_and_ps(_mm256_mul_ps((__m256)p, _mm256_castsi256_ps(e)), live);
}
inline __m256i first_lanes(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// (vmaskmovps stores are slow on AMD's cores: whole vectors go plain)
inline reg load_part(const float *p, int count) {
    return count == V ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(count));
}
inline void store_part(float *p, reg x, int count) {
    if (count == V)
        _mm256_storeu_ps(p, x);
    else
        _mm256_maskstore_ps(p, first_lanes(count), x);
}
inline reg times(reg x, float s) { return _mm256_mul_ps(x, _mm256_set1_ps(s)); }
inline void store_stream(float *p, reg x) { _mm256_stream_ps(p, x); }
inline reg zero() { return _mm256_setzero_ps(); }

// Eight rows of eight floats transposed in registers: x[i][j] becomes x[j][i].
inline void transpose_tile(reg x[V]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // then quadruples
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {  // and across the two 128-bit halves
        x[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        x[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

// 16 vector registers: AB·NV accumulators, NV vectors of Y and a broadcast.
constexpr int most_rows(int NV) { return NV == 4 ? 2 : NV == 2 ? 6 : 12; }
constexpr int WIDEST = 2;
#endif
// ----------------------------------------------------------------------------------------

// exp(x) in float32 for x ≤ 0 (scores minus their row max): x = n·ln2 + r, |r| ≤ ln2/2
// (ln2 in two parts, Cody-Waite), e^r by its degree-6 Taylor polynomial (relative error
// < 1.3e-7 there), times 2^n. Lanes below −87.33 (where e^x leaves the normal float range;
// −inf for a masked key) come out exactly 0, since denormal probabilities would slow every
// product that reads them; NaN compares "not less" and stays NaN.
inline vf vexp(vf x) {
    const vf n = round_nearest(x * splat(1.44269504088896341f));
    const vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vf p = splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    return scale_live(p, n, x, -87.33654f);
}

// C[a][0:NV·V] = Σ_{b < nb} A[a·sa + b·sb] · Y[b·ys + 0:NV·V]  for a < AB: AB scalars
// of A broadcast against NV vectors of Y per step, AB·NV accumulators in registers.
// SCORES: C holds scores (rows = keys): scale them (after the product, as torch's fused
// kernel does, so that its backward recomputes the same scores), set −inf where the mask
// rows M (if any, 0 / −inf) forbid, and raise the column max mx before storing.
// Otherwise the product is added to C.
template <int AB, int NV, bool SCORES>
inline void product(const float *A, int64_t sa, int64_t sb, const float *Y, int64_t ys, int nb,
                    float *C, int64_t cs, float scale, const float *M, int64_t ms, float *mx) {
    vf acc[AB][NV];
#pragma GCC unroll 16
    for (int a = 0; a < AB; ++a)
#pragma GCC unroll 4
        for (int u = 0; u < NV; ++u) acc[a][u] = SCORES ? vf{} : load(C + a * cs + u * V);
    for (int b = 0; b < nb; ++b) {
        vf y[NV];
#pragma GCC unroll 4
        for (int u = 0; u < NV; ++u) y[u] = load(Y + b * ys + u * V);
        const float *col = A + b * sb;
#pragma GCC unroll 16
        for (int a = 0; a < AB; ++a) {
            const vf x = splat(col[a * sa]);
#pragma GCC unroll 4
            for (int u = 0; u < NV; ++u) acc[a][u] += x * y[u];
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) {
        vf m;
        if constexpr (SCORES) m = load(mx + u * V);
#pragma GCC unroll 16
        for (int a = 0; a < AB; ++a) {
            vf c = acc[a][u];
            if constexpr (SCORES) {
                c *= splat(scale);
                if (M)  // a select, not an add: NaN or inf in a masked key stays out
                    c = load(M + a * ms + u * V) < splat(0.0f) ? splat(-INFINITY) : c;
                m = c > m ? c : m;
            }
            store(C + a * cs + u * V, c);
        }
        if constexpr (SCORES) store(mx + u * V, m);
    }
}

// Rows [0, na) of C in blocks of at most `most_rows(NV)` rows, sized evenly (64 = 10+10+
// 11+11+11+11 with two AVX-512 vectors), so that no block runs with too few accumulators
// to hide the multiply-add latency.
template <int NV, bool SCORES>
void product_rows(int na, const float *A, int64_t sa, int64_t sb, const float *Y, int64_t ys,
                  int nb, float *C, int64_t cs, float scale, const float *M, int64_t ms,
                  float *mx) {
    constexpr int most = most_rows(NV);
    const int blocks = (na + most - 1) / most;
    for (int blk = 0, a = 0; blk < blocks; ++blk) {
        const int rows = (na - a) / (blocks - blk);  // even split of what is left
        const float *Ma = M ? M + a * ms : nullptr;
        switch (rows) {
#define ROWS(k)                                                                      \
    case k:                                                                          \
        if constexpr (k <= most)                                                     \
            product<k, NV, SCORES>(A + a * sa, sa, sb, Y, ys, nb, C + a * cs, cs, scale, \
                                   Ma, ms, mx);                                      \
        break;
            ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) ROWS(9) ROWS(10)
            ROWS(11) ROWS(12) ROWS(13) ROWS(14) ROWS(15) ROWS(16) ROWS(17) ROWS(18) ROWS(19)
            ROWS(20) ROWS(21) ROWS(22) ROWS(23) ROWS(24)
#undef ROWS
            default:
                break;
        }
        a += rows;
    }
}

// C (na × rp) over all rp columns of Y: WIDEST vectors at a time, then fewer.
template <bool SCORES>
void product_all(int na, const float *A, int64_t sa, int64_t sb, const float *Y, int64_t rp,
                 int nb, float *C, float scale, const float *M, int64_t ms, float *mx) {
    int64_t u = 0;
    if constexpr (WIDEST == 4)
        for (; u + 4 * V <= rp; u += 4 * V)
            product_rows<4, SCORES>(na, A, sa, sb, Y + u, rp, nb, C + u, rp, scale,
                                    M ? M + u : M, ms, mx ? mx + u : mx);
    for (; u + 2 * V <= rp; u += 2 * V)
        product_rows<2, SCORES>(na, A, sa, sb, Y + u, rp, nb, C + u, rp, scale, M ? M + u : M,
                                ms, mx ? mx + u : mx);
    if (u < rp)
        product_rows<1, SCORES>(na, A, sa, sb, Y + u, rp, nb, C + u, rp, scale, M ? M + u : M,
                                ms, mx ? mx + u : mx);
}

// dst[c][a] = src[a][c] (· scale[c] when given) for a < na, c < nc, in V × V blocks
// transposed in registers; partial blocks load zeros and store only their part.
void transpose(const float *src, int64_t ss, int na, int nc, float *dst, int64_t ds,
               const float *scale = nullptr, bool stream = false) {
    for (int a0 = 0; a0 < na; a0 += V) {
        const int ra = na - a0 < V ? na - a0 : V;
        for (int c0 = 0; c0 < nc; c0 += V) {
            const int rc = nc - c0 < V ? nc - c0 : V;
            reg x[V];
            for (int i = 0; i < V; ++i)
                x[i] = i < ra ? load_part(src + (a0 + i) * ss + c0, rc) : zero();
            transpose_tile(x);
            for (int j = 0; j < rc; ++j) {
                const reg y = scale ? times(x[j], scale[c0 + j]) : x[j];
                float *to = dst + (c0 + j) * ds + a0;
                if (stream && ra == V && (reinterpret_cast<uintptr_t>(to) & (4 * V - 1)) == 0)
                    store_stream(to, y);  // a whole line: no read for ownership
                else
                    store_part(to, y, ra);
            }
        }
    }
}

// Rows of a block computed at a time: four vectors of queries (each broadcast element of
// K or V feeds four multiply-adds; measured 5% faster than two). Blocks with more rows
// run in chunks of this many, each against all of the block's keys.
constexpr int CHUNK = 4 * V;

// Keys per slice of the online softmax: the slice's scores (KEYS × CHUNK floats: 128 KiB
// with AVX-512, 64 KiB with AVX2) stay in L2 (benchmarks/tile_sizes.py --keys measures
// the alternatives).
#ifndef QKV_KEYS
#define QKV_KEYS 512
#endif
constexpr int KEYS = QKV_KEYS;

struct Buffers {
    // Qᵀ (D × CHUNK), Sᵀ of a slice (KEYS × CHUNK), Oᵀ (Dv × CHUNK); running max, sum and
    // the slice max (CHUNK each)
    float *qt, *st, *ot, *mx, *sum, *cmx;
};

// The online softmax over one slice of nk scores per query (NV vectors of queries):
// new running max m', Pᵀ = exp(Sᵀ − m') in place, l = α·l + Σ Pᵀ and Oᵀ ·= α with
// α = exp(m − m'). Rows of Sᵀ are walked in order, all NV vectors of a row at once.
template <int NV>
void softmax_slice(const Buffers &w, int nk, int Dv) {
    constexpr int rp = NV * V;
    vf ref[NV], alpha[NV], l[NV];
    for (int u = 0; u < NV; ++u) {
        const vf m = load(w.mx + u * V), top = load(w.cmx + u * V);
        const vf m_new = top > m ? top : m;
        ref[u] = m_new == splat(-INFINITY) ? splat(0.0f) : m_new;  // no key yet: exp(−inf) = 0
        alpha[u] = vexp(m - ref[u]);  // rescales what earlier slices summed
        l[u] = load(w.sum + u * V) * alpha[u];
        store(w.mx + u * V, m_new);
    }
    for (int j = 0; j < nk; ++j)
        for (int u = 0; u < NV; ++u) {
            const vf e = vexp(load(w.st + j * rp + u * V) - ref[u]);
            store(w.st + j * rp + u * V, e);
            l[u] += e;
        }
    for (int e = 0; e < Dv; ++e)
        for (int u = 0; u < NV; ++u)
            store(w.ot + e * rp + u * V, load(w.ot + e * rp + u * V) * alpha[u]);
    for (int u = 0; u < NV; ++u) store(w.sum + u * V, l[u]);
}

// One chunk of r ≤ CHUNK queries against nk keys: out (r × Dv, row stride o_row) and lse.
// mask: the chunk's first column of the item's transposed mask (row stride ms), or null.
void chunk(const float *qb, int64_t q_row, const float *kb, int64_t k_row, const float *vb,
           int64_t v_row, const float *mb, int64_t ms, int tail, float *ob, int64_t o_row,
           float *lb, int64_t l_row, int r, int nk, int D, int Dv, float scale,
           const Buffers &w) {
    const int64_t rp = (r + V - 1) / V * V;
    transpose(qb, q_row, r, D, w.qt, rp);
    // keys from `masked` on take the mask (all of them, or a causal block's last `tail`)
    const int masked = mb == nullptr ? nk : tail > 0 ? nk - tail : 0;
    for (int64_t u = 0; u < rp; u += V) {
        store(w.mx + u, splat(-INFINITY));
        store(w.sum + u, vf{});
    }
    std::memset(w.ot, 0, sizeof(float) * Dv * rp);
    // keys in slices of KEYS, merged by the online softmax (FlashAttention-2): the
    // slice's scores, probabilities and the output stay in L1
    const int slices = (nk + KEYS - 1) / KEYS;
    const int step = (nk + slices - 1) / slices;  // even slices: no short last one
    for (int c0 = 0; c0 < nk; c0 += step) {
        const int c1 = c0 + step < nk ? c0 + step : nk;
        // Sᵀ = scale · K · Qᵀ (+ mask), and the slice's max score per query: rows of K
        // broadcast against query vectors
        for (int64_t u = 0; u < rp; u += V) store(w.cmx + u, splat(-INFINITY));
        const int split = c0 > masked ? c0 : c1 < masked ? c1 : masked;  // in [c0, c1]
        if (split > c0)
            product_all<true>(split - c0, kb + c0 * k_row, k_row, 1, w.qt, rp, D, w.st, scale,
                              nullptr, 0, w.cmx);
        if (c1 > split)
            product_all<true>(c1 - split, kb + split * k_row, k_row, 1, w.qt, rp, D,
                              w.st + (split - c0) * rp, scale, mb ? mb + (split - masked) * ms : mb, ms,
                              w.cmx);
        if (rp == 4 * V)
            softmax_slice<4>(w, c1 - c0, Dv);
        else if (rp == 2 * V)
            softmax_slice<2>(w, c1 - c0, Dv);
        else if (rp == 3 * V)
            softmax_slice<3>(w, c1 - c0, Dv);
        else
            softmax_slice<1>(w, c1 - c0, Dv);
        // Oᵀ += Vᵀ · Pᵀ: columns of V broadcast against the probability vectors
        product_all<false>(Dv, vb + c0 * v_row, 1, v_row, w.st, rp, c1 - c0, w.ot, 1.0f,
                           nullptr, 0, nullptr);
    }
    for (int a = 0; a < r; ++a) {
        const float l = w.sum[a];
        lb[a * l_row] = l == 0 ? -INFINITY : w.mx[a] + std::log(l);
        w.sum[a] = l == 0 ? 0.0f : 1.0f / l;  // NaN stays NaN
    }
    transpose(w.ot, rp, Dv, r, ob, o_row, w.sum, true);
}

// Rows [c, c + CHUNK) of one item.
void run_unit(const qkv_native_job &j, int64_t item, int c, const Buffers &w) {
    const int64_t g = item / j.n_blocks, i = item % j.n_blocks;
    const float *qb = j.q + j.q_off[g] + i * j.q_step;
    const float *kb = j.k + j.k_off[g] + i * j.k_step;
    const float *vb = j.v + j.v_off[g] + i * j.v_step;
    const float *mb = j.mask ? j.mask + j.m_off[g] + i * j.m_step : nullptr;
    float *ob = j.out + j.o_off[g] + i * j.o_step;
    float *lb = j.lse + j.l_off[g] + i * j.l_step;
    const int nk = j.nk + (int)(i * j.grow);
    // ask for the next block's queries, and for the keys and values its span adds,
    // while this one computes (measured: a 256-key window 9% faster)
    if (i + 1 < j.n_blocks && c == 0) {
        const int rows = j.r < CHUNK ? j.r : CHUNK;
        for (int a = 0; a < rows; ++a)
            for (int d = 0; d < j.D; d += V) prefetch(qb + j.q_step + a * j.q_row + d);
        const int64_t fresh = j.k_row > 0 ? j.k_step / j.k_row : 0;  // keys it moves by
        for (int64_t key = nk - fresh; fresh > 0 && key < nk; ++key) {
            for (int d = 0; d < j.D; d += V) prefetch(kb + j.k_step + key * j.k_row + d);
            for (int d = 0; d < j.Dv; d += V) prefetch(vb + j.v_step + key * j.v_row + d);
        }
    }
    chunk(qb + c * j.q_row, j.q_row, kb, j.k_row, vb, j.v_row, mb ? mb + c : nullptr, j.m_row,
          j.tail, ob + c * j.o_row, j.o_row, lb + c * j.l_row, j.l_row,
          j.r - c < CHUNK ? j.r - c : CHUNK, nk, j.D, j.Dv, j.scale, w);
}

// This thread's work buffer of at least `floats` floats, or null. Kept between calls (the
// pool's threads live on; a fresh buffer per call cost page faults), freed at thread exit.
float *thread_buffer(size_t floats) {
    struct Buffer {
        float *data = nullptr;
        size_t size = 0;
        ~Buffer() { std::free(data); }
    };
    static thread_local Buffer buffer;
    if (floats > buffer.size) {
        std::free(buffer.data);
        buffer.data = static_cast<float *>(std::aligned_alloc(64, (floats * 4 + 63) / 64 * 64));
        buffer.size = buffer.data ? floats : 0;
    }
    return buffer.data;
}

}  // namespace

extern "C" {

// Floats per vector of this build (16: AVX-512, 8: AVX2).
int qkv_native_vector_floats() { return V; }

// sizeof(qkv_native_job) and the byte offset of each field in declaration order, for
// native.py to compare with its own Structure; returns the number of values written.
int qkv_native_layout(int64_t *out, int most) {
    const int64_t values[] = {
        (int64_t)sizeof(qkv_native_job),
#define AT(f) (int64_t) offsetof(qkv_native_job, f)
        AT(q), AT(k), AT(v), AT(mask), AT(out), AT(lse), AT(q_off), AT(k_off), AT(v_off),
        AT(m_off), AT(o_off), AT(l_off), AT(n_items), AT(n_blocks), AT(q_step), AT(k_step),
        AT(v_step), AT(m_step), AT(o_step), AT(l_step), AT(q_row), AT(k_row), AT(v_row),
        AT(m_row), AT(o_row), AT(l_row), AT(r), AT(nk), AT(grow), AT(tail), AT(D), AT(Dv),
        AT(scale), AT(threads),
#undef AT
    };
    const int n = (int)(sizeof(values) / sizeof(values[0]));
    for (int i = 0; i < n && i < most; ++i) out[i] = values[i];
    return n;
}

// Every item of the job in units of CHUNK rows (a job may have fewer blocks than
// threads), spread over job->threads threads of the OpenMP pool: in contiguous runs when
// the units are equal, one at a time when they grow (causal blocks).
// Loaded into a process that runs torch, libgomp is torch's own (same soname): these are
// the threads torch's operators use, and no second pool competes with them for the cores.
// Returns nonzero if a thread could not allocate its buffers.
int qkv_native_forward(const qkv_native_job *job_ptr) {
    const qkv_native_job &job = *job_ptr;
    const int D = job.D, Dv = job.Dv;
    const size_t floats = (size_t)CHUNK * (D + KEYS + Dv + 3);
    int failed = 0;
#pragma omp parallel num_threads(job.threads > 0 ? job.threads : 1) reduction(| : failed)
    {
        float *buf = thread_buffer(floats);
        if (buf) std::memset(buf, 0, floats * 4);  // padded query columns stay finite
        float *at = buf;
        auto take = [&at](int64_t n) { float *p = at; at += n * CHUNK; return p; };
        Buffers w{take(D), take(KEYS), take(Dv), take(1), take(1), take(1)};
        failed |= buf == nullptr;
        const int64_t per_item = (job.r + CHUNK - 1) / CHUNK, units = job.n_items * per_item;
        if (job.grow == 0) {  // equal units: contiguous runs, neighbours share their keys
#pragma omp for schedule(static)
            for (int64_t unit = 0; unit < units; ++unit)
                if (buf) run_unit(job, unit / per_item, (int)(unit % per_item) * CHUNK, w);
        } else {  // growing spans: one unit at a time to whichever thread is free
#pragma omp for schedule(dynamic, 1)
            for (int64_t unit = 0; unit < units; ++unit)
                if (buf) run_unit(job, unit / per_item, (int)(unit % per_item) * CHUNK, w);
        }
        _mm_sfence();  // the output's streaming stores are visible before anyone reads it
    }
    return failed;
}

}  // extern "C"
