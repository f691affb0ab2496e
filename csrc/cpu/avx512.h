// Small AVX-512 helpers shared by the kernels' translation units (projection.cpp, gate_tile.cpp,
// gate_by_block.cpp, gate_amx.cpp, block_grads.cpp).
// Every function carries the target attribute itself and sits in an unnamed namespace, so each
// includer gets its own copy and no other translation unit can end up calling an AVX-512 one.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

// GCC 12's intrinsics (_mm512_unpacklo_ps, _mm512_shuffle_f32x4, _mm512_reduce_add_ps, ...)
// start from an undefined vector, which -W(maybe-)uninitialized reports once per inlined call; the
// lanes left undefined are never read. Off for every includer, since the report lands there.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define NANOMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace nanomoe::cpu {
namespace {

// Lanes [0, n) of 16.
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Lanes [0, n) of 32 (16-bit lanes), n >= 0.
inline __mmask32 first_lanes32(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
}

// Lane j of the result: the sum of v[j]'s 16 lanes. Pairs, then quads, of vectors are folded
// together: 45 instructions for 16 sums, against about 8 dependent ones per sum for a lane
// reduction of each.
NANOMOE_AVX512 inline __m512 sum_lanes16(const __m512 v[16]) {
  __m512 pairs[8], quads[4], octs[2];
  // 128-bit lane L of pairs[j]: partial sums of v[2j] at positions 0 and 2, of v[2j + 1] at 1, 3.
  for (int j = 0; j < 8; ++j) {
    pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                             _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  }
  // 128-bit lane L of quads[q]: the sums over L of v[4q], ..., v[4q + 3].
  for (int q = 0; q < 4; ++q) {
    const __m512 a = pairs[2 * q], b = pairs[2 * q + 1];
    quads[q] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // octs[o]: v[8o .. 8o + 3] over lanes 0-1 and over 2-3, then v[8o + 4 .. 8o + 7] likewise.
  for (int o = 0; o < 2; ++o) {
    const __m512 a = quads[2 * o], b = quads[2 * o + 1];
    octs[o] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(octs[0], octs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(octs[0], octs[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Transposes 16 rows of 16 32-bit elements in place: v[j] lane i becomes v[i] lane j. Pairs of rows
// are interleaved by 32 and 64 bits (each 128-bit lane then holds one column's four rows of a
// quarter), and the quarters gathered by 128-bit lanes: 64 shuffles.
NANOMOE_AVX512 inline void transpose16(__m512i v[16]) {
  __m512i pairs[16], quads[16];
  for (int i = 0; i < 16; i += 2) {
    pairs[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    pairs[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  // quads[4q + k], 128-bit lane L: rows 4q to 4q + 3 of column 4L + k.
  for (int q = 0; q < 4; ++q) {
    const __m512i* p = pairs + 4 * q;
    quads[4 * q] = _mm512_unpacklo_epi64(p[0], p[2]);
    quads[4 * q + 1] = _mm512_unpackhi_epi64(p[0], p[2]);
    quads[4 * q + 2] = _mm512_unpacklo_epi64(p[1], p[3]);
    quads[4 * q + 3] = _mm512_unpackhi_epi64(p[1], p[3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i low_lanes_ab = _mm512_shuffle_i32x4(quads[k], quads[4 + k], 0x44);
    const __m512i low_lanes_cd = _mm512_shuffle_i32x4(quads[8 + k], quads[12 + k], 0x44);
    const __m512i high_lanes_ab = _mm512_shuffle_i32x4(quads[k], quads[4 + k], 0xEE);
    const __m512i high_lanes_cd = _mm512_shuffle_i32x4(quads[8 + k], quads[12 + k], 0xEE);
    v[k] = _mm512_shuffle_i32x4(low_lanes_ab, low_lanes_cd, 0x88);
    v[4 + k] = _mm512_shuffle_i32x4(low_lanes_ab, low_lanes_cd, 0xDD);
    v[8 + k] = _mm512_shuffle_i32x4(high_lanes_ab, high_lanes_cd, 0x88);
    v[12 + k] = _mm512_shuffle_i32x4(high_lanes_ab, high_lanes_cd, 0xDD);
  }
}

// Stores the lanes of value as T: float32, or bfloat16 bits rounded to nearest even.
template <typename T>
NANOMOE_AVX512 inline void store_lanes(T* out, __mmask16 lanes, __m512 value) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(out, lanes, value);
  } else {
    _mm256_mask_storeu_epi16(out, lanes, (__m256i)_mm512_cvtneps_pbh(value));
  }
}

// Lanes of 16 elements from p as float32 (bfloat16 bits are float32's high half), the rest zero.
template <typename T>
NANOMOE_AVX512 inline __m512 load_as_float(__mmask16 lanes, const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(lanes, p);
  } else {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// count elements of src as float32: widened into buffer, or in place.
template <typename T>
NANOMOE_AVX512 inline const float* as_float(const T* src, int64_t count, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t c = 0; c < count; c += 16) {
      const __mmask16 lanes = first_lanes(count - c);
      _mm512_mask_storeu_ps(buffer + c, lanes, load_as_float(lanes, src + c));
    }
    return buffer;
  }
}

// The bfloat16 pairs (low[i], high[i]) of two vectors of float32, each rounded to nearest even:
// 16-bit lane 2i low[i], 2i + 1 high[i].
NANOMOE_AVX512 inline __m512i pair_rounded(__m512 low, __m512 high) {
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(high, low));
}

// Lanes [0, 16) of two bfloat16 rows side by side, one 32-bit pair per lane: first's bits low,
// second's (zeros where second is null) high, lanes past `lanes` zero.
NANOMOE_AVX512 inline __m512i paired_lanes(__mmask16 lanes, const uint16_t* first,
                                           const uint16_t* second) {
  const __m512i low = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, first));
  if (!second) return low;
  const __m512i high = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, second));
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

// Rows k and k + 1 of src side by side, one 32-bit pair per column: the first row's bits low; pair
// row k / 2 at dst + k / 2 * pair_stride. kSum: each row also added into the float32 column sums,
// in order (a bfloat16's bits shifted up 16 are its float32).
template <bool kSum>
NANOMOE_AVX512 void pair_rows(int64_t steps, int64_t cols, const uint16_t* src, int64_t src_stride,
                              uint16_t* dst, int64_t pair_stride, float* sums = nullptr) {
  for (int64_t k = 0; k < steps; k += 2) {
    const uint16_t* first = src + k * src_stride;
    const uint16_t* second = k + 1 < steps ? first + src_stride : nullptr;
    uint16_t* pairs = dst + k / 2 * pair_stride;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 lanes = first_lanes(cols - c);
      const __m512i both = paired_lanes(lanes, first + c, second ? second + c : nullptr);
      _mm512_mask_storeu_epi32(pairs + 2 * c, lanes, both);
      if constexpr (kSum) {
        __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, sums + c),
                                   _mm512_castsi512_ps(_mm512_slli_epi32(both, 16)));
        if (second) {
          const __m512i high_bits = _mm512_set1_epi32(int(0xFFFF0000u));
          sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_and_si512(both, high_bits)));
        }
        _mm512_mask_storeu_ps(sums + c, lanes, sum);
      }
    }
  }
}

}  // namespace
}  // namespace nanomoe::cpu
