// Constant fan-in: scalar references (test oracles) and dispatch through the CSR kernels.
#include "fanin.h"

#include <limits>
#include <stdexcept>
#include <vector>

#include "csr.h"
#include "driver.h"

namespace sf {
namespace {

// The CSR view of a fan-in weight: row_ptr[r] = r * k, built per call.
struct AsCsr {
  std::vector<int32_t> rp;
  CsrView v;
  explicit AsCsr(const FanInView& w) : rp(static_cast<size_t>(w.rows + 1)) {
    if (w.rows * w.k > std::numeric_limits<int32_t>::max()) {
      throw std::invalid_argument("a fan-in weight holds at most 2^31 - 1 entries; split the layer");
    }
    for (int64_t r = 0; r <= w.rows; ++r) rp[static_cast<size_t>(r)] = static_cast<int32_t>(r * w.k);
    v.rows = w.rows;
    v.cols = w.cols;
    v.nnz = w.rows * w.k;
    v.row_ptr = rp.data();
    v.col = w.idx;
    v.col_u16 = w.idx_u16;
    v.val = w.val;
    v.vt = w.vt;
  }
};

// f(column, value index) for each stored entry of row r (independent of the CSR decoder)
template <class F>
void stored(const FanInView& w, int64_t r, F&& f) {
  for (int64_t q = r * w.k; q < (r + 1) * w.k; ++q)
    f(w.idx_u16 ? int64_t{static_cast<const uint16_t*>(w.idx)[q]} : int64_t{static_cast<const int32_t*>(w.idx)[q]}, q);
}

void dense_row(const FanInView& w, int64_t r, float* row) {
  for (int64_t j = 0; j < w.cols; ++j) row[j] = 0.f;
  stored(w, r, [&](int64_t j, int64_t q) {
    row[j] = w.vt == VT::f32 ? load_val<VT::f32>(w.val, q) : load_val<VT::bf16>(w.val, q);
  });
}

}  // namespace

void fanin_linear_ref(const FanInView& w, const Problem& p) { detail::linear_ref(w, p, dense_row); }

void fanin_linear_t_ref(const FanInView& w, const ProblemT& p) { detail::linear_t_ref(w, p, dense_row); }

void fanin_sddmm_ref(const FanInView& w, const ProblemW& p) {
  detail::sddmm_ref(w, p, [](const FanInView& v, int64_t r, auto&& f) { stored(v, r, f); });
}

void fanin_linear(const FanInView& w, const Problem& p, Isa isa, int algo) { csr_linear(AsCsr(w).v, p, isa, algo); }

void fanin_linear_t(const FanInView& w, const ProblemT& p, Isa isa) { csr_linear_t(AsCsr(w).v, p, isa); }

void fanin_sddmm(const FanInView& w, const ProblemW& p, Isa isa) { csr_sddmm(AsCsr(w).v, p, isa); }

}  // namespace sf
