// Bitmap kernels compiled for AVX2 (the code of bitmap_kernels.h at this file's vector width).
#include "bitmap_kernels.h"

namespace sf {
namespace avx2 {
extern const BitmapKernels bitmap = kBitmapKernels;
}  // namespace avx2
}  // namespace sf
