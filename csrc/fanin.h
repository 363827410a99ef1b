// Constant fan-in ("condensed") weights: every output row stores exactly k entries.
//
// Layout (what sparseforge.formats.fanin.FanInWeight stores):
//   values   float32 or bfloat16 (rows, k) row-major; row r's entries are values[r, 0:k]
//   indices  uint16 (rows, k) when cols <= 65536, else int32; column of each value, strictly
//            ascending within a row
// This is CSR with implicit row pointers r * k (no row_ptr buffer): the dispatched kernels run the
// CSR kernels of every ISA (csr.h) over a row-pointer array built per call (rows + 1 int32, a few
// microseconds), so fan-in gets the same tuned rows / lanes / transposed / SDDMM paths. The scalar
// references below are written independently (the test oracles).
#pragma once

#include "common.h"

namespace sf {

struct FanInView {
  int64_t rows = 0, cols = 0, k = 0;
  const void* idx = nullptr;
  bool idx_u16 = true;
  const void* val = nullptr;
  VT vt = VT::f32;
};

void fanin_linear_ref(const FanInView& w, const Problem& p);
void fanin_linear_t_ref(const FanInView& w, const ProblemT& p);
void fanin_sddmm_ref(const FanInView& w, const ProblemW& p);
// algo: 0 auto, 1 rows, 2 lanes (as csr_linear)
void fanin_linear(const FanInView& w, const Problem& p, Isa isa, int algo);
void fanin_linear_t(const FanInView& w, const ProblemT& p, Isa isa);
void fanin_sddmm(const FanInView& w, const ProblemW& p, Isa isa);

}  // namespace sf
