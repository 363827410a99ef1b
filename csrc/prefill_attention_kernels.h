// One prefill-attention tile (prefill_attention.h, PrefillTile), written once with the native vector
// of the including file (lanes.h: zmm in prefill_attention_avx512.cpp, ymm in
// prefill_attention_avx2.cpp, SSE in prefill_attention.cpp). Internal linkage throughout.
//
// Both products of a tile are C (rows, cols) (+)= A (rows, kd) B (kd, cols) with B read by rows of
// vectors: the scores S = Qs Kt (kd = D, B = the transposed key block) and the output update
// acc += P V (kd = keys of the block, B = the value rows). A register tile holds MR rows x NR
// vectors of C; each step broadcasts one A element per row and loads NR vectors of B.
// The softmax step is the online update of decode_attention_kernels.h (exp_neg, the same
// vectorised exp), per row over the tile's columns.
#pragma once

#if defined(__SSE__)
#include <immintrin.h>
#endif
#include <limits>

#include "decode_attention_kernels.h"
#include "prefill_attention.h"

namespace sf {
// prefill_tile_impl<VT> is the PrefillTileFn of the including file's ISA (see prefill_attention.h).
namespace {

constexpr int kTileRows = 6;                  // MR: rows of C in registers
constexpr int kTileVecs = kVL == 16 ? 4 : 2;  // NR: vectors of C per row (24 / 12 accumulators)

inline vfl fmadd(vfl a, vfl b, vfl c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfl>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
#elif defined(__FMA__)
  return reinterpret_cast<vfl>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

// x in every lane, as one broadcast (vfl{} + x would add 0.0f first: it cannot fold, -0.0f + 0.0f is +0.0f)
inline vfl splat(float x) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfl>(_mm512_set1_ps(x));
#elif defined(__AVX__)
  return reinterpret_cast<vfl>(_mm256_set1_ps(x));
#elif defined(__SSE__)
  return reinterpret_cast<vfl>(_mm_set1_ps(x));
#else
  vfl a;
  for (int i = 0; i < kVL; ++i) a[i] = x;
  return a;
#endif
}

// C[0:M, 0:NR kVL] (+)= A[0:M, 0:kd] B[0:kd, 0:NR kVL]; B's element (k, c) at b0 + k * ldb + c.
template <VT V, int M, int NR>
inline void gemm_tile(const float* A, int64_t lda, const void* B, int64_t b0, int64_t ldb, int64_t kd, float* C,
                      int64_t ldc, bool add) {
  // the constant loops are unrolled so the M x NR accumulators live in registers
  vfl c[M][NR];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) c[m][r] = add ? *reinterpret_cast<const vflu_a*>(C + m * ldc + r * kVL) : vfl{};
  for (int64_t k = 0; k < kd; ++k) {
    vfl b[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) b[r] = ld_a<V>(B, b0 + k * ldb + r * kVL);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const vfl a = splat(A[m * lda + k]);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) c[m][r] = fmadd(a, b[r], c[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) *reinterpret_cast<vflu_a*>(C + m * ldc + r * kVL) = c[m][r];
}

template <VT V, int NR>
inline void gemm_rows(const float* A, int64_t lda, const void* B, int64_t b0, int64_t ldb, int64_t kd, float* C,
                      int64_t ldc, int64_t rows, bool add) {
  int64_t m = 0;
  for (; m + kTileRows <= rows; m += kTileRows) gemm_tile<V, kTileRows, NR>(A + m * lda, lda, B, b0, ldb, kd, C + m * ldc, ldc, add);
  switch (rows - m) {
    case 1: gemm_tile<V, 1, NR>(A + m * lda, lda, B, b0, ldb, kd, C + m * ldc, ldc, add); break;
    case 2: gemm_tile<V, 2, NR>(A + m * lda, lda, B, b0, ldb, kd, C + m * ldc, ldc, add); break;
    case 3: gemm_tile<V, 3, NR>(A + m * lda, lda, B, b0, ldb, kd, C + m * ldc, ldc, add); break;
    case 4: gemm_tile<V, 4, NR>(A + m * lda, lda, B, b0, ldb, kd, C + m * ldc, ldc, add); break;
    case 5: gemm_tile<V, 5, NR>(A + m * lda, lda, B, b0, ldb, kd, C + m * ldc, ldc, add); break;
    default: break;
  }
}

// C[0:rows, 0:cols] (+)= A[0:rows, 0:kd] B[0:kd, 0:cols]: NR-vector column panels, then single
// vectors, then scalar columns (cols % kVL).
template <VT V>
void gemm(const float* A, int64_t lda, const void* B, int64_t b0, int64_t ldb, int64_t kd, float* C, int64_t ldc,
          int64_t rows, int64_t cols, bool add) {
  int64_t c = 0;
  for (; c + kTileVecs * kVL <= cols; c += kTileVecs * kVL) gemm_rows<V, kTileVecs>(A, lda, B, b0 + c, ldb, kd, C + c, ldc, rows, add);
  for (; c + kVL <= cols; c += kVL) gemm_rows<V, 1>(A, lda, B, b0 + c, ldb, kd, C + c, ldc, rows, add);
  for (; c < cols; ++c) {
    for (int64_t m = 0; m < rows; ++m) {
      float a = add ? C[m * ldc + c] : 0.f;
      for (int64_t k = 0; k < kd; ++k) a += A[m * lda + k] * load_val<V>(B, b0 + k * ldb + c);
      C[m * ldc + c] = a;
    }
  }
}

template <VT V>
void prefill_tile_impl(const PrefillTile& t) {
  constexpr int64_t W = kPrefillBlock;
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t D = t.D, c0 = t.c0, c1 = t.c1;
  // scores of the tile's columns: S[:, c0:c1] = Qs Kt[:, c0:c1]
  gemm<VT::f32>(t.qs, D, t.kt, c0, W, D, t.s + c0, W, t.rows, c1 - c0, false);
  for (int64_t r = 0; r < t.rows; ++r) {
    float* sr = t.s + r * W;
    if (t.span) {
      const int32_t* sp = t.span + 4 * r;
      vi32_a col;
      for (int i = 0; i < kVL; ++i) col[i] = static_cast<int32_t>(c0) + i;
      for (int64_t c = c0; c < c1; c += kVL, col += kVL) {
        const auto keep = ((col >= sp[0]) & (col < sp[1])) | ((col >= sp[2]) & (col < sp[3]));
        const vfl x = *reinterpret_cast<const vflu_a*>(sr + c);
        *reinterpret_cast<vflu_a*>(sr + c) = keep ? x : vfl{} + ninf;
      }
    }
    vfl bmv = vfl{} + ninf;
    for (int64_t c = c0; c < c1; c += kVL) {
      const vfl x = *reinterpret_cast<const vflu_a*>(sr + c);
      bmv = x > bmv ? x : bmv;  // a NaN score is skipped here and propagates through exp below
    }
    const float bm = hmax_vfl(bmv);
    const float m_new = t.m[r] > bm ? t.m[r] : bm;
    if (m_new == ninf) {  // nothing allowed in this row yet: no probability mass
      for (int64_t c = c0; c < c1; ++c) sr[c] = 0.f;
      continue;
    }
    const float corr = t.m[r] == ninf ? 0.f : exp_neg1(t.m[r] - m_new);
    vfl lsum = vfl{};
    for (int64_t c = c0; c < c1; c += kVL) {
      const vfl p = exp_neg(*reinterpret_cast<const vflu_a*>(sr + c) - m_new);
      *reinterpret_cast<vflu_a*>(sr + c) = p;
      lsum += p;
    }
    t.l[r] = t.l[r] * corr + hsum_vfl(lsum);
    t.m[r] = m_new;
    if (corr != 1.f) {
      float* ar = t.acc + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] *= corr;
    }
  }
  // acc += P[:, c0:kv_cols] V[k0 + c0 : k0 + kv_cols]
  if (t.kv_cols > c0) gemm<V>(t.s + c0, W, t.v, (t.k0 + c0) * D, D, t.kv_cols - c0, t.acc, D, t.rows, D, true);
}

}  // namespace
}  // namespace sf

// The kernel table of prefill_attention.h for the including file's ISA: `namespace <isa> { SF_DEFINE_PREFILL_ATTENTION_KERNELS }`.
#define SF_DEFINE_PREFILL_ATTENTION_KERNELS                                  \
  extern const PrefillTileFn prefill_tile_f32 = prefill_tile_impl<VT::f32>;  \
  extern const PrefillTileFn prefill_tile_bf16 = prefill_tile_impl<VT::bf16>;
