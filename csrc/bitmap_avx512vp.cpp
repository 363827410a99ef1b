// Bitmap kernels compiled for AVX-512 with AVX512_VPOPCNTDQ (picked by kernels() in bitmap.cpp where the CPU has it) (the code of bitmap_kernels.h at this file's vector width).
#include "bitmap_kernels.h"

namespace sf {
namespace avx512vp {
extern const BitmapKernels bitmap = kBitmapKernels;
}  // namespace avx512vp
}  // namespace sf
