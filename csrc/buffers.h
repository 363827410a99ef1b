// Caller buffers as the kernels receive them, and the checks that make every view memory-safe.
//
// The binding (src/sparseforge/_native.cpp) turns each array argument into an Array (data pointer,
// shape, element type; already checked to be on the CPU and C-contiguous); the per-format view
// builders (csr_view in csr.cpp, bitmap_view, nm_view, fanin_view, bsr_view) check shapes, dtypes
// and, when asked, every index: after a view builder returns with check_indices set, no kernel of
// that format reads outside the buffers or x, whatever the buffers hold. A bad buffer throws
// InvalidWeight with a one-line message naming the op, the buffer, the position and the value.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

// Scans over whole buffers (index checks, bitmap popcounts) in portable files: one clone per
// instruction set, chosen by the dynamic loader for the CPU (function multi-versioning). Only
// where the build has the x86 kernels; elsewhere the plain function.
#if defined(SF_HAVE_X86_KERNELS) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SF_SCAN_CLONES __attribute__((target_clones("arch=skylake-avx512", "avx2", "default")))
#define SF_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define SF_SCAN_CLONES
#define SF_POPCNT_CLONES
#endif

namespace sf {

enum class DType : int { f32, bf16, u8, i8, u16, i16, i32, i64, other };

struct Array {
  const void* data = nullptr;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};
  DType dtype = DType::other;
  int64_t dim(int d) const { return shape[d]; }
};

// A weight buffer (row pointers, indices, values, bitmap) that no kernel may read: wrong shape or
// dtype, an index outside its range, row pointers that decrease. The binding raises
// sparseforge.errors.ModelError for it.
struct InvalidWeight : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

const char* dtype_name(DType t);
// [[noreturn]] InvalidWeight("<op>: <msg>")
[[noreturn]] void bad_weight(const char* op, const std::string& msg);
void expect_ndim(const Array& a, const char* op, const char* name, int ndim);
void expect_dtype(const Array& a, const char* op, const char* name, DType want);
// float32 or bfloat16 (uint16 storage is read as raw bfloat16 bits)
VT value_type(const Array& a, const char* op, const char* name);
// column / block indices: uint16 (int16 storage read as uint16) when count <= 65536, or int32
bool index_u16(const Array& a, const char* op, const char* name, int64_t count);

// Every index in [0, count) and strictly ascending within each segment: segment s is
// idx[bounds[s], bounds[s + 1]) (CSR rows, BSR block rows), bounds already checked by
// check_pointers. Throws InvalidWeight naming name[q] and its value; `what` names the indexed axis
// and `segment` a segment for the message ("columns" of a "row", "block columns" of a "block row").
void check_ascending(const void* idx, bool u16, const int32_t* bounds, int64_t nseg, int64_t count, const char* op,
                     const char* name, const char* what, const char* segment);
// The same with implicit bounds s * k (constant fan-in: nseg rows of k indices).
void check_ascending_fixed(const void* idx, bool u16, int64_t nseg, int64_t k, int64_t count, const char* op,
                           const char* name, const char* what);
// ptr[0] == 0, ptr never decreases, ptr[n] == total (row pointers of n rows over `total` entries).
void check_pointers(const int32_t* ptr, int64_t n, int64_t total, const char* op, const char* name);
void check_pointers(const int64_t* ptr, int64_t n, int64_t total, const char* op, const char* name);

}  // namespace sf
