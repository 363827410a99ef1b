// bf16x3 GEMM (gemm_bf16x3.h): splitting and packing, the scalar block, path choice and the
// threaded driver. The AMX block and the vectorised split live in gemm_bf16x3_amx.cpp.
#include "gemm_bf16x3.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "common.h"
#include "linear_bf16.h"
#include "threadpool.h"

namespace sf {

#if defined(SF_HAVE_AMX_KERNELS)
namespace amx {
void bf16x3_split_run(const float* src, int64_t n, uint16_t* hi, uint16_t* lo);
void bf16x3_pack_a_tile(const float* src, int64_t rs, uint16_t* hi, uint16_t* lo);
void bf16x3_pack_b_tile(const float* src, int64_t rs, uint16_t* hi, uint16_t* lo);
}  // namespace amx
#endif

namespace {

constexpr int64_t kTileElems = 16 * 32;  // uint16 per packed tile

// subnormal float32 -> signed zero (vcvtneps2bf16 reads its inputs so)
inline float daz(float x) { return std::fabs(x) < 1.17549435e-38f ? std::copysign(0.f, x) : x; }

// x -> hi = bf16(x), lo = bf16(x - hi), round to nearest even, subnormal inputs read as zero;
// lo of inf / NaN is 0
inline void split_one(float x, uint16_t& hi, uint16_t& lo) {
  hi = f32_to_bf16(daz(x));
  const float hf = bf16_to_f32(hi);
  lo = std::isfinite(hf) ? f32_to_bf16(daz(daz(x) - hf)) : uint16_t{0};
}

void split_run_scalar(const float* src, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < n; ++i) split_one(src[i], hi[i], lo[i]);
}

using SplitRun = void (*)(const float*, int64_t, uint16_t*, uint16_t*);

// the vectorised split where this CPU has AVX512_BF16 (the AMX build's file), else the scalar one;
// both round to nearest even, read subnormals as zero and give identical bits
SplitRun split_run() {
#if defined(SF_HAVE_AMX_KERNELS)
  static const bool vec = bf16_path_supported(Bf16Path::avx512_bf16);
  if (vec) return amx::bf16x3_split_run;
#endif
  return split_run_scalar;
}

// element (r, c) of the source, 0 outside (rows, cols)
inline const float* row_ptr(const float* src, int64_t r, int64_t rs) { return src + r * rs; }

// W columns [c0, c0 + W) of source row r (zero past rows / cols) -> buf: an A tile row (W = 32 k)
// or one k row of a B tile (W = 16 columns)
template <int W>
inline void gather(const float* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, int64_t r, int64_t c0,
                   float* buf) {
  if (r >= rows) {
    std::memset(buf, 0, W * sizeof(float));
    return;
  }
  const float* p = row_ptr(src, r, rs);
  const int64_t n = max64(0, min64(W, cols - c0));
  if (cs == 1) {
    std::memcpy(buf, p + c0, static_cast<size_t>(n) * sizeof(float));
  } else {
    for (int64_t c = 0; c < n; ++c) buf[c] = p[(c0 + c) * cs];
  }
  for (int64_t c = n; c < W; ++c) buf[c] = 0.f;
}

void check_sizes(int64_t a, int64_t b, const char* what) {
  if (a < 0 || b < 0) {
    throw std::invalid_argument(std::string("bf16x3 ") + what + ": negative size (" + std::to_string(a) + ", " +
                                std::to_string(b) + ")");
  }
}

// the scalar block: the same three products over the packed tiles, float32 multiply-add in k order
void block_scalar(const uint16_t* a_hi, const uint16_t* a_lo, const uint16_t* b_hi, const uint16_t* b_lo,
                  int64_t a_next, int64_t b_next, int64_t ks, float* acc, bool load) {
  if (!load)
    for (int64_t i = 0; i < 32 * 32; ++i) acc[i] = 0.f;
  const uint16_t* as[3] = {a_hi, a_lo, a_hi};
  const uint16_t* bs[3] = {b_hi, b_hi, b_lo};
  for (int part = 0; part < 3; ++part) {
    for (int64_t s = 0; s < ks; ++s) {
      for (int64_t m = 0; m < 32; ++m) {
        const uint16_t* at = as[part] + (m / 16) * a_next + s * kTileElems + (m % 16) * 32;
        for (int64_t n = 0; n < 32; ++n) {
          const uint16_t* bt = bs[part] + (n / 16) * b_next + s * kTileElems + (n % 16) * 2;
          float sum = 0.f;
          for (int64_t k = 0; k < 32; ++k) sum += bf16_to_f32(at[k]) * bf16_to_f32(bt[(k / 2) * 32 + (k % 2)]);
          acc[m * 32 + n] += sum;
        }
      }
    }
  }
}

struct Aligned {
  explicit Aligned(size_t bytes) {
    p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
  }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  ~Aligned() { std::free(p); }
  void* p;
};

}  // namespace

void bf16x3_split(const float* src, int64_t n, uint16_t* hi, uint16_t* lo) {
  check_sizes(n, 0, "split");
  split_run()(src, n, hi, lo);
}

namespace {
// fill(t, s, hi tile, lo tile) for every packed tile: t the 16-row (A) / 16-column (B) tile, s the
// k-step of 32; tiles t in parallel
template <class Fill>
void for_tiles(int64_t nt, int64_t ks, uint16_t* hi, uint16_t* lo, bool parallel, Fill&& fill) {
  parallel_for(
      nt,
      [&](int64_t t, int) {
        for (int64_t s = 0; s < ks; ++s) fill(t, s, hi + (t * ks + s) * kTileElems, lo + (t * ks + s) * kTileElems);
      },
      parallel && nt > 1);
}
}  // namespace

void bf16x3_pack_a(const float* src, int64_t M, int64_t K, int64_t rs, int64_t cs, uint16_t* hi, uint16_t* lo,
                   bool parallel) {
  check_sizes(M, K, "pack_a");
  const SplitRun split = split_run();
  [[maybe_unused]] const bool fast = cs == 1 && split != split_run_scalar;  // whole tiles of unit-stride rows: vector packer
  for_tiles(x3_round(M) / 16, x3_round(K) / 32, hi, lo, parallel, [&](int64_t t, int64_t s, uint16_t* h, uint16_t* l) {
#if defined(SF_HAVE_AMX_KERNELS)
    if (fast && t * 16 + 16 <= M && s * 32 + 32 <= K) {
      amx::bf16x3_pack_a_tile(src + t * 16 * rs + s * 32, rs, h, l);
      return;
    }
#endif
    alignas(64) float buf[32];
    for (int64_t r = 0; r < 16; ++r) {
      gather<32>(src, M, K, rs, cs, t * 16 + r, s * 32, buf);
      split(buf, 32, h + r * 32, l + r * 32);
    }
  });
}

void bf16x3_pack_b(const float* src, int64_t K, int64_t N, int64_t rs, int64_t cs, uint16_t* hi, uint16_t* lo,
                   bool parallel) {
  check_sizes(K, N, "pack_b");
  const SplitRun split = split_run();
  [[maybe_unused]] const bool fast = cs == 1 && split != split_run_scalar;  // whole tiles of unit-stride rows: vector packer
  for_tiles(x3_round(N) / 16, x3_round(K) / 32, hi, lo, parallel, [&](int64_t t, int64_t s, uint16_t* h, uint16_t* l) {
#if defined(SF_HAVE_AMX_KERNELS)
    if (fast && t * 16 + 16 <= N && s * 32 + 32 <= K) {
      amx::bf16x3_pack_b_tile(src + s * 32 * rs + t * 16, rs, h, l);
      return;
    }
#endif
    alignas(64) float buf[2][16];
    alignas(64) uint16_t h2[2][16], l2[2][16];
    for (int64_t p = 0; p < 16; ++p) {  // k pair p: rows 2p, 2p + 1 interleaved per column (VNNI)
      for (int j = 0; j < 2; ++j) {
        gather<16>(src, K, N, rs, cs, s * 32 + 2 * p + j, t * 16, buf[j]);
        split(buf[j], 16, h2[j], l2[j]);
      }
      for (int64_t n = 0; n < 16; ++n) {
        h[p * 32 + 2 * n] = h2[0][n];
        h[p * 32 + 2 * n + 1] = h2[1][n];
        l[p * 32 + 2 * n] = l2[0][n];
        l[p * 32 + 2 * n + 1] = l2[1][n];
      }
    }
  });
}

bool bf16x3_path_supported(Bf16x3Path path) {
  if (path == Bf16x3Path::scalar) return true;
#if defined(SF_HAVE_AMX_KERNELS)
  if (path == Bf16x3Path::amx) return bf16_path_supported(Bf16Path::amx);
#endif
  return false;
}

Bf16x3Path best_bf16x3_path() {
  return bf16x3_path_supported(Bf16x3Path::amx) ? Bf16x3Path::amx : Bf16x3Path::scalar;
}

void bf16x3_gemm(const Bf16x3Gemm& g, Bf16x3Path path, bool parallel, AfterJob after) {
  check_sizes(g.M, g.N, "gemm");
  check_sizes(g.K, 0, "gemm");
  if (g.ldc < g.N) throw std::invalid_argument("bf16x3 gemm: ldc must be at least N");
  if (!bf16x3_path_supported(path)) {
    throw std::invalid_argument("bf16x3 gemm: the amx path needs AMX-BF16 (CPU, OS and this build); use the scalar path");
  }
  if (g.M == 0 || g.N == 0) return;
  const int64_t Mp = x3_round(g.M), Np = x3_round(g.N), ks = x3_round(g.K) / 32;
  const int64_t a_next = ks * kTileElems, b_next = ks * kTileElems;  // next 16-row / 16-column tile
  const int64_t mpairs = Mp / 32, npairs = Np / 32;
  // task = (kMc row pairs) x (kNc column pairs) of C, accumulated in a task buffer (256 KB) over K
  // blocks of kKc k-steps: in a K block the rows' A tiles (hi + lo, 32 KB per row pair) stay in L1
  // while the task's column pairs' B tiles (512 KB) come from L2.
  constexpr int64_t kMc = 4, kNc = 16, kKc = 8;
  const int64_t mtasks = (mpairs + kMc - 1) / kMc, ntasks = (npairs + kNc - 1) / kNc;
  [[maybe_unused]] const bool amx = path == Bf16x3Path::amx;
  parallel_for(
      mtasks * ntasks,
      [&](int64_t task, int) {
        const int64_t mb = task / ntasks, nb = task % ntasks;
        const int64_t mp0 = mb * kMc, mp1 = min64(mpairs, mp0 + kMc), np0 = nb * kNc, np1 = min64(npairs, np0 + kNc);
        Aligned buf(static_cast<size_t>((mp1 - mp0) * (np1 - np0)) * 32 * 32 * sizeof(float));
        float* acc = static_cast<float*>(buf.p);  // [mp][np][32 x 32]
#if defined(SF_HAVE_AMX_KERNELS)
        if (amx) amx::bf16x3_tiles_begin();
#endif
        for (int64_t k0 = 0; k0 < ks; k0 += kKc) {
          const int64_t kn = min64(kKc, ks - k0);
          for (int64_t mp = mp0; mp < mp1; ++mp) {
            for (int64_t np = np0; np < np1; ++np) {
              const int64_t ao = 2 * mp * a_next + k0 * kTileElems, bo = 2 * np * b_next + k0 * kTileElems;
              float* blk = acc + ((mp - mp0) * (np1 - np0) + (np - np0)) * 32 * 32;
#if defined(SF_HAVE_AMX_KERNELS)
              if (amx) {
                amx::bf16x3_block(g.a_hi + ao, g.a_lo + ao, g.b_hi + bo, g.b_lo + bo, a_next, b_next, kn, blk, k0 > 0);
                continue;
              }
#endif
              block_scalar(g.a_hi + ao, g.a_lo + ao, g.b_hi + bo, g.b_lo + bo, a_next, b_next, kn, blk, k0 > 0);
            }
          }
        }
#if defined(SF_HAVE_AMX_KERNELS)
        if (amx) amx::bf16x3_tiles_end();
#endif
        for (int64_t mp = mp0; mp < mp1; ++mp) {
          for (int64_t np = np0; np < np1; ++np) {
            const float* blk = acc + ((mp - mp0) * (np1 - np0) + (np - np0)) * 32 * 32;
            const int64_t m0 = mp * 32, n0 = np * 32, mr = min64(32, g.M - m0), nr = min64(32, g.N - n0);
            for (int64_t i = 0; i < mr; ++i) {
              float* c = g.c + (m0 + i) * g.ldc + n0;
              const float* a = blk + i * 32;
              if (g.accumulate) {
                for (int64_t j = 0; j < nr; ++j) c[j] += a[j];
              } else {
                for (int64_t j = 0; j < nr; ++j) c[j] = a[j];
              }
            }
          }
        }
      },
      parallel && mtasks * ntasks > 1, after);
}

}  // namespace sf
