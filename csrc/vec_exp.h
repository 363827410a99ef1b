// exp of the including file's native float vector (lanes.h: vfl, kVL), for softmax and SiLU: written once
// with GCC/Clang vector extensions, compiled per ISA file like lanes.h. Internal linkage throughout.
#pragma once

#include <cstdint>

#include "lanes.h"

namespace sf {
namespace {

typedef int32_t vexp_i32 __attribute__((vector_size(kVL * 4)));

// exp(x) for x <= 0 (the softmax only needs that range): x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r, times 2^n built in the exponent bits; 0 below -87.3 (and for -inf), NaN stays NaN.
inline vfl exp_neg(vfl x) {
  const vfl lo = vfl{} - 87.3f;
  const auto under = x < lo;  // -inf included
  x = under ? lo : x;
  const vfl magic = vfl{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const vfl t = x * 1.44269504088896341f + magic;
  const vfl nf = t - magic;
  const vfl r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  vfl poly = vfl{} + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.f;
  const vexp_i32 ni = __builtin_convertvector(nf, vexp_i32);
  const vfl scale = reinterpret_cast<vfl>((ni + 127) << 23);
  const vfl y = poly * scale;
  return under ? vfl{} : y;
}

inline float exp_neg1(float x) {
  vfl v = vfl{} + x;
  return exp_neg(v)[0];
}

}  // namespace
}  // namespace sf
