// AVX-512 inner loops of the CPU kernels (see projection.h). Two shapes of the same product:
// - project_packed, for many tokens: a register tile of kTileTokens tokens x 32 output columns
//   (24 accumulators), fed by broadcasting one input element (float32) or one pair (bfloat16) and
//   two vector loads of a packed weight panel per step of the reduction;
// - project_rows, for a few tokens: dot products along the weight rows as they lie in memory, four
//   rows by up to four tokens at a time, reduced across lanes at the end.
#include "projection.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

// GCC 12's _mm512_reduce_add_ps starts from an undefined vector, and -Wmaybe-uninitialized
// reports it once per inlined call; the lanes it leaves undefined are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>

#define NANOMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace nanomoe::cpu::projection {
namespace {

constexpr int kTileTokens = 12;  // register tile rows: 12 x 2 accumulators + 2 panel vectors
constexpr int kDotTokens = 4;    // project_rows: up to 4 tokens x 4 rows = 16 accumulators
constexpr int kDotRows = 4;

int64_t panels_of(int64_t rows) {
  return (rows + kPanelRows - 1) / kPanelRows;
}
int64_t float_panel_size(int64_t depth) {
  return depth * kPanelRows;
}
int64_t bfloat16_panel_size(int64_t depth) {
  return (depth + 1) / 2 * 2 * kPanelRows;
}

// Lanes [0, n) of 16.
__mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
__mmask32 first_lanes32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1);
}

// float -> bfloat16 bits, rounding to nearest even like c10::BFloat16 (NaN stays NaN).
uint16_t to_bfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if (value != value) return 0x7FC0;
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// Calls fn(element, k) for every element of weight row c, k its position in the row.
template <typename T, typename F>
void for_each_in_row(const WeightRows<T>& w, int64_t c, const F& fn) {
  for (int64_t s = 0; s < w.segments; ++s) {
    const T* run = w.data + c * w.row_stride + s * w.segment_stride;
    for (int64_t l = 0; l < w.segment_len; ++l) fn(run[l], s * w.segment_len + l);
  }
}

// ---- project_packed ------------------------------------------------------------------------

// One register tile: tokens [0, kTokens) x the panel's 32 columns (lanes lo of the first 16,
// hi of the next 16 are stored).
template <int kTokens>
NANOMOE_AVX512 void tile_float(int64_t depth, const float* in, int64_t in_stride,
                               const float* panel, const float* bias, float* out,
                               int64_t out_stride, __mmask16 lo, __mmask16 hi) {
  __m512 acc[kTokens][2];
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 b0 = _mm512_loadu_ps(panel + k * kPanelRows);
    const __m512 b1 = _mm512_loadu_ps(panel + k * kPanelRows + 16);
#pragma GCC unroll 16
    for (int t = 0; t < kTokens; ++t) {
      const __m512 a = _mm512_set1_ps(in[t * in_stride + k]);
      acc[t][0] = _mm512_fmadd_ps(a, b0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(a, b1, acc[t][1]);
    }
  }
  const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(lo, bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(hi, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) {
    _mm512_mask_storeu_ps(out + t * out_stride, lo, _mm512_add_ps(acc[t][0], bias0));
    _mm512_mask_storeu_ps(out + t * out_stride + 16, hi, _mm512_add_ps(acc[t][1], bias1));
  }
}

// The bfloat16 panel holds pairs (k, k+1) of each column side by side, the operand layout of
// vdpbf16ps; an odd depth ends with a pair whose second half is zero.
NANOMOE_AVX512 inline void store_bfloat16(uint16_t* out, __mmask16 lanes, __m512 value) {
  _mm256_mask_storeu_epi16(out, lanes, (__m256i)_mm512_cvtneps_pbh(value));
}

template <int kTokens>
NANOMOE_AVX512 void tile_bfloat16(int64_t depth, const uint16_t* in, int64_t in_stride,
                                  const uint16_t* panel, const float* bias, uint16_t* out,
                                  int64_t out_stride, __mmask16 lo, __mmask16 hi) {
  __m512 acc[kTokens][2];
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const int64_t pairs = depth / 2;
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + k2 * 2 * kPanelRows);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + k2 * 2 * kPanelRows + kPanelRows);
#pragma GCC unroll 16
    for (int t = 0; t < kTokens; ++t) {
      int32_t pair;
      std::memcpy(&pair, in + t * in_stride + 2 * k2, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], a, b0);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], a, b1);
    }
  }
  if (depth % 2) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + pairs * 2 * kPanelRows);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + pairs * 2 * kPanelRows + kPanelRows);
#pragma GCC unroll 16
    for (int t = 0; t < kTokens; ++t) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(in[t * in_stride + depth - 1]);
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], a, b0);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], a, b1);
    }
  }
  const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(lo, bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(hi, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) {
    store_bfloat16(out + t * out_stride, lo, _mm512_add_ps(acc[t][0], bias0));
    store_bfloat16(out + t * out_stride + 16, hi, _mm512_add_ps(acc[t][1], bias1));
  }
}

// Runs tile<kTokens> for a tail of 1 to kTileTokens - 1 tokens (kTokens fixed at compile time
// keeps the accumulators in registers).
template <template <int> class Tile, int kTokens = kTileTokens - 1, typename... Args>
void tail_tile(int64_t tokens, Args... args) {
  if constexpr (kTokens > 0) {
    if (tokens == kTokens) return Tile<kTokens>::run(args...);
    tail_tile<Tile, kTokens - 1>(tokens, args...);
  }
}

template <int kTokens>
struct FloatTile {
  NANOMOE_AVX512 static void run(int64_t depth, const float* in, int64_t in_stride,
                                 const float* panel, const float* bias, float* out,
                                 int64_t out_stride, __mmask16 lo, __mmask16 hi) {
    tile_float<kTokens>(depth, in, in_stride, panel, bias, out, out_stride, lo, hi);
  }
};
template <int kTokens>
struct BFloat16Tile {
  NANOMOE_AVX512 static void run(int64_t depth, const uint16_t* in, int64_t in_stride,
                                 const uint16_t* panel, const float* bias, uint16_t* out,
                                 int64_t out_stride, __mmask16 lo, __mmask16 hi) {
    tile_bfloat16<kTokens>(depth, in, in_stride, panel, bias, out, out_stride, lo, hi);
  }
};

// Panel by panel (the panel stays in L1 while every token passes), tokens kTileTokens at a time.
template <template <int> class Tile, typename T>
void project_panels(int64_t tokens, const T* in, int64_t in_stride, const T* packed,
                    int64_t panel_size, int64_t rows, int64_t depth, const float* bias, T* out,
                    int64_t out_stride) {
  for (int64_t p = 0; p < panels_of(rows); ++p) {
    const int64_t first = p * kPanelRows, cols = std::min(kPanelRows, rows - first);
    const __mmask16 lo = first_lanes(cols), hi = first_lanes(cols - 16);
    const T* panel = packed + p * panel_size;
    const float* panel_bias = bias ? bias + first : nullptr;
    int64_t t = 0;
    for (; t + kTileTokens <= tokens; t += kTileTokens) {
      Tile<kTileTokens>::run(depth, in + t * in_stride, in_stride, panel, panel_bias,
                             out + t * out_stride + first, out_stride, lo, hi);
    }
    tail_tile<Tile>(tokens - t, depth, in + t * in_stride, in_stride, panel, panel_bias,
                    out + t * out_stride + first, out_stride, lo, hi);
  }
}

// ---- project_rows --------------------------------------------------------------------------

// out[t, c] for kTokens tokens and rows [c0, c0 + kDotRows) clamped to the last row (a clamped
// row is computed twice and stored once).
template <int kTokens>
NANOMOE_AVX512 void dot_float(const float* in, int64_t in_stride, const WeightRows<float>& w,
                              int64_t c0, const float* bias, float* out, int64_t out_stride) {
  const float* row[kDotRows];
  for (int n = 0; n < kDotRows; ++n) row[n] = w.data + std::min(c0 + n, w.rows - 1) * w.row_stride;
  __m512 acc[kTokens][kDotRows];
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) {
    for (int n = 0; n < kDotRows; ++n) acc[t][n] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < w.segments; ++s) {
    for (int64_t l = 0; l < w.segment_len; l += 16) {
      const __mmask16 lanes = first_lanes(w.segment_len - l);
      const int64_t at = s * w.segment_stride + l;
      __m512 weight[kDotRows];
#pragma GCC unroll 4
      for (int n = 0; n < kDotRows; ++n) weight[n] = _mm512_maskz_loadu_ps(lanes, row[n] + at);
#pragma GCC unroll 4
      for (int t = 0; t < kTokens; ++t) {
        const __m512 x = _mm512_maskz_loadu_ps(lanes, in + t * in_stride + s * w.segment_len + l);
#pragma GCC unroll 4
        for (int n = 0; n < kDotRows; ++n) acc[t][n] = _mm512_fmadd_ps(x, weight[n], acc[t][n]);
      }
    }
  }
  const int64_t stored = std::min<int64_t>(kDotRows, w.rows - c0);
  for (int t = 0; t < kTokens; ++t) {
    for (int64_t n = 0; n < stored; ++n) {
      out[t * out_stride + c0 + n] = _mm512_reduce_add_ps(acc[t][n]) + (bias ? bias[c0 + n] : 0.0f);
    }
  }
}

template <int kTokens>
NANOMOE_AVX512 void dot_bfloat16(const uint16_t* in, int64_t in_stride,
                                 const WeightRows<uint16_t>& w, int64_t c0, const float* bias,
                                 uint16_t* out, int64_t out_stride) {
  const uint16_t* row[kDotRows];
  for (int n = 0; n < kDotRows; ++n) row[n] = w.data + std::min(c0 + n, w.rows - 1) * w.row_stride;
  __m512 acc[kTokens][kDotRows];
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) {
    for (int n = 0; n < kDotRows; ++n) acc[t][n] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < w.segments; ++s) {
    for (int64_t l = 0; l < w.segment_len; l += 32) {
      const __mmask32 lanes = first_lanes32(w.segment_len - l);
      const int64_t at = s * w.segment_stride + l;
      __m512bh weight[kDotRows];
#pragma GCC unroll 4
      for (int n = 0; n < kDotRows; ++n) {
        weight[n] = (__m512bh)_mm512_maskz_loadu_epi16(lanes, row[n] + at);
      }
#pragma GCC unroll 4
      for (int t = 0; t < kTokens; ++t) {
        const __m512bh x =
            (__m512bh)_mm512_maskz_loadu_epi16(lanes, in + t * in_stride + s * w.segment_len + l);
#pragma GCC unroll 4
        for (int n = 0; n < kDotRows; ++n) acc[t][n] = _mm512_dpbf16_ps(acc[t][n], x, weight[n]);
      }
    }
  }
  const int64_t stored = std::min<int64_t>(kDotRows, w.rows - c0);
  for (int t = 0; t < kTokens; ++t) {
    for (int64_t n = 0; n < stored; ++n) {
      out[t * out_stride + c0 + n] =
          to_bfloat16(_mm512_reduce_add_ps(acc[t][n]) + (bias ? bias[c0 + n] : 0.0f));
    }
  }
}

// Rows kDotRows at a time (they stay in L1 while every token passes), tokens kDotTokens at a time.
template <typename T, typename Dot>
void project_dot_rows(int64_t tokens, const T* in, int64_t in_stride, const WeightRows<T>& w,
                      const float* bias, T* out, int64_t out_stride, const Dot& dot) {
  for (int64_t c0 = 0; c0 < w.rows; c0 += kDotRows) {
    for (int64_t t = 0; t < tokens; t += kDotTokens) {
      dot(std::min<int64_t>(kDotTokens, tokens - t), in + t * in_stride, in_stride, w, c0, bias,
          out + t * out_stride, out_stride);
    }
  }
}

}  // namespace

bool runs_float() {
  static const bool runs = __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return runs;
}

bool runs_bfloat16() {
  static const bool runs = runs_float() && __builtin_cpu_supports("avx512bf16");
  return runs;
}

int64_t packed_size(const WeightRows<float>& w) {
  return panels_of(w.rows) * float_panel_size(w.depth());
}

int64_t packed_size(const WeightRows<uint16_t>& w) {
  return panels_of(w.rows) * bfloat16_panel_size(w.depth());
}

void pack(const WeightRows<float>& w, float* packed) {
  const int64_t panel_size = float_panel_size(w.depth());
  if (w.rows % kPanelRows) {  // the last panel's missing rows must read as zeros
    std::fill_n(packed + (panels_of(w.rows) - 1) * panel_size, panel_size, 0.0f);
  }
  for (int64_t c = 0; c < w.rows; ++c) {
    float* column = packed + c / kPanelRows * panel_size + c % kPanelRows;
    for_each_in_row(w, c, [&](float value, int64_t k) { column[k * kPanelRows] = value; });
  }
}

void pack(const WeightRows<uint16_t>& w, uint16_t* packed) {
  const int64_t depth = w.depth(), panel_size = bfloat16_panel_size(depth);
  if (w.rows % kPanelRows || depth % 2) {  // missing rows and the odd depth's last half: zeros
    std::fill_n(packed, packed_size(w), uint16_t(0));
  }
  for (int64_t c = 0; c < w.rows; ++c) {
    // Lane c % 16 of the panel's first or second vector: its pair of k and k + 1 at 2 * lane.
    const int64_t in_panel = c % kPanelRows;
    uint16_t* column =
        packed + c / kPanelRows * panel_size + in_panel / 16 * kPanelRows + in_panel % 16 * 2;
    for_each_in_row(
        w, c, [&](uint16_t value, int64_t k) { column[k / 2 * 2 * kPanelRows + k % 2] = value; });
  }
}

void project_packed(int64_t tokens, const float* in, int64_t in_stride, const float* packed,
                    int64_t rows, int64_t depth, const float* bias, float* out,
                    int64_t out_stride) {
  project_panels<FloatTile>(tokens, in, in_stride, packed, float_panel_size(depth), rows, depth,
                            bias, out, out_stride);
}

void project_packed(int64_t tokens, const uint16_t* in, int64_t in_stride, const uint16_t* packed,
                    int64_t rows, int64_t depth, const float* bias, uint16_t* out,
                    int64_t out_stride) {
  project_panels<BFloat16Tile>(tokens, in, in_stride, packed, bfloat16_panel_size(depth), rows,
                               depth, bias, out, out_stride);
}

void project_rows(int64_t tokens, const float* in, int64_t in_stride, const WeightRows<float>& w,
                  const float* bias, float* out, int64_t out_stride) {
  project_dot_rows(tokens, in, in_stride, w, bias, out, out_stride, [](int64_t n, auto... args) {
    switch (n) {
      case 4:
        return dot_float<4>(args...);
      case 3:
        return dot_float<3>(args...);
      case 2:
        return dot_float<2>(args...);
      default:
        return dot_float<1>(args...);
    }
  });
}

void project_rows(int64_t tokens, const uint16_t* in, int64_t in_stride,
                  const WeightRows<uint16_t>& w, const float* bias, uint16_t* out,
                  int64_t out_stride) {
  project_dot_rows(tokens, in, in_stride, w, bias, out, out_stride, [](int64_t n, auto... args) {
    switch (n) {
      case 4:
        return dot_bfloat16<4>(args...);
      case 3:
        return dot_bfloat16<3>(args...);
      case 2:
        return dot_bfloat16<2>(args...);
      default:
        return dot_bfloat16<1>(args...);
    }
  });
}

}  // namespace nanomoe::cpu::projection

#else  // not x86-64: the callers take ATen's path, so the kernels are never reached

#include <cstdlib>

namespace nanomoe::cpu::projection {
bool runs_float() {
  return false;
}
bool runs_bfloat16() {
  return false;
}
int64_t packed_size(const WeightRows<float>&) {
  std::abort();
}
int64_t packed_size(const WeightRows<uint16_t>&) {
  std::abort();
}
void pack(const WeightRows<float>&, float*) {
  std::abort();
}
void pack(const WeightRows<uint16_t>&, uint16_t*) {
  std::abort();
}
void project_packed(int64_t, const float*, int64_t, const float*, int64_t, int64_t, const float*,
                    float*, int64_t) {
  std::abort();
}
void project_packed(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t,
                    const float*, uint16_t*, int64_t) {
  std::abort();
}
void project_rows(int64_t, const float*, int64_t, const WeightRows<float>&, const float*, float*,
                  int64_t) {
  std::abort();
}
void project_rows(int64_t, const uint16_t*, int64_t, const WeightRows<uint16_t>&, const float*,
                  uint16_t*, int64_t) {
  std::abort();
}
}  // namespace nanomoe::cpu::projection

#endif
