// bf16 compute for the batched sparse product: y (B, out) = bf16(x) @ bf16(W)^T (+ bias), float32
// accumulation, for bitmap, N:M and CSR weights (float32 or bfloat16 values).
//
// Method: the weight is decompressed into dense bf16 and multiplied with the activations packed once
// per call in the VNNI layout. Three multiply paths, chosen at run time:
//   amx          AMX-BF16 TDPBF16PS: 32 rows decoded row by row into a strip of up to kBf16AmxColBlock
//                columns (linear_bf16_amx.cpp), whose rows are the A tiles (16 rows x 32 bf16), the packed
//                activations the B tiles, four 16x16 float32 accumulator tiles (32 rows x 32 batch) held
//                across the strip
//   avx512_bf16  AVX512_BF16 vdpbf16ps: 4 weight rows x 4 batch vectors per step, weight pairs broadcast
//   scalar       plain C++ (bf16 widened to float32), the correct fallback on any CPU
// (the two last: 32 rows x 128 columns at a time into a dense bf16 panel that stays in L1)
// The two vector paths decode bitmap and 2:4 panels with AVX512_VBMI2 expand loads (vpexpandw /
// vexpandps + vcvtne2ps2bf16); CSR and other N:M patterns use the portable decoders.
//
// Layouts (all little-endian):
//   x        bf16 (B, in) row-major, raw uint16 bits (or float32 `xf`, rounded to bf16 while packed)
//   xp       uint32 [nbt][kp / 2][16]: batch tile t (batch rows 16t..16t+15), column pair k: dword
//            (x[16t + l, 2k], x[16t + l, 2k + 1]) at lane l (low half = even column); zero past B and in;
//            kp = in rounded up to 32
//   panel    bf16 [32][kBf16PanelLd] (two: one multiplied while the next is decoded): row i = weight row r0 + i, columns c0 .. c0 + 127, zero where pruned,
//            past `in` and past the last row
//   acc      float32 [32][64]: acc[i][b] = partial y[b0 + b, r0 + i]
// The dense panel multiplies every zero too, so NaN / inf in x propagate exactly as in a dense matmul.
// AMX and vdpbf16ps treat bf16 subnormals as zero (the scalar path does not).
#pragma once

#include "bitmap.h"
#include "common.h"
#include "csr.h"
#include "isa.h"
#include "nm.h"

namespace sf {

enum class Bf16Path : int { scalar = 0, avx512_bf16 = 1, amx = 2 };

struct Bf16Problem {
  const uint16_t* x = nullptr;  // (B, in) bf16 bits, or null when xf is set
  const float* xf = nullptr;    // (B, in) float32, rounded to bf16 (nearest even) as it is read
  int64_t B = 0;
  int64_t in = 0;
  float* y = nullptr;  // (B, out)
  int64_t out = 0;
  const float* bias = nullptr;  // (out,) or null
};

constexpr int64_t kBf16RowBlock = 32;     // weight rows per task: two 16-row AMX A tiles
// columns per decoded panel: two panels (2 x 8.5 KB) and the x slice (64 batch rows: 16 KB) fit L1.
// One core, 50% bitmap, batch 64, AMX, best of 30-40 (contended host): 1024x4096 0.69-0.73 ms
// (128) / 0.68-0.70 (256) / 0.80-0.81 (512); 512x11008 1.03-1.05 / 1.23-1.26 / 1.15
constexpr int64_t kBf16ColChunk = 128;
constexpr int64_t kBf16PanelLd = kBf16ColChunk + 32;  // panel row stride (not a multiple of 1 KB: no L1 set aliasing)
constexpr int64_t kBf16BatchChunk = 64;   // batch rows per packed activation block (acc row length)
constexpr int64_t kBf16PanelBytes = kBf16RowBlock * kBf16PanelLd * 2;
constexpr int64_t kBf16AccBytes = kBf16RowBlock * kBf16BatchChunk * 4;
constexpr int64_t kBf16ScratchBytes = 2 * kBf16PanelBytes + kBf16AccBytes + kBf16RowBlock * 8;  // two panels, acc, row cursors
// The AMX path decodes a 32-row block row by row into a strip of up to kBf16AmxColBlock columns (each
// row's stored values stream sequentially), then multiplies the strip with the accumulators held in
// tiles. One core, 50% bitmap, batch 64, weights cold (8 copies, ~400 MB), contended host: 11008x4096
// 10.0-11.0 ms per layer (strip of 4096) against 13.1-14.6 (128-column panels interleaved with the tile
// product). Every block reads the packed x of its columns, so a wider x is cut into balanced column
// blocks (bf16_amx_col_block), each swept over a group of up to kBf16AmxGroup row blocks while its x
// slice (64 batch rows x 4096 columns: 512 KB, a quarter of the 2 MB L2 of the AMX CPUs) stays in L2,
// the accumulators parked in scratch between column blocks; the rows are then read in segments, which
// the hardware prefetchers do not follow, so each multiply prefetches the next block's segments. One
// core, 90% bitmap, batch 64, 4 weight copies, contended host (thread CPU time): 4096x11008 7.8-8.3 ms
// per layer (3 column blocks) against 8.3-10.3 (one strip of 11008); 11008x4096 unchanged (6.4-7.0).
constexpr int64_t kBf16AmxColBlock = 4096;
constexpr int64_t kBf16AmxGroup = 8;  // row blocks per column-block sweep
// the AMX strip's columns for a product with kp (in rounded up to 32) columns: kp, or kp cut into
// equal blocks (multiples of 32) of at most kBf16AmxColBlock
inline int64_t bf16_amx_col_block(int64_t kp) {
  const int64_t n = (kp + kBf16AmxColBlock - 1) / kBf16AmxColBlock;
  return n <= 1 ? kp : ((kp + n - 1) / n + 31) / 32 * 32;
}
// bytes of per-thread scratch for a product with kp columns: the panels of the vector paths or the AMX
// strip, the accumulators and the row cursors (kBf16AmxGroup blocks of each)
inline int64_t bf16_scratch_bytes(int64_t kp) {
  const int64_t strip = kBf16RowBlock * (bf16_amx_col_block(kp) + 32) * 2;
  return (strip > 2 * kBf16PanelBytes ? strip : 2 * kBf16PanelBytes) + kBf16AmxGroup * (kBf16AccBytes + kBf16RowBlock * 8);
}

// One packed block of activations (batch rows [b0, b0 + bn)) and the problem it belongs to.
struct Bf16Tile {
  const uint32_t* xp = nullptr;
  int64_t nbt = 0;  // batch tiles of 16 = ceil(bn / 16)
  int64_t kp = 0;   // in rounded up to 32
  int64_t b0 = 0, bn = 0;
  const Bf16Problem* p = nullptr;
};

// bitmap / nm / csr: rows [r0, r1) of y (blocks of kBf16RowBlock inside) for one activation block;
// scratch: bf16_scratch_bytes(kp), 64-aligned. pack: batch tile bt (t.bn rows from t.b0) of the packed
// activations xp, column pairs [k0, k1) (multiples of 16 but k1 = kp / 2 at the end), x rounded to bf16
// (nearest even, NaN kept quiet) when float32.
struct Bf16Kernels {
  void (*bitmap)(const BitmapView&, const Bf16Tile&, int64_t r0, int64_t r1, void* scratch);
  void (*nm)(const NmView&, const Bf16Tile&, int64_t r0, int64_t r1, void* scratch);
  void (*csr)(const CsrView&, const Bf16Tile&, int64_t r0, int64_t r1, void* scratch);
  void (*pack)(const Bf16Tile& t, uint32_t* xp, int64_t bt, int64_t k0, int64_t k1);
};

namespace scalar { extern const Bf16Kernels linear_bf16; }
namespace avx512bf16 { extern const Bf16Kernels linear_bf16; }  // AVX512_BF16 + AVX512_VBMI2
namespace amx { extern const Bf16Kernels linear_bf16; }         // the above + AMX-TILE / AMX-BF16

// SPARSEFORGE_BF16_PATH=scalar|avx512_bf16|amx forces a path (an error if this CPU, OS or build lacks
// it); unset, empty or "auto" picks the best. Read on every call. AMX needs the Linux permission
// arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), requested once per process by bf16_path_supported.
bool bf16_path_compiled(Bf16Path path);
bool bf16_path_supported(Bf16Path path);  // compiled, CPU flags, OS state (and the AMX permission)
Bf16Path best_bf16_path();
// throws std::invalid_argument naming the path if this machine cannot run it (else nothing)
void require_bf16_path(Bf16Path path);
Bf16Path resolve_bf16_path(const char* requested);  // nullptr/"" -> SPARSEFORGE_BF16_PATH -> best; throws std::invalid_argument
const char* bf16_path_name(Bf16Path path);

// Dispatched, multithreaded products, and their oracles: the format's float32 scalar reference
// (<fmt>_linear_ref) on x and values rounded to bf16 (round to nearest even).
void bitmap_linear_bf16(const BitmapView& w, const Bf16Problem& p, Bf16Path path);
void nm_linear_bf16(const NmView& w, const Bf16Problem& p, Bf16Path path);
void csr_linear_bf16(const CsrView& w, const Bf16Problem& p, Bf16Path path);
// The zero-skipping method ("skip"): the format's float32 batch-in-lanes kernels (lanes.h; AVX-512 /
// AVX2 / portable by `isa`) on x widened from bf16 to float32 (exact) with the bf16 values widened as
// they are read: the same products as the panel (bf16 x bf16, float32 sums, another summation order),
// work proportional to the stored values instead of the dense size, and the float32 kernels' dense
// NaN / inf semantics. bfloat16 values only (throws std::invalid_argument for float32 values).
void bitmap_linear_bf16_skip(const BitmapView& w, const Bf16Problem& p, Isa isa);
void nm_linear_bf16_skip(const NmView& w, const Bf16Problem& p, Isa isa);
void csr_linear_bf16_skip(const CsrView& w, const Bf16Problem& p, Isa isa);
void bitmap_linear_bf16_ref(const BitmapView& w, const Bf16Problem& p);
void nm_linear_bf16_ref(const NmView& w, const Bf16Problem& p);
void csr_linear_bf16_ref(const CsrView& w, const Bf16Problem& p);

namespace {

// float32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace
}  // namespace sf
