// bf16 panel product: path detection and choice, activation packing, the threaded driver, the
// scalar multiply and the oracles (linear_bf16.h).
#include "linear_bf16.h"

#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(SF_HAVE_X86_KERNELS) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define SF_BF16_CPUID 1
#endif

#include "isa.h"
#include "linear_bf16_kernels.h"
#include "threadpool.h"

namespace sf {

namespace {

// widened to float32, multiplied and summed in plain C++ (any CPU)
struct ScalarMicro {
  void mul(const uint16_t* panel, const Bf16Tile& t, int64_t c0, int64_t kc, float* acc) const {
    const int64_t kph = t.kp / 2;
    for (int64_t i = 0; i < kBf16RowBlock; ++i) {
      const uint16_t* wr = panel + i * kBf16PanelLd;
      for (int64_t bt = 0; bt < t.nbt; ++bt) {
        float* a = acc + i * kBf16BatchChunk + bt * 16;
        for (int64_t k = 0; k < kc; k += 2) {
          const float w0 = bf16_to_f32(wr[k]), w1 = bf16_to_f32(wr[k + 1]);
          const uint32_t* xv = t.xp + (bt * kph + (c0 + k) / 2) * 16;
          for (int l = 0; l < 16; ++l) {
            a[l] += w0 * bf16_to_f32(static_cast<uint16_t>(xv[l])) + w1 * bf16_to_f32(static_cast<uint16_t>(xv[l] >> 16));
          }
        }
      }
    }
  }
};

#if defined(SF_BF16_CPUID)
struct CpuFlags {
  bool avx512_bf16 = false, vbmi2 = false, amx_tile = false, amx_bf16 = false, os_tiles = false;
};

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

CpuFlags cpu_flags() {
  CpuFlags f;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const unsigned max_sub = a;
  f.vbmi2 = (c >> 6) & 1u;
  f.amx_bf16 = (d >> 22) & 1u;
  f.amx_tile = (d >> 24) & 1u;
  if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = (a >> 5) & 1u;
  unsigned a1, b1, c1, d1;
  const bool osxsave = __get_cpuid(1, &a1, &b1, &c1, &d1) && ((c1 >> 27) & 1u);
  f.os_tiles = osxsave && ((xgetbv0() >> 17) & 3u) == 3u;  // XTILECFG and XTILEDATA enabled by the OS
  return f;
}

// Linux keeps the 8 KB tile state off until the process asks (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

// the table of a path; a path this machine cannot run throws (for AMX this also makes sure the
// process asked Linux for the tile state: bf16_path_supported does, once)
const Bf16Kernels& kernels(Bf16Path path) {
  require_bf16_path(path);
#if defined(SF_HAVE_BF16_KERNELS)
  if (path == Bf16Path::avx512_bf16) return avx512bf16::linear_bf16;
#endif
#if defined(SF_HAVE_AMX_KERNELS)
  if (path == Bf16Path::amx) return amx::linear_bf16;
#endif
  (void)path;
  return scalar::linear_bf16;
}

// the activation block of t -> xp (linear_bf16.h), in tasks of one batch tile x 256 column pairs
void pack_x(const Bf16Kernels& k, const Bf16Tile& t, uint32_t* xp, bool par) {
  const int64_t kph = t.kp / 2;
  constexpr int64_t kPairs = 256;
  const int64_t nchunks = (kph + kPairs - 1) / kPairs;
  parallel_for(
      t.nbt * nchunks,
      [&](int64_t task, int) {
        const int64_t k0 = (task % nchunks) * kPairs;
        k.pack(t, xp, task / nchunks, k0, min64(kph, k0 + kPairs));
      },
      par);
}

struct AlignedBytes {
  explicit AlignedBytes(int64_t n) {
    const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) + 63) / 64 * 64;
    p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
  }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;
  ~AlignedBytes() { std::free(p); }
  void* p;
};

void check_bf16_problem(int64_t rows, int64_t cols, const Bf16Problem& p) {
  if (p.in != cols || p.out != rows || p.B < 0) {
    throw std::invalid_argument("x has " + std::to_string(p.in) + " features and y " + std::to_string(p.out) +
                                " outputs, but the weight is " + std::to_string(rows) + "x" + std::to_string(cols));
  }
}

// block(tile, r0, r1, scratch) over runs of consecutive 32-row blocks of every 64-row activation block
// (~8 runs per thread, taken dynamically; the AMX kernel configures its tiles once per run)
template <class Block>
void run_bf16(const Bf16Kernels& k, const Bf16Problem& p, Block&& block) {
  if (p.B == 0 || p.out == 0) return;
  const int nt = num_threads();
  const int64_t kp = (p.in + 31) / 32 * 32;
  // the dense panel product does out * kp multiply-adds per batch row, whatever the sparsity
  const bool par = nt > 1 && static_cast<double>(p.out) * static_cast<double>(kp) *
                                 static_cast<double>(min64(p.B, kBf16BatchChunk)) > static_cast<double>(1 << 18);
  AlignedBytes xp(kBf16BatchChunk * kp * 2);
  const int64_t scratch_bytes = bf16_scratch_bytes(kp);
  AlignedBytes scratch(int64_t{nt} * scratch_bytes);
  const int64_t nblocks = (p.out + kBf16RowBlock - 1) / kBf16RowBlock;
  const int64_t per_run = par ? max64(1, nblocks / (int64_t{nt} * 8)) : nblocks;
  const int64_t nruns = (nblocks + per_run - 1) / per_run;
  for (int64_t b0 = 0; b0 < p.B; b0 += kBf16BatchChunk) {
    Bf16Tile t;
    t.xp = static_cast<const uint32_t*>(xp.p);
    t.bn = min64(kBf16BatchChunk, p.B - b0);
    t.nbt = (t.bn + 15) / 16;
    t.kp = kp;
    t.b0 = b0;
    t.p = &p;
    pack_x(k, t, static_cast<uint32_t*>(xp.p), par);
    parallel_for(
        nruns,
        [&](int64_t run, int wk) {
          block(t, run * per_run * kBf16RowBlock, min64(p.out, (run + 1) * per_run * kBf16RowBlock),
                static_cast<char*>(scratch.p) + wk * scratch_bytes);
        },
        par);
  }
}

// the format's float32 reference on x and values rounded to bf16
template <class View, class Ref>
void ref_bf16(const View& w, const Bf16Problem& p, int64_t nnz, Ref ref) {
  std::vector<float> xf(static_cast<size_t>(p.B * p.in));
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = bf16_to_f32(p.xf ? f32_to_bf16(p.xf[i]) : p.x[i]);
  View v = w;
  std::vector<uint16_t> rounded;
  if (w.vt == VT::f32) {
    rounded.resize(static_cast<size_t>(nnz));
    for (int64_t i = 0; i < nnz; ++i) rounded[i] = f32_to_bf16(static_cast<const float*>(w.val)[i]);
    v.val = rounded.data();
    v.vt = VT::bf16;
  }
  Problem q;
  q.x = xf.data();
  q.B = p.B;
  q.in = p.in;
  q.y = p.y;
  q.out = p.out;
  q.bias = p.bias;
  ref(v, q);
}

// x widened to float32 (exact), then the format's float32 lanes kernel (algo 2)
template <class View, class Linear>
void run_skip(const View& w, const Bf16Problem& p, Isa isa, Linear linear) {
  check_bf16_problem(w.rows, w.cols, p);
  if (w.vt != VT::bf16) {
    throw std::invalid_argument("bf16 method 'skip' needs bfloat16 values (float32 values would be rounded on every call); "
                                "store the weight with bfloat16 values or use method 'panel'");
  }
  if (p.B == 0 || p.out == 0) return;
  AlignedBytes xf(p.B * p.in * 4);
  float* xw = static_cast<float*>(xf.p);  // (B, in)
  const int64_t n = p.B * p.in;
  parallel_for(
      (n + 65535) / 65536,
      [&](int64_t task, int) {
        const int64_t i0 = task * 65536, e = min64(n, i0 + 65536);
        if (p.xf) {
          for (int64_t i = i0; i < e; ++i) xw[i] = bf16_to_f32(f32_to_bf16(p.xf[i]));
        } else {
          for (int64_t i = i0; i < e; ++i) xw[i] = bf16_to_f32(p.x[i]);
        }
      },
      num_threads() > 1 && n > (1 << 16));
  Problem q;
  q.x = xw;
  q.B = p.B;
  q.in = p.in;
  q.y = p.y;
  q.out = p.out;
  q.bias = p.bias;
  linear(w, q, isa, 2);
}

}  // namespace

namespace scalar {
extern const Bf16Kernels linear_bf16 = Bf16Table<PanelBlock<ScalarMicro>>::kTable;
}  // namespace scalar

bool bf16_path_compiled(Bf16Path path) {
  switch (path) {
    case Bf16Path::scalar: return true;
    case Bf16Path::avx512_bf16:
#if defined(SF_HAVE_BF16_KERNELS)
      return true;
#else
      return false;
#endif
    case Bf16Path::amx:
#if defined(SF_HAVE_AMX_KERNELS)
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool bf16_path_supported(Bf16Path path) {
  if (!bf16_path_compiled(path)) return false;
  if (path == Bf16Path::scalar) return true;
#if defined(SF_BF16_CPUID)
  static const CpuFlags f = cpu_flags();
  const bool vec = cpu_supports(Isa::avx512) && f.avx512_bf16 && f.vbmi2;
  if (path == Bf16Path::avx512_bf16) return vec;
  static const bool amx = vec && f.amx_tile && f.amx_bf16 && f.os_tiles && amx_permission();
  return amx;
#else
  return false;
#endif
}

void require_bf16_path(Bf16Path path) {
  if (!bf16_path_supported(path)) {
    throw std::invalid_argument(std::string("bf16 path ") + bf16_path_name(path) + " is not available on this machine");
  }
}

Bf16Path best_bf16_path() {
  if (bf16_path_supported(Bf16Path::amx)) return Bf16Path::amx;
  if (bf16_path_supported(Bf16Path::avx512_bf16)) return Bf16Path::avx512_bf16;
  return Bf16Path::scalar;
}

const char* bf16_path_name(Bf16Path path) {
  switch (path) {
    case Bf16Path::scalar: return "scalar";
    case Bf16Path::avx512_bf16: return "avx512_bf16";
    case Bf16Path::amx: return "amx";
  }
  return "?";
}

Bf16Path resolve_bf16_path(const char* requested) {
  std::string want = requested ? requested : "";
  std::string source = "path argument";
  if (want.empty()) {
    const char* env = std::getenv("SPARSEFORGE_BF16_PATH");
    want = env ? env : "";
    source = "SPARSEFORGE_BF16_PATH";
  }
  if (want.empty() || want == "auto") return best_bf16_path();
  Bf16Path path;
  if (want == "scalar") {
    path = Bf16Path::scalar;
  } else if (want == "avx512_bf16") {
    path = Bf16Path::avx512_bf16;
  } else if (want == "amx") {
    path = Bf16Path::amx;
  } else {
    throw std::invalid_argument(source + "='" + want + "' is not a bf16 kernel path; use one of auto, scalar, avx512_bf16, amx");
  }
  if (!bf16_path_supported(path)) {
    const std::string need = path == Bf16Path::amx ? "AMX-TILE/AMX-BF16 with the OS tile permission"
                                                   : "AVX-512 with AVX512_BF16 and AVX512_VBMI2";
    throw std::invalid_argument(source + "=" + want + ": this " +
                                (bf16_path_compiled(path) ? "CPU (or OS) lacks " + need : std::string("build has no such path")) +
                                "; best available is " + bf16_path_name(best_bf16_path()) + ", or unset it for auto");
  }
  return path;
}

void bitmap_linear_bf16(const BitmapView& w, const Bf16Problem& p, Bf16Path path) {
  check_bf16_problem(w.rows, w.cols, p);
  const Bf16Kernels& k = kernels(path);
  run_bf16(k, p, [&](const Bf16Tile& t, int64_t r0, int64_t r1, void* s) { k.bitmap(w, t, r0, r1, s); });
}

void nm_linear_bf16(const NmView& w, const Bf16Problem& p, Bf16Path path) {
  check_bf16_problem(w.rows, w.cols, p);
  const Bf16Kernels& k = kernels(path);
  run_bf16(k, p, [&](const Bf16Tile& t, int64_t r0, int64_t r1, void* s) { k.nm(w, t, r0, r1, s); });
}

void csr_linear_bf16(const CsrView& w, const Bf16Problem& p, Bf16Path path) {
  check_bf16_problem(w.rows, w.cols, p);
  const Bf16Kernels& k = kernels(path);
  run_bf16(k, p, [&](const Bf16Tile& t, int64_t r0, int64_t r1, void* s) { k.csr(w, t, r0, r1, s); });
}

void bitmap_linear_bf16_skip(const BitmapView& w, const Bf16Problem& p, Isa isa) { run_skip(w, p, isa, bitmap_linear); }
void nm_linear_bf16_skip(const NmView& w, const Bf16Problem& p, Isa isa) { run_skip(w, p, isa, nm_linear); }
void csr_linear_bf16_skip(const CsrView& w, const Bf16Problem& p, Isa isa) { run_skip(w, p, isa, csr_linear); }

void bitmap_linear_bf16_ref(const BitmapView& w, const Bf16Problem& p) {
  check_bf16_problem(w.rows, w.cols, p);
  ref_bf16(w, p, w.nnz, bitmap_linear_ref);
}

void nm_linear_bf16_ref(const NmView& w, const Bf16Problem& p) {
  check_bf16_problem(w.rows, w.cols, p);
  ref_bf16(w, p, w.rows * w.vpr, nm_linear_ref);
}

void csr_linear_bf16_ref(const CsrView& w, const Bf16Problem& p) {
  check_bf16_problem(w.rows, w.cols, p);
  ref_bf16(w, p, w.nnz, csr_linear_ref);
}

}  // namespace sf
