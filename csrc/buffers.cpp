// Buffer checks shared by the view builders (see buffers.h). The scans are branch-free reductions
// over each segment (the compiler vectorises them); only a failing segment is walked again to name
// the offending entry.
#include "buffers.h"

namespace sf {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::bf16: return "bfloat16";
    case DType::u8: return "uint8";
    case DType::i8: return "int8";
    case DType::u16: return "uint16";
    case DType::i16: return "int16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    default: return "an unsupported dtype";
  }
}

void bad_weight(const char* op, const std::string& msg) { throw InvalidWeight(std::string(op) + ": " + msg); }

void expect_ndim(const Array& a, const char* op, const char* name, int ndim) {
  if (a.ndim != ndim) {
    bad_weight(op, std::string(name) + " must have " + std::to_string(ndim) + " dimension(s), got " +
                       std::to_string(a.ndim));
  }
}

void expect_dtype(const Array& a, const char* op, const char* name, DType want) {
  if (a.dtype != want) bad_weight(op, std::string(name) + " must be " + dtype_name(want) + ", got " + dtype_name(a.dtype));
}

VT value_type(const Array& a, const char* op, const char* name) {
  if (a.dtype == DType::f32) return VT::f32;
  if (a.dtype == DType::bf16 || a.dtype == DType::u16) return VT::bf16;
  bad_weight(op, std::string(name) + " must be float32 or bfloat16, got " + dtype_name(a.dtype));
}

bool index_u16(const Array& a, const char* op, const char* name, int64_t count) {
  if (a.dtype == DType::u16 || a.dtype == DType::i16) {
    if (count > 65536) {
      bad_weight(op, std::string("16-bit ") + name + " address at most 65536 positions, the weight has " +
                         std::to_string(count) + "; store them as int32");
    }
    return true;
  }
  if (a.dtype == DType::i32) return false;
  bad_weight(op, std::string(name) + " must be uint16 or int32, got " + dtype_name(a.dtype));
}

namespace {

// Whether some entry of a[0:n) does not exceed the one before: one pass without early exit, built
// for each instruction set (GCC/Clang function multi-versioning picks the clone the CPU runs; the
// baseline SSE2 has no unsigned 16-bit or 32-bit min/compare, ~10x slower per entry).
SF_SCAN_CLONES unsigned descents(const uint16_t* a, int64_t n) {
  unsigned bad = 0;
  for (int64_t q = 1; q < n; ++q) bad |= static_cast<unsigned>(a[q] <= a[q - 1]);
  return bad;
}

SF_SCAN_CLONES unsigned descents(const int32_t* a, int64_t n) {
  unsigned bad = 0;
  for (int64_t q = 1; q < n; ++q) bad |= static_cast<unsigned>(a[q] <= a[q - 1]);
  return bad;
}

// whether a[0:n) is strictly ascending within [0, count): first and last in range, no descent
template <class I>
bool segment_ok(const I* a, int64_t n, int64_t count) {
  if (n == 0) return true;
  if (static_cast<int64_t>(a[0]) < 0 || static_cast<int64_t>(a[n - 1]) >= count) return false;
  return descents(a, n) == 0;
}

// the message for the first bad entry of segment [q0, q1) (segment_ok was false)
template <class I>
[[noreturn]] void report_segment(const I* a, int64_t q0, int64_t q1, int64_t seg, int64_t count, const char* op,
                                 const char* name, const char* what, const char* seg_name) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t v = a[q];
    if (v < 0 || v >= count) {
      bad_weight(op, std::string(name) + "[" + std::to_string(q) + "] = " + std::to_string(v) + " is outside [0, " +
                         std::to_string(count) + "), the " + what + " of the weight");
    }
    if (q > q0 && a[q] <= a[q - 1]) {
      bad_weight(op, std::string(name) + "[" + std::to_string(q) + "] = " + std::to_string(v) + " does not exceed " +
                         name + "[" + std::to_string(q - 1) + "] = " + std::to_string(int64_t{a[q - 1]}) + "; " +
                         what + " must be strictly ascending within each " + seg_name + " (" + seg_name + " " +
                         std::to_string(seg) + ")");
    }
  }
  bad_weight(op, std::string(name) + ": inconsistent segment");  // unreachable when segment_ok was false
}

template <class I, class Bound>
void ascending(const I* a, int64_t nseg, Bound bound, int64_t count, const char* op, const char* name,
               const char* what, const char* seg_name) {
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t q0 = bound(s), q1 = bound(s + 1);
    if (!segment_ok(a + q0, q1 - q0, count)) report_segment(a, q0, q1, s, count, op, name, what, seg_name);
  }
}

template <class P>
void pointers(const P* ptr, int64_t n, int64_t total, const char* op, const char* name) {
  if (ptr[0] != 0 || ptr[n] != total) {
    bad_weight(op, std::string(name) + " must start at 0 and end at " + std::to_string(total) +
                       " (the number of stored entries), got " + name + "[0] = " + std::to_string(int64_t{ptr[0]}) +
                       ", " + name + "[" + std::to_string(n) + "] = " + std::to_string(int64_t{ptr[n]}));
  }
  unsigned bad = 0;
  for (int64_t r = 0; r < n; ++r) bad |= static_cast<unsigned>(ptr[r + 1] < ptr[r]);
  if (!bad) return;
  for (int64_t r = 0; r < n; ++r) {
    if (ptr[r + 1] < ptr[r]) {
      bad_weight(op, std::string(name) + "[" + std::to_string(r + 1) + "] = " + std::to_string(int64_t{ptr[r + 1]}) +
                         " is below " + name + "[" + std::to_string(r) + "] = " + std::to_string(int64_t{ptr[r]}) +
                         "; row pointers must never decrease");
    }
  }
}

}  // namespace

void check_ascending(const void* idx, bool u16, const int32_t* bounds, int64_t nseg, int64_t count, const char* op,
                     const char* name, const char* what, const char* segment) {
  const auto bound = [bounds](int64_t s) { return static_cast<int64_t>(bounds[s]); };
  if (u16) ascending(static_cast<const uint16_t*>(idx), nseg, bound, count, op, name, what, segment);
  else ascending(static_cast<const int32_t*>(idx), nseg, bound, count, op, name, what, segment);
}

void check_ascending_fixed(const void* idx, bool u16, int64_t nseg, int64_t k, int64_t count, const char* op,
                           const char* name, const char* what) {
  const auto bound = [k](int64_t s) { return s * k; };
  if (u16) ascending(static_cast<const uint16_t*>(idx), nseg, bound, count, op, name, what, "row");
  else ascending(static_cast<const int32_t*>(idx), nseg, bound, count, op, name, what, "row");
}

void check_pointers(const int32_t* ptr, int64_t n, int64_t total, const char* op, const char* name) {
  pointers(ptr, n, total, op, name);
}

void check_pointers(const int64_t* ptr, int64_t n, int64_t total, const char* op, const char* name) {
  pointers(ptr, n, total, op, name);
}

}  // namespace sf
