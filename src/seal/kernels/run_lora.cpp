// The low-rank terms of K LoRA adapters over runs of tokens, forward and backward, in bf16
// with fp32 accumulation, for CPUs with AVX512-BF16 (`vdpbf16ps`).
//
// Why by hand: on a CPU a training pass of a small model goes through its adapters as runs
// of consecutive tokens (one run per adapter's sequence, see seal/lora.py `_RunLoRA`); each
// run costs six small products (x A, xa B forward; g B^T, xa^T g, x^T gxa, gxa A^T backward)
// of ~1-4 MFLOP each. Through torch.mm each costs 15-40 us against 7-19 us of arithmetic at
// the bf16 peak, and in a SmolLM2 epoch of 8 adapters the runs took ~30% of the time
// (docs/benchmarks.md, session 19). Here one call does every run of one layer: the adapter
// weights are cast from their fp32 masters straight into the pair-interleaved ("VNNI")
// layout `vdpbf16ps` reads, and the weight gradients come back in fp32, so neither the casts
// of the masters nor of their gradients are separate tensor operations.
//
// Layout: x [n, in], y [n, out], xa [n, r], g [n, out], gx [n, in] bf16 row-major;
// A [K, in, r], B [K, r, out], gA, gB fp32 row-major (the masters and their gradients);
// runs: n_runs triples (start, end, slot) of token rows, sorted, not overlapping.
// Built by seal/cpu_kernels.py with g++ and loaded with ctypes (plain C ABI, no torch headers).

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

typedef uint16_t bf16;

namespace {

enum Epilogue { STORE_BF16 = 0, ADD_BF16 = 1, STORE_F32 = 2, ADD_F32 = 3 };

inline __m512 load_bf16(const bf16* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

inline void store_bf16(bf16* p, __m512 v) {
    _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
}

inline void epilogue(void* c, __m512 acc, int epi, float s) {
    __m512 vs = _mm512_set1_ps(s);
    switch (epi) {
        case STORE_BF16: store_bf16((bf16*)c, _mm512_mul_ps(acc, vs)); break;
        case ADD_BF16: store_bf16((bf16*)c, _mm512_fmadd_ps(acc, vs, load_bf16((bf16*)c))); break;
        case STORE_F32: _mm512_storeu_ps((float*)c, _mm512_mul_ps(acc, vs)); break;
        default: _mm512_storeu_ps((float*)c, _mm512_fmadd_ps(acc, vs, _mm512_loadu_ps((float*)c)));
    }
}

// C[MB rows, NB*16 cols] (epi)= s * sum_p pair(A)[i, p] . Bp[p, cols]: the pair of row i and
// pair p of the left operand is the uint32 at Ap[i * sam + p * sap] (two bf16 along the
// reduction), Bp is [K2][ldb] uint32 (VNNI: two consecutive reduction rows interleaved).
template <int MB, int NB>
inline void tile(const uint32_t* Ap, size_t sam, size_t sap, const uint32_t* Bp, size_t ldb,
                 int K2, char* C, size_t ldc_bytes, size_t elt, int epi, float s) {
    __m512 acc[MB][NB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    for (int p = 0; p < K2; p++) {
        __m512bh b[NB];
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) b[j] = (__m512bh)_mm512_loadu_si512(Bp + p * ldb + j * 16);
        const uint32_t* a = Ap + p * sap;
#pragma GCC unroll 16
        for (int i = 0; i < MB; i++) {
            __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[i * sam]);
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, b[j]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) epilogue(C + i * ldc_bytes + j * 16 * elt, acc[i][j], epi, s);
}

template <int NB, int MB>
inline void tile_rows(int rows, const uint32_t* Ap, size_t sam, size_t sap, const uint32_t* Bp,
                      size_t ldb, int K2, char* C, size_t ldc_bytes, size_t elt, int epi,
                      float s) {
    if (rows == MB) {
        tile<MB, NB>(Ap, sam, sap, Bp, ldb, K2, C, ldc_bytes, elt, epi, s);
    } else if constexpr (MB > 1) {
        tile_rows<NB, MB - 1>(rows, Ap, sam, sap, Bp, ldb, K2, C, ldc_bytes, elt, epi, s);
    }
}

// C [M, N] (epi)= s * A . B; N a multiple of 16; elt: bytes of a C element.
void gemm(int M, int N, int K2, const uint32_t* Ap, size_t sam, size_t sap, const uint32_t* Bp,
          void* Cv, size_t ldc, int epi, float s) {
    size_t elt = (epi == STORE_BF16 || epi == ADD_BF16) ? 2 : 4;
    char* C = (char*)Cv;
    int n0 = 0;
    for (; n0 + 64 <= N; n0 += 64)
        for (int m0 = 0; m0 < M; m0 += 6)
            tile_rows<4, 6>(M - m0 < 6 ? M - m0 : 6, Ap + m0 * sam, sam, sap, Bp + n0, N, K2,
                            C + (m0 * ldc + n0) * elt, ldc * elt, elt, epi, s);
    for (; n0 + 32 <= N; n0 += 32)
        for (int m0 = 0; m0 < M; m0 += 12)
            tile_rows<2, 12>(M - m0 < 12 ? M - m0 : 12, Ap + m0 * sam, sam, sap, Bp + n0, N, K2,
                             C + (m0 * ldc + n0) * elt, ldc * elt, elt, epi, s);
    for (; n0 + 16 <= N; n0 += 16)
        for (int m0 = 0; m0 < M; m0 += 8)
            tile_rows<1, 8>(M - m0 < 8 ? M - m0 : 8, Ap + m0 * sam, sam, sap, Bp + n0, N, K2,
                            C + (m0 * ldc + n0) * elt, ldc * elt, elt, epi, s);
}

inline uint32_t f2bf(float f) {  // round to nearest even, as torch's cast
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// dst [K/2][N] uint32 = s * src [K][N] fp32, rows 2p and 2p+1 interleaved (K even).
void pack_rows_f32(const float* src, int K, int N, float s, uint32_t* dst) {
    __m512 vs = _mm512_set1_ps(s);
    for (int p = 0; p < K / 2; p++) {
        const float* r0 = src + (size_t)(2 * p) * N;
        const float* r1 = r0 + N;
        uint32_t* d = dst + (size_t)p * N;
        int n = 0;
        for (; n + 16 <= N; n += 16) {
            __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(r0 + n), vs));
            __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(r1 + n), vs));
            __m512i v = _mm512_or_si512(_mm512_cvtepu16_epi32(lo),
                                        _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
            _mm512_storeu_si512(d + n, v);
        }
        for (; n < N; n++) d[n] = f2bf(r0[n] * s) | (f2bf(r1[n] * s) << 16);
    }
}

// dst [K/2][N] uint32 = s * src^T interleaved, src [N][K] fp32: dst[p][n] = (src[n][2p],
// src[n][2p+1]) (K even). Blocks of 16 pairs of 16 rows go through a small transposed tile.
void pack_cols_f32(const float* src, int N, int K, float s, uint32_t* dst) {
    __m512 vs = _mm512_set1_ps(s);
    int K2 = K / 2;
    alignas(64) uint32_t t[16][16];
    for (int n0 = 0; n0 < N; n0 += 16) {
        int nn = N - n0 < 16 ? N - n0 : 16;
        for (int p0 = 0; p0 < K2; p0 += 16) {
            int pp = K2 - p0 < 16 ? K2 - p0 : 16;
            for (int i = 0; i < nn; i++) {
                const float* row = src + (size_t)(n0 + i) * K + 2 * p0;
                if (pp == 16) {
                    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(row + 16), vs),
                                                     _mm512_mul_ps(_mm512_loadu_ps(row), vs));
                    _mm512_store_si512(t[i], (__m512i)v);
                } else {
                    for (int q = 0; q < pp; q++)
                        t[i][q] = f2bf(row[2 * q] * s) | (f2bf(row[2 * q + 1] * s) << 16);
                }
            }
            for (int q = 0; q < pp; q++) {
                uint32_t* d = dst + (size_t)(p0 + q) * N + n0;
                for (int i = 0; i < nn; i++) d[i] = t[i][q];
            }
        }
    }
}

// dst [ceil(T/2)][N] uint32: bf16 rows 2p and 2p+1 of src [T][N] interleaved, a zero row
// after an odd last one.
void pack_rows_bf16(const bf16* src, int T, int N, uint32_t* dst) {
    for (int p = 0; p < (T + 1) / 2; p++) {
        const bf16* r0 = src + (size_t)(2 * p) * N;
        uint32_t* d = dst + (size_t)p * N;
        if (2 * p + 1 < T) {
            const bf16* r1 = r0 + N;
            int n = 0;
            for (; n + 16 <= N; n += 16) {
                __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r0 + n)));
                __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r1 + n)));
                _mm512_storeu_si512(d + n, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
            for (; n < N; n++) d[n] = (uint32_t)r0[n] | ((uint32_t)r1[n] << 16);
        } else {
            for (int n = 0; n < N; n++) d[n] = r0[n];
        }
    }
}

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}

struct Scratch {
    std::vector<uint32_t> w1, w2, gp, xp, xap, gxap;
    std::vector<bf16> gxa;
    std::vector<int> packed;
};
thread_local Scratch S;

}  // namespace

extern "C" {

// y[s:e] += scaling * x[s:e] A_k B_k and xa[s:e] = bf16(x[s:e] A_k) for each run (s, e, k).
void seal_run_lora_forward(const bf16* x, bf16* y, bf16* xa, const float* A, const float* B,
                           const int64_t* runs, int n_runs, int K, int in, int out, int r,
                           float scaling) {
    size_t wa = (size_t)in * r / 2, wb = (size_t)r * out / 2;
    uint32_t* ap = grow(S.w1, (size_t)K * wa);  // VNNI A_k: [in/2][r]
    uint32_t* bp = grow(S.w2, (size_t)K * wb);  // VNNI B_k: [r/2][out]
    int* packed = grow(S.packed, (size_t)K);
    memset(packed, 0, sizeof(int) * K);
    for (int j = 0; j < n_runs; j++) {
        int64_t s = runs[3 * j], e = runs[3 * j + 1], k = runs[3 * j + 2];
        if (!packed[k]) {
            pack_rows_f32(A + (size_t)k * in * r, in, r, 1.0f, ap + k * wa);
            pack_rows_f32(B + (size_t)k * r * out, r, out, 1.0f, bp + k * wb);
            packed[k] = 1;
        }
        int T = (int)(e - s);
        gemm(T, r, in / 2, (const uint32_t*)(x + s * in), in / 2, 1, ap + k * wa, xa + s * r, r,
             STORE_BF16, 1.0f);
        gemm(T, out, r / 2, (const uint32_t*)(xa + s * r), r / 2, 1, bp + k * wb, y + s * out,
             out, ADD_BF16, scaling);
    }
}

// The gradients of the forward above given g = d loss / d y: gx (every row: zero outside the
// runs; may be null), gA and gB (fp32, every slot: zero for slots without a run).
void seal_run_lora_backward(const bf16* g, const bf16* x, const bf16* xa, const float* A,
                            const float* B, bf16* gx, float* gA, float* gB, const int64_t* runs,
                            int n_runs, int64_t n_tokens, int K, int in, int out, int r,
                            float scaling) {
    size_t wa = (size_t)r * in / 2, wb = (size_t)out * r / 2;
    uint32_t* atp = grow(S.w1, (size_t)K * wa);  // VNNI A_k^T: [r/2][in]
    uint32_t* btp = grow(S.w2, (size_t)K * wb);  // VNNI (scaling B_k)^T: [out/2][r]
    int* seen = grow(S.packed, (size_t)K);
    memset(seen, 0, sizeof(int) * K);
    int64_t tmax = 0, at = 0;
    for (int j = 0; j < n_runs; j++) {
        int64_t s = runs[3 * j], e = runs[3 * j + 1];
        if (e - s > tmax) tmax = e - s;
        if (gx && s > at) memset(gx + at * in, 0, sizeof(bf16) * (s - at) * in);
        at = e;
    }
    if (gx && n_tokens > at) memset(gx + at * in, 0, sizeof(bf16) * (n_tokens - at) * in);
    size_t t2 = (size_t)(tmax + 1) / 2;
    uint32_t* gp = grow(S.gp, t2 * out);
    uint32_t* xp = grow(S.xp, t2 * in);
    uint32_t* xap = grow(S.xap, t2 * r);
    uint32_t* gxap = grow(S.gxap, t2 * r);
    bf16* gxa = grow(S.gxa, (size_t)tmax * r);
    for (int j = 0; j < n_runs; j++) {
        int64_t s = runs[3 * j], e = runs[3 * j + 1], k = runs[3 * j + 2];
        int T = (int)(e - s), T2 = (T + 1) / 2;
        int first = !seen[k];
        if (first) {
            pack_cols_f32(A + (size_t)k * in * r, in, r, 1.0f, atp + k * wa);
            pack_cols_f32(B + (size_t)k * r * out, r, out, scaling, btp + k * wb);
            seen[k] = 1;
        }
        // gxa = g (s B)^T: d loss / d (x A), the scaling included
        gemm(T, r, out / 2, (const uint32_t*)(g + s * out), out / 2, 1, btp + k * wb, gxa, r,
             STORE_BF16, 1.0f);
        pack_rows_bf16(g + s * out, T, out, gp);
        pack_rows_bf16(x + s * in, T, in, xp);
        pack_rows_bf16(xa + s * r, T, r, xap);
        pack_rows_bf16(gxa, T, r, gxap);
        // gB_k (+)= s xa^T g; gA_k (+)= x^T gxa: the left operands' pairs run along the tokens
        gemm(r, out, T2, xap, 1, r, gp, gB + (size_t)k * r * out, out,
             first ? STORE_F32 : ADD_F32, scaling);
        gemm(in, r, T2, xp, 1, in, gxap, gA + (size_t)k * in * r, r, first ? STORE_F32 : ADD_F32,
             1.0f);
        if (gx)
            gemm(T, in, r / 2, (const uint32_t*)gxa, r / 2, 1, atp + k * wa, gx + s * in, in,
                 STORE_BF16, 1.0f);
    }
    for (int k = 0; k < K; k++)
        if (!seen[k]) {
            memset(gA + (size_t)k * in * r, 0, sizeof(float) * in * r);
            memset(gB + (size_t)k * r * out, 0, sizeof(float) * r * out);
        }
}

}  // extern "C"
