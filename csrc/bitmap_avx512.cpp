// Bitmap kernels compiled for AVX-512 (the code of bitmap_kernels.h at this file's vector width).
#include "bitmap_kernels.h"

namespace sf {
namespace avx512 {
extern const BitmapKernels bitmap = kBitmapKernels;
}  // namespace avx512
}  // namespace sf
