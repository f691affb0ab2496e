// AVX-512 inner loops of the CPU kernels (see projection.h). Two shapes of the same product:
// - project_packed, for many tokens: a register tile of kTileTokens tokens x 32 output columns
//   (24 accumulators), fed by broadcasting one input element (float32) or one pair (bfloat16) and
//   two vector loads of a packed weight panel per step of the reduction; a panel of at most 16
//   columns (a small rank or block), twice the tokens x 16 columns;
// - project_rows, for a few tokens: dot products along the weight rows as they lie in memory, four
//   rows by up to four tokens at a time, their 16 sums reduced across lanes together at the end.
// Where the CPU has AMX (amx.h), bfloat16 products give their leading rows to AMX blocks of 32 rows
// x one panel: the input rows as they lie, or for the weight gradients (whose reduction runs over
// tokens) the narrow operand transposed, its pairs of tokens side by side.
#include "projection.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "amx.h"
#include "avx512.h"

namespace nanomoe::cpu::projection {
namespace {

constexpr int kTileTokens = 12;  // register tile rows: 12 x 2 accumulators + 2 panel vectors
// A panel of at most 16 columns: its second 16 would multiply zeros, so the tile takes one vector
// of columns and twice the tokens (24 x 1 accumulators). Every step then loads about once per
// useful multiply-add (a broadcast of the input), against about once per two useful ones of the
// whole tile on a whole panel, and once per useful one on a half-empty panel.
constexpr int kNarrowTileTokens = 2 * kTileTokens;
constexpr int kDotRows = 4;  // project_rows: up to kDotTokens x 4 rows = 16 accumulators

int64_t panels_of(int64_t rows) {
  return (rows + kPanelRows - 1) / kPanelRows;
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

// ---- the two element types --------------------------------------------------------------

// What the kernels need to know of an element type. A "step" is the stretch of the reduction one
// multiply-add instruction covers per lane: one float32, or a pair of bfloat16 (vdpbf16ps). The
// packed panels store each column's steps side by side, so step k of the reduction sits at
// panel + k * kPanelRows for both types, and the panel's second 16 columns kStep * 16 further.
struct FloatOps {
  using T = float;
  using Vec = __m512;
  static constexpr int kStep = kElementsPerStep<T>;
  // The 16 steps' lanes at p; lanes off in `lanes` read as zeros.
  NANOMOE_AVX512 static Vec load(__mmask16 lanes, const T* p) {
    return _mm512_maskz_loadu_ps(lanes, p);
  }
  // Elements [0, n) of the 16 at p, zeros beyond.
  NANOMOE_AVX512 static Vec load_first(const T* p, int64_t n) {
    return _mm512_maskz_loadu_ps(first_lanes(n), p);
  }
  NANOMOE_AVX512 static Vec broadcast_step(const T* p) { return _mm512_set1_ps(*p); }
  NANOMOE_AVX512 static Vec broadcast_last(const T* p) { return _mm512_set1_ps(*p); }
  NANOMOE_AVX512 static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
  NANOMOE_AVX512 static void store(T* out, __mmask16 lanes, __m512 value) {
    _mm512_mask_storeu_ps(out, lanes, value);
  }
  static T from_float(float value) { return value; }
};

struct BFloat16Ops {
  using T = uint16_t;
  using Vec = __m512bh;
  static constexpr int kStep = kElementsPerStep<T>;
  NANOMOE_AVX512 static Vec load(__mmask16 lanes, const T* p) {
    return (Vec)_mm512_maskz_loadu_epi32(lanes, p);
  }
  // Elements [0, n) of the 32 at p, zeros beyond.
  NANOMOE_AVX512 static Vec load_first(const T* p, int64_t n) {
    const __mmask32 lanes = n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1);
    return (Vec)_mm512_maskz_loadu_epi16(lanes, p);
  }
  NANOMOE_AVX512 static Vec broadcast_step(const T* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof pair);
    return (Vec)_mm512_set1_epi32(pair);
  }
  // The odd depth's last element, paired with a zero.
  NANOMOE_AVX512 static Vec broadcast_last(const T* p) { return (Vec)_mm512_set1_epi32(*p); }
  NANOMOE_AVX512 static __m512 madd(__m512 acc, Vec a, Vec b) {
    return _mm512_dpbf16_ps(acc, a, b);
  }
  NANOMOE_AVX512 static void store(T* out, __mmask16 lanes, __m512 value) {
    _mm256_mask_storeu_epi16(out, lanes, (__m256i)_mm512_cvtneps_pbh(value));
  }
  static T from_float(float value) { return to_bfloat16(value); }
};

template <typename T>
struct OpsOf;
template <>
struct OpsOf<float> {
  using type = FloatOps;
};
template <>
struct OpsOf<uint16_t> {
  using type = BFloat16Ops;
};

int64_t panel_size(const WeightRows<float>& w) {
  return w.depth() * kPanelRows;
}
int64_t panel_size(const WeightRows<uint16_t>& w) {  // odd depths padded to whole pairs
  return (w.depth() + 1) / 2 * 2 * kPanelRows;
}

// ---- the register tile ----------------------------------------------------------------------

// The tile's left operand: element (t, k) at data + t * row_stride + k * k_stride. For bfloat16,
// k is even and the pair (k, k + 1) must lie side by side there (k_stride 1, or a paired layout).
template <typename T>
struct Input {
  const T* data;
  int64_t row_stride, k_stride;
  Input at(int64_t t) const { return {data + t * row_stride, row_stride, k_stride}; }
};

// Where the sums go: rounded to T, plus the bias (may be null) ...
template <typename Ops>
struct Store {
  using T = typename Ops::T;
  T* out;
  int64_t stride;
  const float* bias;
  Store at(int64_t t, int64_t c) const {
    return {out + t * stride + c, stride, bias ? bias + c : nullptr};
  }
  NANOMOE_AVX512 void put(int t, int half, __mmask16 lanes, __m512 sum) const {
    if (bias) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lanes, bias + 16 * half));
    Ops::store(out + t * stride + 16 * half, lanes, sum);
  }
  // Both halves of row t: bfloat16's 32 whole columns rounded by one instruction and written by
  // one 64-byte store (two 32-byte stores were a quarter of amx_panel's samples).
  NANOMOE_AVX512 void put_row(int t, __mmask16 lo, __mmask16 hi, __m512 first,
                              __m512 second) const {
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (lo == 0xFFFF && hi == 0xFFFF) {
        if (bias) {
          first = _mm512_add_ps(first, _mm512_loadu_ps(bias));
          second = _mm512_add_ps(second, _mm512_loadu_ps(bias + 16));
        }
        _mm512_storeu_si512(out + t * stride, (__m512i)_mm512_cvtne2ps_pbh(second, first));
        return;
      }
    }
    put(t, 0, lo, first);
    put(t, 1, hi, second);
  }
};

// ... or added into float32 sums (the weight gradients, summed tile by tile).
struct Accumulate {
  float* sums;
  int64_t stride;
  Accumulate at(int64_t t, int64_t c) const { return {sums + t * stride + c, stride}; }
  NANOMOE_AVX512 void put(int t, int half, __mmask16 lanes, __m512 sum) const {
    float* at = sums + t * stride + 16 * half;
    _mm512_mask_storeu_ps(at, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, at), sum));
  }
  NANOMOE_AVX512 void put_row(int t, __mmask16 lo, __mmask16 hi, __m512 first,
                              __m512 second) const {
    put(t, 0, lo, first);
    put(t, 1, hi, second);
  }
};

// One register tile: rows [0, kTokens) of the input x one panel of 32 weight columns, whose
// step k lies at panel + k * panel_stride (columns side by side, the second 16 kStep * 16
// further); lanes lo of the first 16 columns and hi of the second exist. kHalves = 1: only the
// first 16 columns (hi is empty), one accumulator per token.
// kUnitK: the input's k_stride is 1 (known at compile time, so the tile's input pointers step
// by a constant).
template <typename Ops, int kTokens, bool kUnitK, int kHalves = 2>
struct Tile {
  using T = typename Ops::T;
  using Accumulators = __m512[kTokens][kHalves];

  template <typename Out>
  NANOMOE_AVX512 __attribute__((noinline)) static void run(int64_t depth, Input<T> in,
                                                           const T* panel, int64_t panel_stride,
                                                           __mmask16 lo, __mmask16 hi,
                                                           const Out& out) {
    Accumulators acc;
#pragma GCC unroll 24
    for (int t = 0; t < kTokens; ++t) {
      for (int h = 0; h < kHalves; ++h) acc[t][h] = _mm512_setzero_ps();
    }
    const int64_t whole = depth / Ops::kStep * Ops::kStep;
    for (int64_t k = 0; k < whole; k += Ops::kStep) {
      step<false>(acc, in, panel + k * panel_stride, lo, hi, k);
    }
    if (whole < depth) step<true>(acc, in, panel + whole * panel_stride, lo, hi, whole);
#pragma GCC unroll 24
    for (int t = 0; t < kTokens; ++t) {
      if constexpr (kHalves == 2) {
        out.put_row(t, lo, hi, acc[t][0], acc[t][1]);
      } else {
        out.put(t, 0, lo, acc[t][0]);
      }
    }
  }

  // One step k of the reduction for every row; kLast: the odd depth's lone last element.
  template <bool kLast>
  NANOMOE_AVX512 __attribute__((always_inline)) static void step(Accumulators& acc,
                                                                 const Input<T>& in,
                                                                 const T* columns, __mmask16 lo,
                                                                 __mmask16 hi, int64_t k) {
    const auto b0 = Ops::load(lo, columns);
    const auto b1 = kHalves == 2 ? Ops::load(hi, columns + Ops::kStep * 16) : b0;
#pragma GCC unroll 24
    for (int t = 0; t < kTokens; ++t) {
      const T* a_at = in.data + t * in.row_stride + (kUnitK ? k : k * in.k_stride);
      const auto a = kLast ? Ops::broadcast_last(a_at) : Ops::broadcast_step(a_at);
      acc[t][0] = Ops::madd(acc[t][0], a, b0);
      if constexpr (kHalves == 2) acc[t][1] = Ops::madd(acc[t][1], a, b1);
    }
  }
};

// Runs Tile<Ops, kTokens, kUnitK, kHalves> for a tail of 1 to kTileTokens - 1 tokens (kTokens
// fixed at compile time keeps the accumulators in registers).
template <typename Ops, bool kUnitK, int kHalves, int kTokens = kTileTokens - 1, typename... Args>
void tail_tile(int64_t tokens, const Args&... args) {
  if constexpr (kTokens > 0) {
    if (tokens == kTokens) return Tile<Ops, kTokens, kUnitK, kHalves>::run(args...);
    tail_tile<Ops, kUnitK, kHalves, kTokens - 1>(tokens, args...);
  }
}

// Tokens [t, tokens) of one panel on register tiles: whole (kHalves = 2) or of its first 16
// columns (1), the narrow tile's leftover 12 or more tokens on a tile of 12.
template <typename Ops, bool kUnitK, int kHalves, typename T, typename Out>
void tile_tokens(int64_t t, int64_t tokens, int64_t depth, Input<T> in, const T* panel,
                 int64_t panel_stride, __mmask16 lo, __mmask16 hi, const Out& out) {
  constexpr int kTokens = kHalves == 2 ? kTileTokens : kNarrowTileTokens;
  for (; t + kTokens <= tokens; t += kTokens) {
    Tile<Ops, kTokens, kUnitK, kHalves>::run(depth, in.at(t), panel, panel_stride, lo, hi,
                                             out.at(t, 0));
  }
  if constexpr (kTokens > kTileTokens) {
    if (t + kTileTokens <= tokens) {
      Tile<Ops, kTileTokens, kUnitK, kHalves>::run(depth, in.at(t), panel, panel_stride, lo, hi,
                                                   out.at(t, 0));
      t += kTileTokens;
    }
  }
  // Only where there is a tail: the call's arguments, written to the stack as 8-byte halves and
  // copied 16 bytes at a time, made a load wait for every older store to drain (the panel's
  // output rows among them), after each panel even with no tail (NOTES, version 69).
  if (t == tokens) return;
  tail_tile<Ops, kUnitK, kHalves>(tokens - t, depth, in.at(t), panel, panel_stride, lo, hi,
                                  out.at(t, 0));
}

// ---- project_rows --------------------------------------------------------------------------

// out[t, c] for kTokens tokens and rows [c0, c0 + kDotRows) clamped to the last row (a clamped
// row is computed twice and stored once).
template <typename Ops, int kTokens>
NANOMOE_AVX512 void dot(const typename Ops::T* in, int64_t in_stride,
                        const WeightRows<typename Ops::T>& w, int64_t c0, const float* bias,
                        typename Ops::T* out, int64_t out_stride) {
  using T = typename Ops::T;
  constexpr int64_t kLanes = Ops::kStep * 16;  // elements per vector
  const T* row[kDotRows];
  for (int n = 0; n < kDotRows; ++n) row[n] = w.data + std::min(c0 + n, w.rows - 1) * w.row_stride;
  __m512 acc[kTokens][kDotRows];
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) {
    for (int n = 0; n < kDotRows; ++n) acc[t][n] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < w.segments; ++s) {
    for (int64_t l = 0; l < w.segment_len; l += kLanes) {
      const int64_t n_elements = w.segment_len - l, at = s * w.segment_stride + l;
      typename Ops::Vec weight[kDotRows];
#pragma GCC unroll 4
      for (int n = 0; n < kDotRows; ++n) weight[n] = Ops::load_first(row[n] + at, n_elements);
#pragma GCC unroll 4
      for (int t = 0; t < kTokens; ++t) {
        const auto x = Ops::load_first(in + t * in_stride + s * w.segment_len + l, n_elements);
#pragma GCC unroll 4
        for (int n = 0; n < kDotRows; ++n) acc[t][n] = Ops::madd(acc[t][n], x, weight[n]);
      }
    }
  }
  static_assert(kDotTokens * kDotRows == 16, "one folded reduction covers every sum");
  __m512 flat[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    flat[i] = i < kTokens * kDotRows ? acc[i / kDotRows][i % kDotRows] : _mm512_setzero_ps();
  }
  float sums[16];
  _mm512_storeu_ps(sums, sum_lanes16(flat));
  const int64_t stored = std::min<int64_t>(kDotRows, w.rows - c0);
  for (int t = 0; t < kTokens; ++t) {
    for (int64_t n = 0; n < stored; ++n) {
      out[t * out_stride + c0 + n] =
          Ops::from_float(sums[t * kDotRows + n] + (bias ? bias[c0 + n] : 0.0f));
    }
  }
}

// ---- the entry points, for either element type ----------------------------------------------

template <typename T>
void pack_rows(const WeightRows<T>& w, T* packed) {
  constexpr int64_t kStep = kElementsPerStep<T>;
  const int64_t size = panel_size(w);
  if (w.rows % kPanelRows || w.depth() % kStep) {  // missing rows, odd depth's last half: zeros
    std::fill_n(packed, panels_of(w.rows) * size, T(0));
  }
  for (int64_t c = 0; c < w.rows; ++c) {
    // Lane c % 16 of the panel's first or second vector of each step, its elements side by side.
    const int64_t in_panel = c % kPanelRows;
    T* column = packed + c / kPanelRows * size + in_panel / 16 * 16 * kStep + in_panel % 16 * kStep;
    for_each_in_row(w, c, [&](T value, int64_t k) {
      column[k / kStep * kStep * kPanelRows + k % kStep] = value;
    });
  }
}

// The rows AMX multiplies: row t at data + t * stride, its k side by side (the tile's input itself
// when its k_stride is 1; for the weight gradients, a transposed copy). Null data: no AMX.
struct AmxRows {
  const uint16_t* data = nullptr;
  int64_t stride = 0;
};

// The leading rows (a multiple of 16) of one bfloat16 panel on AMX, 32 at a time, each block's
// float32 sums handed to `out` as the register tile hands its own (but for a whole panel's weight
// gradients, which the tiles add into their sums where those lie); returns how many it covered.
template <typename Out>
NANOMOE_AVX512 int64_t amx_panel(int64_t tokens, int64_t depth, AmxRows in, const uint16_t* panel,
                                 int64_t panel_stride, __mmask16 lo, __mmask16 hi, const Out& out) {
  alignas(64) float sums[amx::kTokens * amx::kCols];
  const int64_t covered = tokens / 16 * 16;
  // A panel of 16 columns or fewer: half the product (its second 16 columns are never read).
  const bool narrow = hi == 0;
  for (int64_t t = 0; t < covered; t += amx::kTokens) {
    const int64_t rows = std::min(amx::kTokens, covered - t);
    // A step is a pair, so pair p lies kStep steps of panel_stride after pair p - 1.
    if constexpr (std::is_same_v<Out, Accumulate>) {
      if (lo == 0xFFFF && hi == 0xFFFF) {  // the tiles add into the sums where they lie
        const Accumulate block = out.at(t, 0);
        amx::add_product(rows, in.data + t * in.stride, in.stride, panel,
                         BFloat16Ops::kStep * panel_stride, depth, block.sums, block.stride);
        continue;
      }
    }
    amx::product(rows, in.data + t * in.stride, in.stride, panel, BFloat16Ops::kStep * panel_stride,
                 depth, sums, narrow ? 16 : amx::kCols);
    const Out block = out.at(t, 0);
    for (int64_t row = 0; row < rows; ++row) {
      const __m512 first = _mm512_load_ps(sums + row * amx::kCols);
      if (narrow) {
        block.put(row, 0, lo, first);
      } else {
        block.put_row(row, lo, hi, first, _mm512_load_ps(sums + row * amx::kCols + 16));
      }
    }
  }
  return covered;
}

// Panel by panel (the panel stays in L1 while every row passes), rows a register tile at a time.
// Panel p starts at w + p * panel_offset, its step k panel_stride further per k. Given amx rows,
// the leading rows go to AMX on every panel whose columns may all be read, 32 or 16 of them: all
// when padded (packed panels are), else those of 32 or exactly 16 columns.
template <bool kUnitK, typename T, typename Out>
void project_panels(int64_t tokens, int64_t depth, int64_t cols, Input<T> in, const T* w,
                    int64_t panel_offset, int64_t panel_stride, bool padded, const Out& out,
                    AmxRows amx_rows = {}) {
  using Ops = typename OpsOf<T>::type;
  std::optional<amx::Tiles> tiles;  // configured only where some panel takes AMX
  if (amx_rows.data && tokens >= 16 && (padded || cols >= 16)) tiles.emplace();
  for (int64_t p = 0; p < panels_of(cols); ++p) {
    const int64_t first = p * kPanelRows, width = std::min(kPanelRows, cols - first);
    const __mmask16 lo = first_lanes(width), hi = first_lanes(width - 16);
    const T* panel = w + p * panel_offset;
    int64_t t = 0;
    if constexpr (std::is_same_v<T, uint16_t>) {
      // A panel of exactly 16 columns is read as 16, from a depth of 16 (shallower, the register
      // tile is as fast: NOTES, versions 40 and 49).
      const bool readable = width == kPanelRows || (width == 16 && depth >= 16);
      if (tiles && (padded || readable)) {
        t = amx_panel(tokens, depth, amx_rows, panel, panel_stride, lo, hi, out.at(0, first));
      }
    }
    if (width <= 16) {
      tile_tokens<Ops, kUnitK, 1>(t, tokens, depth, in, panel, panel_stride, lo, hi,
                                  out.at(0, first));
    } else {
      tile_tokens<Ops, kUnitK, 2>(t, tokens, depth, in, panel, panel_stride, lo, hi,
                                  out.at(0, first));
    }
  }
}

// The input rows as they lie, for AMX where it runs: bfloat16 with unit k_stride.
template <typename T>
AmxRows amx_rows_of(const T* in, int64_t in_stride) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (amx::available()) return {in, in_stride};
  }
  return {};
}

// dst row c (at dst + c * dst_stride) = column c of src, its pairs side by side: a transpose of
// 32-bit pairs, 16 x 16 at a time, src's `pairs` rows of pairs (row q at src + q * src_row) by
// `cols` columns. Only the pairs < `pairs` of each dst row are written.
NANOMOE_AVX512 void transpose_pair_tiles(int64_t pairs, int64_t cols, const uint16_t* src,
                                         int64_t src_row, uint16_t* dst, int64_t dst_stride) {
  for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 in_cols = first_lanes(cols - c0);
      __m512i row[16];
      for (int i = 0; i < 16; ++i) {
        row[i] = q0 + i < pairs
                     ? _mm512_maskz_loadu_epi32(in_cols, src + (q0 + i) * src_row + 2 * c0)
                     : _mm512_setzero_si512();
      }
      transpose16(row);
      const __mmask16 out_pairs = first_lanes(pairs - q0);
      for (int64_t c = c0; c < std::min(cols, c0 + 16); ++c) {
        _mm512_mask_storeu_epi32(dst + c * dst_stride + 2 * q0, out_pairs, row[c - c0]);
      }
    }
  }
}

// pack_rows for rows whose segments are whole steps (float32's always are; bfloat16's where their
// length is even): each panel's steps are a transpose of the rows' 32-bit steps, 16 x 16 at a
// time (element by element, the copy was 5% of the bfloat16 forward's samples at 4096 tokens,
// K = 8, r = 64).
template <typename T>
void pack_by_transpose(const WeightRows<T>& w, T* packed) {
  constexpr int64_t kStep = kElementsPerStep<T>, kHalves = sizeof(T) / sizeof(uint16_t);
  const int64_t size = panel_size(w), steps = w.segment_len / kStep;
  if (w.rows % kPanelRows) std::fill_n(packed, panels_of(w.rows) * size, T(0));
  // In 16-bit units, as transpose_pair_tiles reads and writes them.
  const auto* rows = reinterpret_cast<const uint16_t*>(w.data);
  auto* panels = reinterpret_cast<uint16_t*>(packed);
  for (int64_t p = 0; p < panels_of(w.rows); ++p) {
    const int64_t first = p * kPanelRows, count = std::min(kPanelRows, w.rows - first);
    for (int64_t s = 0; s < w.segments; ++s) {
      transpose_pair_tiles(
          count, steps, rows + (first * w.row_stride + s * w.segment_stride) * kHalves,
          w.row_stride * kHalves, panels + (p * size + s * w.segment_len * kPanelRows) * kHalves,
          2 * kPanelRows);
    }
  }
}

// a's columns as AMX rows, transposed into this thread's buffer (kept between calls), when AMX
// runs and there are rows and columns enough for it.
AmxRows amx_rows_of(int64_t depth, Steps<uint16_t> a, int64_t a_cols, int64_t b_cols) {
  const bool panels_fit = b_cols >= kPanelRows || b_cols == 16;  // some panel takes AMX
  if (a_cols < 16 || !panels_fit || !amx::available()) return {};
  thread_local std::vector<uint16_t> buffer;
  const int64_t pairs = (depth + 1) / 2, stride = (pairs + 15) / 16 * 32;
  if (static_cast<int64_t>(buffer.size()) < a_cols * stride) buffer.resize(a_cols * stride);
  transpose_pair_tiles(pairs, a_cols, a.data, 2 * a.stride, buffer.data(),
                       stride);  // a pair per step
  return {buffer.data(), stride};
}
AmxRows amx_rows_of(int64_t, Steps<float>, int64_t, int64_t) {
  return {};
}

// Rows kDotRows at a time (they stay in L1 while every token passes), tokens kDotTokens at a time.
template <typename T>
void project_dot_rows(int64_t tokens, const T* in, int64_t in_stride, const WeightRows<T>& w,
                      const float* bias, T* out, int64_t out_stride) {
  using Ops = typename OpsOf<T>::type;
  static constexpr decltype(&dot<Ops, 1>) kDot[kDotTokens] = {dot<Ops, 1>, dot<Ops, 2>, dot<Ops, 3>,
                                                              dot<Ops, 4>};
  for (int64_t c0 = 0; c0 < w.rows; c0 += kDotRows) {
    for (int64_t t = 0; t < tokens; t += kDotTokens) {
      kDot[std::min<int64_t>(kDotTokens, tokens - t) - 1](in + t * in_stride, in_stride, w, c0,
                                                          bias, out + t * out_stride, out_stride);
    }
  }
}

// The weight rows' leading multiple of 16 on AMX: the rows as the tile unit's first operand, read
// in place, the packed input as its second (its columns are the tokens); the sums of each 16 rows
// transposed back to tokens x rows. The remaining rows take the dot products.
NANOMOE_AVX512 void project_rows_on_amx(int64_t tokens, const uint16_t* packed, const uint16_t* in,
                                        int64_t in_stride, const WeightRows<uint16_t>& w,
                                        const float* bias, uint16_t* out, int64_t out_stride) {
  constexpr int64_t kRows = 16, kPairRow = 2 * amx::kCols;
  const int64_t whole = w.rows / kRows * kRows;
  if (whole > 0) {
    const amx::Tiles tiles;
    alignas(64) float total[kRows * amx::kCols], segment[kRows * amx::kCols];
    alignas(64) float by_token[kRowsTokensOnAmx * kRows];
    for (int64_t c0 = 0; c0 < whole; c0 += kRows) {
      for (int64_t s = 0; s < w.segments; ++s) {
        const uint16_t* rows = w.data + c0 * w.row_stride + s * w.segment_stride;
        // Segment s's input pairs follow the s * segment_len / 2 pair rows of those before it.
        amx::product(kRows, rows, w.row_stride, packed + s * w.segment_len * amx::kCols, kPairRow,
                     w.segment_len, s == 0 ? total : segment);
        for (int64_t i = 0; s > 0 && i < kRows * amx::kCols; i += 16) {
          _mm512_store_ps(total + i,
                          _mm512_add_ps(_mm512_load_ps(total + i), _mm512_load_ps(segment + i)));
        }
      }
      transpose_pair_tiles(kRows, tokens, reinterpret_cast<const uint16_t*>(total), kPairRow,
                           reinterpret_cast<uint16_t*>(by_token), 2 * kRows);
      const __m512 add = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
      for (int64_t t = 0; t < tokens; ++t) {
        store_lanes(out + t * out_stride + c0, first_lanes(kRows),
                    _mm512_add_ps(_mm512_load_ps(by_token + t * kRows), add));
      }
    }
  }
  if (whole < w.rows) {
    WeightRows<uint16_t> rest = w;
    rest.data += whole * w.row_stride;
    rest.rows -= whole;
    project_dot_rows(tokens, in, in_stride, rest, bias ? bias + whole : nullptr, out + whole,
                     out_stride);
  }
}

// packed pair row p, column t: the pair (in[t, 2p], in[t, 2p + 1]); zeros in the columns of no
// token.
NANOMOE_AVX512 void pack_input_pairs(int64_t tokens, const uint16_t* in, int64_t in_stride,
                                     int64_t depth, uint16_t* packed) {
  constexpr int64_t kPairRow = 2 * amx::kCols;
  const int64_t pairs = depth / 2;
  transpose_pair_tiles(tokens, pairs, in, in_stride, packed, kPairRow);
  const __mmask32 no_token = ~((__mmask32(1) << tokens) - 1);
  for (int64_t p = 0; p < pairs; ++p) {
    _mm512_mask_storeu_epi32(packed + p * kPairRow, __mmask16(no_token), _mm512_setzero_si512());
    _mm512_mask_storeu_epi32(packed + p * kPairRow + amx::kCols, __mmask16(no_token >> 16),
                             _mm512_setzero_si512());
  }
}

template <typename T>
void project_from_packed(int64_t tokens, const T* in, int64_t in_stride, const T* packed,
                         int64_t rows, int64_t depth, const float* bias, T* out,
                         int64_t out_stride) {
  using Ops = typename OpsOf<T>::type;
  const int64_t size = panel_size(WeightRows<T>{nullptr, rows, 1, depth, depth, 0});
  project_panels<true>(tokens, depth, rows, Input<T>{in, in_stride, 1}, packed, size, kPanelRows,
                       /*padded=*/true, Store<Ops>{out, out_stride, bias},
                       amx_rows_of(in, in_stride));
}

// A panel of 32 columns of a matrix by steps begins kStep * 32 elements after the previous one.
template <typename T>
void project_by_steps(int64_t tokens, const T* in, int64_t in_stride, Steps<T> w, int64_t cols,
                      int64_t depth, T* out, int64_t out_stride) {
  using Ops = typename OpsOf<T>::type;
  project_panels<true>(tokens, depth, cols, Input<T>{in, in_stride, 1}, w.data,
                       Ops::kStep * kPanelRows, w.stride, /*padded=*/false,
                       Store<Ops>{out, out_stride, nullptr}, amx_rows_of(in, in_stride));
}

// The rows of the tile are a's columns: (a_col, k) at a.data + a_col * kStep + k * a.stride.
template <typename T>
void accumulate_steps(int64_t depth, Steps<T> a, int64_t a_cols, Steps<T> b, int64_t b_cols,
                      float* sums, int64_t sums_stride) {
  constexpr int64_t kStep = kElementsPerStep<T>;
  project_panels<false>(a_cols, depth, b_cols, Input<T>{a.data, kStep, a.stride}, b.data,
                        kStep * kPanelRows, b.stride, /*padded=*/false,
                        Accumulate{sums, sums_stride}, amx_rows_of(depth, a, a_cols, b_cols));
}

// Each column summed over the tokens in order; kColumnVectors vectors of columns at a time, so that
// as many additions are in flight (one column's chain alone waits out the adder's latency at every
// token).
template <typename Ops>
NANOMOE_AVX512 void column_sums(int64_t tokens, int64_t cols, const typename Ops::T* in,
                                int64_t stride, float* sums) {
  constexpr int kColumnVectors = 8;
  for (int64_t c0 = 0; c0 < cols; c0 += 16 * kColumnVectors) {
    __mmask16 lanes[kColumnVectors];
    __m512 sum[kColumnVectors];
    for (int v = 0; v < kColumnVectors; ++v) {
      lanes[v] = first_lanes(cols - c0 - 16 * v);
      sum[v] = _mm512_maskz_loadu_ps(lanes[v], sums + c0 + 16 * v);
    }
    for (int64_t t = 0; t < tokens; ++t) {
#pragma GCC unroll 8
      for (int v = 0; v < kColumnVectors; ++v) {
        sum[v] = _mm512_add_ps(sum[v], load_as_float(lanes[v], in + t * stride + c0 + 16 * v));
      }
    }
    for (int v = 0; v < kColumnVectors; ++v) {
      _mm512_mask_storeu_ps(sums + c0 + 16 * v, lanes[v], sum[v]);
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
  return panels_of(w.rows) * panel_size(w);
}
int64_t packed_size(const WeightRows<uint16_t>& w) {
  return panels_of(w.rows) * panel_size(w);
}

void pack(const WeightRows<float>& w, float* packed) {
  pack_by_transpose(w, packed);
}
void pack(const WeightRows<uint16_t>& w, uint16_t* packed) {
  if (w.segment_len % 2 == 0) return pack_by_transpose(w, packed);
  pack_rows(w, packed);
}

void project_packed(int64_t tokens, const float* in, int64_t in_stride, const float* packed,
                    int64_t rows, int64_t depth, const float* bias, float* out,
                    int64_t out_stride) {
  project_from_packed(tokens, in, in_stride, packed, rows, depth, bias, out, out_stride);
}
void project_packed(int64_t tokens, const uint16_t* in, int64_t in_stride, const uint16_t* packed,
                    int64_t rows, int64_t depth, const float* bias, uint16_t* out,
                    int64_t out_stride) {
  project_from_packed(tokens, in, in_stride, packed, rows, depth, bias, out, out_stride);
}

int64_t paired_size(int64_t steps, int64_t cols) {
  return (steps + 1) / 2 * 2 * cols;
}

void pair_steps(int64_t steps, int64_t cols, const uint16_t* src, int64_t src_stride, uint16_t* dst,
                int64_t pair_stride) {
  pair_rows<false>(steps, cols, src, src_stride, dst, pair_stride);
}

void pair_steps_summing(int64_t steps, int64_t cols, const uint16_t* src, int64_t src_stride,
                        uint16_t* dst, int64_t pair_stride, float* sums) {
  pair_rows<true>(steps, cols, src, src_stride, dst, pair_stride, sums);
}

void transpose_pairs(int64_t pairs, int64_t cols, const uint16_t* src, int64_t src_row,
                     uint16_t* dst, int64_t dst_stride) {
  transpose_pair_tiles(pairs, cols, src, src_row, dst, dst_stride);
}

void project_steps(int64_t tokens, const float* in, int64_t in_stride, Steps<float> w, int64_t cols,
                   int64_t depth, float* out, int64_t out_stride) {
  project_by_steps(tokens, in, in_stride, w, cols, depth, out, out_stride);
}
void project_steps(int64_t tokens, const uint16_t* in, int64_t in_stride, Steps<uint16_t> w,
                   int64_t cols, int64_t depth, uint16_t* out, int64_t out_stride) {
  project_by_steps(tokens, in, in_stride, w, cols, depth, out, out_stride);
}

void accumulate_products(int64_t depth, Steps<float> a, int64_t a_cols, Steps<float> b,
                         int64_t b_cols, float* sums, int64_t sums_stride) {
  accumulate_steps(depth, a, a_cols, b, b_cols, sums, sums_stride);
}
void accumulate_products(int64_t depth, Steps<uint16_t> a, int64_t a_cols, Steps<uint16_t> b,
                         int64_t b_cols, float* sums, int64_t sums_stride) {
  accumulate_steps(depth, a, a_cols, b, b_cols, sums, sums_stride);
}

void accumulate_columns(int64_t tokens, int64_t cols, const float* in, int64_t stride,
                        float* sums) {
  column_sums<FloatOps>(tokens, cols, in, stride, sums);
}
void accumulate_columns(int64_t tokens, int64_t cols, const uint16_t* in, int64_t stride,
                        float* sums) {
  column_sums<BFloat16Ops>(tokens, cols, in, stride, sums);
}

void project_rows(int64_t tokens, const float* in, int64_t in_stride, const WeightRows<float>& w,
                  const float* bias, float* out, int64_t out_stride) {
  project_dot_rows(tokens, in, in_stride, w, bias, out, out_stride);
}
void project_rows(int64_t tokens, const uint16_t* in, int64_t in_stride,
                  const WeightRows<uint16_t>& w, const float* bias, uint16_t* out,
                  int64_t out_stride) {
  project_dot_rows(tokens, in, in_stride, w, bias, out, out_stride);
}

bool rows_on_amx(int64_t tokens, const WeightRows<uint16_t>& w) {
  return tokens >= kRowsMinTokensOnAmx && tokens <= kRowsTokensOnAmx && w.rows >= 16 &&
         w.segment_len % 2 == 0 && amx::available();
}
int64_t rows_input_size(const WeightRows<uint16_t>& w) {
  return w.depth() * amx::kCols;
}
void pack_rows_input(int64_t tokens, const uint16_t* in, int64_t in_stride, int64_t depth,
                     uint16_t* packed) {
  pack_input_pairs(tokens, in, in_stride, depth, packed);
}
void project_rows(int64_t tokens, const uint16_t* packed, const uint16_t* in, int64_t in_stride,
                  const WeightRows<uint16_t>& w, const float* bias, uint16_t* out,
                  int64_t out_stride) {
  project_rows_on_amx(tokens, packed, in, in_stride, w, bias, out, out_stride);
}

// The largest magnitude (a value's bits without its sign, as an unsigned integer) against Inf's:
// NaNs lie above it. One max per 32 values and one test at the end (testing each 32 for the
// exponent's ones, with a branch each, took 5% of the bfloat16 forward at K = 64, r = 16).
NANOMOE_AVX512 bool all_finite(int64_t count, const uint16_t* data) {
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF);
  __m512i largest[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  int64_t c = 0;
  for (; c + 64 <= count; c += 64) {
    for (int i = 0; i < 2; ++i) {
      const __m512i value = _mm512_loadu_si512(data + c + 32 * i);
      largest[i] = _mm512_max_epu16(largest[i], _mm512_and_si512(value, magnitude));
    }
  }
  for (; c < count; c += 32) {
    const __m512i value = _mm512_maskz_loadu_epi16(first_lanes32(count - c), data + c);
    largest[0] = _mm512_max_epu16(largest[0], _mm512_and_si512(value, magnitude));
  }
  const __m512i both = _mm512_max_epu16(largest[0], largest[1]);
  return _mm512_cmpge_epu16_mask(both, _mm512_set1_epi16(0x7F80)) == 0;
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
bool all_finite(int64_t, const uint16_t*) {
  std::abort();
}
bool rows_on_amx(int64_t, const WeightRows<uint16_t>&) {
  return false;
}
int64_t rows_input_size(const WeightRows<uint16_t>&) {
  std::abort();
}
void pack_rows_input(int64_t, const uint16_t*, int64_t, int64_t, uint16_t*) {
  std::abort();
}
void project_rows(int64_t, const uint16_t*, const uint16_t*, int64_t, const WeightRows<uint16_t>&,
                  const float*, uint16_t*, int64_t) {
  std::abort();
}
int64_t paired_size(int64_t, int64_t) {
  std::abort();
}
void pair_steps_summing(int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t, float*) {
  std::abort();
}
void pair_steps(int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t) {
  std::abort();
}
void transpose_pairs(int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t) {
  std::abort();
}
void project_steps(int64_t, const float*, int64_t, Steps<float>, int64_t, int64_t, float*,
                   int64_t) {
  std::abort();
}
void project_steps(int64_t, const uint16_t*, int64_t, Steps<uint16_t>, int64_t, int64_t, uint16_t*,
                   int64_t) {
  std::abort();
}
void accumulate_products(int64_t, Steps<float>, int64_t, Steps<float>, int64_t, float*, int64_t) {
  std::abort();
}
void accumulate_products(int64_t, Steps<uint16_t>, int64_t, Steps<uint16_t>, int64_t, float*,
                         int64_t) {
  std::abort();
}
void accumulate_columns(int64_t, int64_t, const float*, int64_t, float*) {
  std::abort();
}
void accumulate_columns(int64_t, int64_t, const uint16_t*, int64_t, float*) {
  std::abort();
}
}  // namespace nanomoe::cpu::projection

#endif
