// The size checks every attention kernel over a KV cache shares (decode_attention.h,
// prefill_attention.h): the batch, head and channel counts, grouped-query heads, and the valid
// tokens inside the allocated ones.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sf {

// KV cache of B batch rows, Hkv heads of D channels, `cap` tokens allocated per (b, KV head) of
// which `n` are valid, read by Hq query heads (Hq / Hkv query heads per KV head).
struct KvCacheShape {
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0, n = 0, cap = 0;
};

// Throws std::invalid_argument, its message starting with `what`, unless B, Hq, Hkv, D >= 1,
// min_n <= n <= cap and Hq is a multiple of Hkv.
//   check_kv_cache("decode attention", {B, Hq, Hkv, D, n, cap}, 1);
inline void check_kv_cache(const char* what, const KvCacheShape& s, int64_t min_n) {
  auto str = [](int64_t v) { return std::to_string(v); };
  if (s.B < 1 || s.Hq < 1 || s.Hkv < 1 || s.D < 1 || s.n < min_n || s.cap < s.n) {
    throw std::invalid_argument(std::string(what) + " needs B, Hq, Hkv, D >= 1 and " + str(min_n) +
                                " <= n <= cap; got B=" + str(s.B) + " Hq=" + str(s.Hq) + " Hkv=" + str(s.Hkv) +
                                " D=" + str(s.D) + " n=" + str(s.n) + " cap=" + str(s.cap));
  }
  if (s.Hq % s.Hkv) {
    throw std::invalid_argument(std::string(what) + ": query heads (" + str(s.Hq) +
                                ") must be a multiple of key/value heads (" + str(s.Hkv) + ")");
  }
}

}  // namespace sf
