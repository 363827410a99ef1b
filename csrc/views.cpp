// The per-format view builders of views.h: shapes, dtypes and lengths always; indices and row
// pointers when check_indices is set.
#include "views.h"

#include <string>

namespace sf {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

// set bits of a bitmap row (the POPCNT clone where the CPU has it)
SF_POPCNT_CLONES int64_t row_popcount(const uint8_t* row, int64_t bpr) {
  int64_t n = 0, b = 0;
  for (; b + 8 <= bpr; b += 8) {
    uint64_t v;
    std::memcpy(&v, row + b, 8);
    n += __builtin_popcountll(v);
  }
  for (; b < bpr; ++b) n += __builtin_popcount(row[b]);
  return n;
}

// Every row's set bits match its slice of row_offsets (so values are read only within
// [row_offsets[r], row_offsets[r + 1])), and no padding bit past cols is set (so no column >= cols
// is decoded).
void check_bitmap(const BitmapView& w, const char* op) {
  const int tail = static_cast<int>(w.cols % 8);
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* row = w.bits + r * w.bpr;
    if (tail && (row[w.bpr - 1] >> tail)) {
      bad_weight(op, "bitmap row " + str(r) + " sets padding bits past column " + str(w.cols) +
                         " (byte " + str(w.bpr - 1) + " = " + str(row[w.bpr - 1]) + ")");
    }
    const int64_t kept = row_popcount(row, w.bpr);
    if (w.row_offsets[r + 1] - w.row_offsets[r] != kept) {
      bad_weight(op, "row_offsets[" + str(r + 1) + "] - row_offsets[" + str(r) + "] = " +
                         str(w.row_offsets[r + 1] - w.row_offsets[r]) + " but bitmap row " + str(r) + " keeps " +
                         str(kept) + " entries");
    }
  }
}

// 2:4 groups as index nibbles: positions a (bits 0-1) < b (bits 2-3) in every nibble of v.
// Per nibble (b | 4) - a - 1 = b - a + 3 lies in [0, 6] (no borrow between nibbles) and has bit 2
// set exactly when b > a.
inline bool nm24_nibbles_ok(uint64_t v, uint64_t nibbles_mask) {
  const uint64_t lo = v & 0x3333333333333333ull, hi = (v >> 2) & 0x3333333333333333ull;
  const uint64_t d = (hi | 0x4444444444444444ull) - lo - 0x1111111111111111ull;
  return ((d & 0x4444444444444444ull) & nibbles_mask) == (0x4444444444444444ull & nibbles_mask);
}

[[noreturn]] void report_nm(const NmView& w, int64_t r, const char* op) {
  const uint8_t* irow = w.idx + r * w.ibpr;
  for (int64_t v = 0; v < w.vpr; ++v) {
    const int pos = nm_field(irow, w.ibpr, v * w.b, w.b);
    const int prev = v % w.n ? nm_field(irow, w.ibpr, (v - 1) * w.b, w.b) : -1;
    if (pos >= w.m || pos <= prev) {
      bad_weight(op, "indices row " + str(r) + " stores position " + str(pos) + " for value " + str(v) + " (group " +
                         str(v / w.n) + "); positions must be below m = " + str(w.m) +
                         " and strictly ascending within a group");
    }
  }
  bad_weight(op, "indices row " + str(r) + " is inconsistent");  // unreachable
}

// Every stored position is below m and strictly ascending within its group (so each group's n
// columns are distinct columns of that group, all < cols).
void check_nm(const NmView& w, const char* op) {
  const int64_t G = w.cols / w.m;
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* irow = w.idx + r * w.ibpr;
    bool ok = true;
    if (w.n == 2 && w.m == 4) {  // one nibble per group
      int64_t byte = 0;
      for (; byte + 8 <= G / 2; byte += 8) {
        uint64_t v;
        std::memcpy(&v, irow + byte, 8);
        ok &= nm24_nibbles_ok(v, ~0ull);
      }
      for (; byte < (G + 1) / 2; ++byte) ok &= nm24_nibbles_ok(irow[byte], 2 * byte + 1 < G ? 0xffull : 0x0full);
    } else {
      for (int64_t g = 0; g < G && ok; ++g) {
        int prev = -1;
        for (int k = 0; k < w.n; ++k) {
          const int pos = nm_field(irow, w.ibpr, (g * w.n + k) * w.b, w.b);
          ok &= pos < w.m && pos > prev;
          prev = pos;
        }
      }
    }
    if (!ok) report_nm(w, r, op);
  }
}

}  // namespace

CsrView csr_view(const Array& row_ptr, const Array& col, const Array& values, int64_t cols, const char* op,
                 bool check_indices) {
  expect_ndim(row_ptr, op, "row_ptr", 1);
  expect_dtype(row_ptr, op, "row_ptr", DType::i32);
  expect_ndim(col, op, "col", 1);
  expect_ndim(values, op, "values", 1);
  CsrView w;
  w.rows = row_ptr.dim(0) - 1;
  w.cols = cols;
  w.nnz = values.dim(0);
  if (w.rows < 0) bad_weight(op, "row_ptr must have rows + 1 >= 1 entries");
  w.col_u16 = index_u16(col, op, "col", cols);
  if (col.dim(0) != w.nnz) {
    bad_weight(op, "col (" + str(col.dim(0)) + ") and values (" + str(w.nnz) + ") must have the same length (nnz)");
  }
  w.vt = value_type(values, op, "values");
  w.row_ptr = static_cast<const int32_t*>(row_ptr.data);
  w.col = col.data;
  w.val = values.data;
  if (w.row_ptr[0] != 0 || w.row_ptr[w.rows] != w.nnz) {
    bad_weight(op, "row_ptr must start at 0 and end at nnz = len(values) = " + str(w.nnz) + ", got row_ptr[0] = " +
                       str(w.row_ptr[0]) + ", row_ptr[" + str(w.rows) + "] = " + str(w.row_ptr[w.rows]));
  }
  if (check_indices) {
    check_pointers(w.row_ptr, w.rows, w.nnz, op, "row_ptr");
    check_ascending(w.col, w.col_u16, w.row_ptr, w.rows, cols, op, "col", "columns", "row");
  }
  return w;
}

BitmapView bitmap_view(const Array& bits, const Array& row_offsets, const Array& values, int64_t cols, const char* op,
                       bool check_indices) {
  expect_ndim(bits, op, "bitmap", 2);
  expect_dtype(bits, op, "bitmap", DType::u8);
  expect_ndim(row_offsets, op, "row_offsets", 1);
  expect_dtype(row_offsets, op, "row_offsets", DType::i64);
  expect_ndim(values, op, "values", 1);
  BitmapView w;
  w.rows = bits.dim(0);
  w.cols = cols;
  w.bpr = bits.dim(1);
  w.nnz = values.dim(0);
  if (w.bpr != (cols + 7) / 8) {
    bad_weight(op, "bitmap must have ceil(in_features / 8) = " + str((cols + 7) / 8) + " bytes per row, got " +
                       str(w.bpr));
  }
  if (row_offsets.dim(0) != w.rows + 1) bad_weight(op, "row_offsets must have rows + 1 = " + str(w.rows + 1) + " entries");
  w.vt = value_type(values, op, "values");
  w.bits = static_cast<const uint8_t*>(bits.data);
  w.row_offsets = static_cast<const int64_t*>(row_offsets.data);
  w.val = values.data;
  if (w.row_offsets[0] != 0 || w.row_offsets[w.rows] != w.nnz) {
    bad_weight(op, "row_offsets must start at 0 and end at nnz = len(values) = " + str(w.nnz) +
                       ", got row_offsets[0] = " + str(w.row_offsets[0]) + ", row_offsets[" + str(w.rows) +
                       "] = " + str(w.row_offsets[w.rows]));
  }
  if (check_indices) check_bitmap(w, op);
  return w;
}

NmView nm_view(const Array& values, const Array& indices, int n, int m, int64_t cols, const char* op,
               bool check_indices) {
  expect_ndim(values, op, "values", 2);
  expect_ndim(indices, op, "indices", 2);
  expect_dtype(indices, op, "indices", DType::u8);
  if (!(0 < n && n < m && m <= 256)) bad_weight(op, "N:M needs 0 < n < m <= 256, got " + str(n) + ":" + str(m));
  if (cols < 0 || cols % m) bad_weight(op, "in_features = " + str(cols) + " must be a multiple of m = " + str(m));
  NmView w;
  w.rows = values.dim(0);
  w.cols = cols;
  w.n = n;
  w.m = m;
  int b = 1;
  while ((1 << b) < m) ++b;
  w.b = b;
  w.vpr = cols / m * n;
  w.ibpr = (w.vpr * b + 7) / 8;
  if (values.dim(1) != w.vpr) {
    bad_weight(op, "values must have shape (rows, in_features / m * n) = (" + str(w.rows) + ", " + str(w.vpr) + ")");
  }
  if (indices.dim(0) != w.rows || indices.dim(1) != w.ibpr) {
    bad_weight(op, "indices must have shape (rows, ceil(values_per_row * bits / 8)) = (" + str(w.rows) + ", " +
                       str(w.ibpr) + ")");
  }
  w.vt = value_type(values, op, "values");
  w.val = values.data;
  w.idx = static_cast<const uint8_t*>(indices.data);
  if (check_indices) check_nm(w, op);
  return w;
}

FanInView fanin_view(const Array& values, const Array& indices, int64_t cols, const char* op, bool check_indices) {
  expect_ndim(values, op, "values", 2);
  expect_ndim(indices, op, "indices", 2);
  FanInView w;
  w.rows = values.dim(0);
  w.k = values.dim(1);
  w.cols = cols;
  if (indices.dim(0) != w.rows || indices.dim(1) != w.k) bad_weight(op, "indices must have the shape of values (rows, k)");
  if (w.k > cols) bad_weight(op, "fan-in k = " + str(w.k) + " is larger than in_features = " + str(cols));
  w.idx_u16 = index_u16(indices, op, "indices", cols);
  w.vt = value_type(values, op, "values");
  w.idx = indices.data;
  w.val = values.data;
  if (check_indices) check_ascending_fixed(w.idx, w.idx_u16, w.rows, w.k, cols, op, "indices", "columns");
  return w;
}

BsrView bsr_view(const Array& brp, const Array& bcol, const Array& values, int64_t rows, int64_t cols, const char* op,
                 bool check_indices) {
  expect_ndim(brp, op, "block_row_ptr", 1);
  expect_dtype(brp, op, "block_row_ptr", DType::i32);
  expect_ndim(bcol, op, "block_col", 1);
  expect_ndim(values, op, "values", 3);
  BsrView w;
  w.nblocks = values.dim(0);
  w.h = values.dim(1);
  w.w = values.dim(2);
  w.rows = rows;
  w.cols = cols;
  if (w.h < 1 || w.w < 1 || rows % w.h || cols % w.w || brp.dim(0) != rows / w.h + 1) {
    bad_weight(op, "BSR blocks of " + str(w.h) + "x" + str(w.w) + " with " + str(brp.dim(0)) +
                       " block row pointers do not tile a " + str(rows) + "x" + str(cols) + " weight");
  }
  if (bcol.dim(0) != w.nblocks) bad_weight(op, "block_col must have one entry per block (" + str(w.nblocks) + ")");
  w.bcol_u16 = index_u16(bcol, op, "block_col", cols / w.w);
  w.vt = value_type(values, op, "values");
  w.brp = static_cast<const int32_t*>(brp.data);
  w.bcol = bcol.data;
  w.val = values.data;
  const int64_t block_rows = rows / w.h;
  if (w.brp[0] != 0 || w.brp[block_rows] != w.nblocks) {
    bad_weight(op, "block_row_ptr must start at 0 and end at nblocks = len(values) = " + str(w.nblocks) +
                       ", got block_row_ptr[0] = " + str(w.brp[0]) + ", block_row_ptr[" + str(block_rows) +
                       "] = " + str(w.brp[block_rows]));
  }
  if (check_indices) {
    check_pointers(w.brp, block_rows, w.nblocks, op, "block_row_ptr");
    check_ascending(w.bcol, w.bcol_u16, w.brp, block_rows, cols / w.w, op, "block_col", "block columns", "block row");
  }
  return w;
}

}  // namespace sf
