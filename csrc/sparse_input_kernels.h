// Sparse-input linear kernels (sparse_input.h), written once with the native vector of the including
// file (lanes.h: zmm in sparse_input_avx512.cpp, ymm in sparse_input_avx2.cpp, SSE in
// sparse_input.cpp). Internal linkage throughout; kSparseInputKernels is the including file's
// SparseInputKernels.
//
// compact: threshold test and compaction of the active channels (AVX-512: vcmpps into a mask, then
//   vpcompressd / vcompressps store the indices and values; elsewhere a branch-free scalar loop).
// gemv_tile: acc[tile] += xv[k] * W[idx[k], tile], eight active channels per pass over the tile, so
//   per vector of outputs: eight weight loads (each weight read once), one load and one store of the
//   partial sums (which stay in L1); each channel streams one contiguous run of cw weights.
// gemm_tile: y[rows, tile] += xm[rows, k0:k1] @ W[k0:k1, tile], register blocked: kMr rows times
//   kNq vectors of accumulators, one broadcast of x and kNq weight vectors per channel.
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "lanes.h"
#include "sparse_input.h"

namespace sf {
namespace {

typedef float vflu_si __attribute__((vector_size(kVL * 4), aligned(4)));     // unaligned float vector
typedef uint16_t vbf_si __attribute__((vector_size(kVL * 2), aligned(2)));   // kVL bfloat16 values
typedef uint32_t vu32_si __attribute__((vector_size(kVL * 4)));

#if defined(__AVX512F__)
constexpr int kNq = 4;  // accumulator vectors per row of a GEMM block (32 zmm registers)
#else
constexpr int kNq = 2;  // (16 ymm / xmm registers)
#endif
constexpr int kMr = 6;  // rows of a GEMM block

inline vfl si_load(const float* p) { return *reinterpret_cast<const vflu_si*>(p); }
inline void si_store(float* p, vfl v) { *reinterpret_cast<vflu_si*>(p) = v; }

// kVL weights at element offset `off` of w, as float32 (bf16: the bits shifted into the high half)
template <VT V>
inline vfl si_weights(const void* w, int64_t off) {
  if constexpr (V == VT::f32) {
    return si_load(static_cast<const float*>(w) + off);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w) + off;
#if defined(__AVX512F__)
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return reinterpret_cast<vfl>(_mm512_slli_epi32(u, 16));
#elif defined(__AVX2__)
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return reinterpret_cast<vfl>(_mm256_slli_epi32(u, 16));
#else
    const vbf_si h = *reinterpret_cast<const vbf_si*>(p);
    return reinterpret_cast<vfl>(__builtin_convertvector(h, vu32_si) << 16);
#endif
  }
}

// *p in every lane (a broadcast load: no shuffle-port uop)
inline vfl si_bcast(const float* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfl>(_mm512_set1_ps(*p));
#elif defined(__AVX__)
  return reinterpret_cast<vfl>(_mm256_broadcast_ss(p));
#else
  const float v = *p;
  return vfl{v, v, v, v};
#endif
}

// a * b + c, fused where the ISA has FMA
inline vfl si_fma(vfl a, vfl b, vfl c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfl>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
#elif defined(__FMA__) && defined(__AVX__)
  return reinterpret_cast<vfl>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

int64_t compact_impl(const float* x, int64_t in, const float* thr, bool per_channel, int32_t* idx, float* xv) {
  int64_t n = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 t_all = _mm512_set1_ps(thr[0]);
  __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= in; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512 t = per_channel ? _mm512_loadu_ps(thr + i) : t_all;
    // active = not (|x| <= t): unordered (NaN) counts as active
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_and_ps(v, abs_mask), t, _CMP_NLE_UQ);
    _mm512_mask_compressstoreu_epi32(idx + n, m, lanes);
    _mm512_mask_compressstoreu_ps(xv + n, m, v);
    n += __builtin_popcount(static_cast<unsigned>(m));
    lanes = _mm512_add_epi32(lanes, _mm512_set1_epi32(16));
  }
#endif
  for (; i < in; ++i) {
    const float t = per_channel ? thr[i] : thr[0];
    idx[n] = static_cast<int32_t>(i);
    xv[n] = x[i];
    n += !(__builtin_fabsf(x[i]) <= t);
  }
  return n;
}

// acc[0:cw] += sum_k xv[k] * W[idx[k], j0:j0 + cw], G active channels per pass over the tile: per
// output vector G weight loads and one load + store of the partial sums. G = 8 with no software
// prefetch measured best (fp32 4096x11008 + 11008x4096, 2 threads, loaded machine: dense-input time
// 0.98-0.99x torch dense against 1.10-1.21x for G = 4 or prefetching the next group's rows).
template <VT V, int G>
void gemv_tile_t(const void* w, int64_t ld, const int32_t* idx, const float* xv, int64_t n, int64_t j0, int64_t cw,
                 float* acc) {
  const int64_t cv = cw - cw % kVL;  // columns done by vectors
  int64_t k = 0;
  for (; k + G <= n; k += G) {
    int64_t o[G];
    vfl xk[G];
    for (int g = 0; g < G; ++g) {
      o[g] = idx[k + g] * ld + j0;
      xk[g] = si_bcast(xv + k + g);
    }
    for (int64_t j = 0; j < cv; j += kVL) {
      vfl v = si_load(acc + j);
      for (int g = 0; g < G; ++g) v = si_fma(xk[g], si_weights<V>(w, o[g] + j), v);
      si_store(acc + j, v);
    }
    for (int64_t j = cv; j < cw; ++j) {
      float v = acc[j];
      for (int g = 0; g < G; ++g) v += xv[k + g] * load_val<V>(w, o[g] + j);
      acc[j] = v;
    }
  }
  for (; k < n; ++k) {
    const int64_t o = idx[k] * ld + j0;
    const vfl xk = si_bcast(xv + k);
    int64_t j = 0;
    for (; j < cv; j += kVL) si_store(acc + j, si_fma(xk, si_weights<V>(w, o + j), si_load(acc + j)));
    for (; j < cw; ++j) acc[j] += xv[k] * load_val<V>(w, o + j);
  }
}

void gemv_tile_impl(const void* w, VT vt, int64_t ld, const int32_t* idx, const float* xv, int64_t n, int64_t j0,
                    int64_t cw, float* acc) {
  if (vt == VT::f32) {
    gemv_tile_t<VT::f32, 8>(w, ld, idx, xv, n, j0, cw, acc);
  } else {
    gemv_tile_t<VT::bf16, 8>(w, ld, idx, xv, n, j0, cw, acc);
  }
}

// y[0:MR, j:j + NQ * kVL] += xm[0:MR, k0:k1] @ W[k0:k1, j:j + NQ * kVL]
template <int MR, int NQ, VT V>
inline void gemm_micro(const void* w, int64_t ld, const float* xm, int64_t xld, int64_t k0, int64_t k1, int64_t j,
                       float* y, int64_t yld) {
  vfl acc[MR][NQ];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NQ; ++q) acc[r][q] = si_load(y + r * yld + j + q * kVL);
  for (int64_t k = k0; k < k1; ++k) {
    vfl wv[NQ];
    for (int q = 0; q < NQ; ++q) wv[q] = si_weights<V>(w, k * ld + j + q * kVL);
    for (int r = 0; r < MR; ++r) {
      const vfl xb = si_bcast(xm + r * xld + k);
      for (int q = 0; q < NQ; ++q) acc[r][q] = si_fma(xb, wv[q], acc[r][q]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NQ; ++q) si_store(y + r * yld + j + q * kVL, acc[r][q]);
}

template <int MR, VT V>
void gemm_rows(const void* w, int64_t ld, const float* xm, int64_t xld, int64_t k0, int64_t k1, int64_t j0, int64_t cw,
               float* y, int64_t yld) {
  constexpr int64_t kNr = kNq * kVL;
  int64_t j = j0;
  for (; j + kNr <= j0 + cw; j += kNr) gemm_micro<MR, kNq, V>(w, ld, xm, xld, k0, k1, j, y, yld);
  for (; j + kVL <= j0 + cw; j += kVL) gemm_micro<MR, 1, V>(w, ld, xm, xld, k0, k1, j, y, yld);
  for (; j < j0 + cw; ++j) {
    for (int r = 0; r < MR; ++r) {
      float v = y[r * yld + j];
      for (int64_t k = k0; k < k1; ++k) v += xm[r * xld + k] * load_val<V>(w, k * ld + j);
      y[r * yld + j] = v;
    }
  }
}

template <VT V>
void gemm_tile_t(const void* w, int64_t ld, const float* xm, int64_t xld, int64_t rows, int64_t k0, int64_t k1,
                 int64_t j0, int64_t cw, float* y, int64_t yld) {
  int64_t r = 0;
  for (; r + kMr <= rows; r += kMr) gemm_rows<kMr, V>(w, ld, xm + r * xld, xld, k0, k1, j0, cw, y + r * yld, yld);
  const float* xr = xm + r * xld;
  float* yr = y + r * yld;
  switch (rows - r) {
    case 1: gemm_rows<1, V>(w, ld, xr, xld, k0, k1, j0, cw, yr, yld); break;
    case 2: gemm_rows<2, V>(w, ld, xr, xld, k0, k1, j0, cw, yr, yld); break;
    case 3: gemm_rows<3, V>(w, ld, xr, xld, k0, k1, j0, cw, yr, yld); break;
    case 4: gemm_rows<4, V>(w, ld, xr, xld, k0, k1, j0, cw, yr, yld); break;
    case 5: gemm_rows<5, V>(w, ld, xr, xld, k0, k1, j0, cw, yr, yld); break;
    default: break;
  }
}

void gemm_tile_impl(const void* w, VT vt, int64_t ld, const float* xm, int64_t xld, int64_t rows, int64_t k0,
                    int64_t k1, int64_t j0, int64_t cw, float* y, int64_t yld) {
  if (vt == VT::f32) {
    gemm_tile_t<VT::f32>(w, ld, xm, xld, rows, k0, k1, j0, cw, y, yld);
  } else {
    gemm_tile_t<VT::bf16>(w, ld, xm, xld, rows, k0, k1, j0, cw, y, yld);
  }
}

constexpr SparseInputKernels kSparseInputKernels{compact_impl, gemv_tile_impl, gemm_tile_impl};

}  // namespace
}  // namespace sf
