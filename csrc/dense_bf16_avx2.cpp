// Dense bf16 GEMV compiled for AVX2 (the pair kernel of dense_bf16_kernels.h: x widened into the pair layout).
#include "dense_bf16_kernels.h"

namespace sf {
namespace avx2 {
extern const DenseBf16DotsFn dense_bf16_dots = dense_bf16_pair_dots;  // x in the pair layout
extern const DenseBf16WidenFn dense_bf16_widen = widen_x_pairs;
}  // namespace avx2
}  // namespace sf
