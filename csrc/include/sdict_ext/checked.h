// Overflow-checked int64 arithmetic for bounds checks.
//
// Offsets, shapes and starts reach the ops from users and from peer ranks, so a bound
// written as `offset + n <= total` can wrap (signed overflow, undefined behaviour) and
// pass for values near 2^63. Every bounds check in csrc/ goes through these instead.
// They use the compiler's overflow builtins, what c10::mul_overflows uses on GCC and
// Clang, because the int64 overloads of c10/util/safe_numerics.h are missing from some
// of the torch releases this builds against.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace sdict_ext {

// Whether [offset, offset + n) lies within [0, total): both non-negative, never wrapping.
inline bool range_fits(int64_t offset, int64_t n, int64_t total) {
  return offset >= 0 && n >= 0 && n <= total && offset <= total - n;
}

// The product of `sizes` times `elem_size` (an element count or byte size), or -1 when a
// size is negative or the product does not fit in int64. An empty product is 0 as soon
// as one size is 0, whatever the others are.
inline int64_t checked_extent(c10::IntArrayRef sizes, int64_t elem_size = 1) {
  if (elem_size < 0) return -1;
  for (int64_t s : sizes) {
    if (s < 0) return -1;
    if (s == 0) return 0;
  }
  int64_t n = elem_size;
  for (int64_t s : sizes) {
    if (__builtin_mul_overflow(n, s, &n)) return -1;
  }
  return n;
}

// a * b, or -1 when either is negative or the product does not fit in int64.
inline int64_t checked_mul(int64_t a, int64_t b) {
  int64_t out = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &out)) return -1;
  return out;
}

// a + b, or -1 when either is negative or the sum does not fit in int64.
inline int64_t checked_add(int64_t a, int64_t b) {
  int64_t out = 0;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &out)) return -1;
  return out;
}

}  // namespace sdict_ext
