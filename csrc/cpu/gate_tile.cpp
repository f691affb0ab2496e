// AVX-512 mixing (see gate_tile.h) in groups of eight tokens, summed over the source blocks in
// registers: the scalar and diagonal gates as two halves of 4 tokens by 4 destination blocks by 16
// lanes (each load of the gate serves the 4 tokens, each load of a source row the 4 blocks),
// diagonal_outer (whose dot products are per destination block) as the 8 tokens by 32 lanes of one
// destination block.
// Where the gate is laid out by block (gate_layout.h, mixes_by_block), gate_by_block.cpp mixes, and
// where bfloat16's gates are laid out for AMX (gate_amx::chosen), gate_amx.cpp.
// Their source rows (converted to float32 once when they are bfloat16) and the gate stay in L1.
// bfloat16's diagonal_outer takes its dot products from products of bfloat16 pairs (on AMX, else by
// vdpbf16ps) where dots_from_pairs says, and there mixes by vdpbf16ps too, on pairs of source
// blocks (mix_tokens_in_pairs).
// The weight gradients are summed in the layout of whichever of these kernels sums them.
#include "gate_tile.h"

#include <algorithm>
#include <cassert>
#include <cstring>

#include "amx.h"
#include "gate_amx.h"
#include "gate_by_block.h"

namespace nanomoe::cpu::gate_tile {
namespace {

// Where a thread sums the gate's weight gradients (see gate_tile.h): bfloat16's diagonal and
// diagonal_outer on AMX in tiles of their own, a gate laid out by block in that layout (unless
// the scalar gate's sums are on AMX: those are in mix's layout), else mix's layout.
enum class GradsLayout { kMix, kAmxTiles, kByBlock };

GradsLayout grads_layout(const GateRows<float>& g) {
  if (gate_amx::tile_grads_chosen(g)) return GradsLayout::kAmxTiles;
  if (g.mix_by_block && !gate_amx::grads_chosen(g)) return GradsLayout::kByBlock;
  return GradsLayout::kMix;
}

int64_t mix_numel(const GateRows<float>& g) {
  return g.dst_blocks * g.src_blocks * g.steps();
}

}  // namespace

int64_t grads_size(const GateRows<float>& g) {
  switch (grads_layout(g)) {
    case GradsLayout::kAmxTiles:
      return gate_amx::tile_grads_size(g);
    case GradsLayout::kByBlock:
      return gate_by_block::grads_size(g);
    default:
      return (g.variant == 2 ? 3 : 1) * mix_numel(g);
  }
}

bool dots_from_pairs(const GateRows<float>& g, int64_t tokens) {
  // One product's tokens: at 16 tokens (4096 features, K = 8, r = 256) laying out the pairs cost
  // more than the products saved (forward 0.97x / 1.19x the time, minimum / median; NOTES 55).
  constexpr int64_t kMinTokens = amx::kTokens;
  return g.variant == 2 && !g.mix_by_block && !g.amx_gate && tokens >= kMinTokens;
}

namespace {

// Blocks as the dot products' columns: one 16-column tile's worth, or 32-column blocks.
int64_t pair_cols(int64_t blocks) {
  return blocks <= 16 ? 16 : (blocks + amx::kCols - 1) / amx::kCols * amx::kCols;
}

// Each row block a's (rank x column block b) matrix by pairs of rank positions, from the float32
// copies of bfloat16 weights at rows (entry (a, b, c) at rows + a * a_stride + b * b_stride + c).
void lay_out_pairs(const float* rows, int64_t a_blocks, int64_t a_stride, int64_t b_blocks,
                   int64_t b_stride, int64_t rank, uint16_t* pairs) {
  const int64_t cols = pair_cols(b_blocks), pair_rows = (rank + 1) / 2;
  std::fill_n(pairs, a_blocks * pair_rows * 2 * cols, uint16_t(0));
  for (int64_t a = 0; a < a_blocks; ++a) {
    for (int64_t b = 0; b < b_blocks; ++b) {
      const float* row = rows + a * a_stride + b * b_stride;
      for (int64_t c = 0; c < rank; ++c) {
        uint32_t bits;  // a bfloat16's float32 copy: the high half is the value
        std::memcpy(&bits, row + c, sizeof bits);
        pairs[((a * pair_rows + c / 2) * cols + b) * 2 + c % 2] = uint16_t(bits >> 16);
      }
    }
  }
}

int64_t right_pairs_size(const GateRows<float>& g) {
  return g.src_blocks * ((g.rank + 1) / 2) * 2 * pair_cols(g.dst_blocks);
}

}  // namespace

int64_t dot_pairs_size(const GateRows<float>& g, bool with_left) {
  const int64_t left = g.dst_blocks * ((g.rank + 1) / 2) * 2 * pair_cols(g.src_blocks);
  return right_pairs_size(g) + (with_left ? left : 0);
}

void lay_out_dot_pairs(GateRows<float>& g, bool with_left, uint16_t* pairs) {
  lay_out_pairs(g.right, g.src_blocks, g.src_stride, g.dst_blocks, g.dst_stride, g.rank, pairs);
  g.right_pairs = pairs;
  g.right_cols = pair_cols(g.dst_blocks);
  if (!with_left) return;
  uint16_t* left = pairs + right_pairs_size(g);
  lay_out_pairs(g.left, g.dst_blocks, g.dst_stride, g.src_blocks, g.src_stride, g.rank, left);
  g.left_pairs = left;
  g.left_cols = pair_cols(g.src_blocks);
}

void grads_to_mix(const GateRows<float>& g, const float* sums, float* grad_mix, float* grad_left,
                  float* grad_right) {
  switch (grads_layout(g)) {
    case GradsLayout::kAmxTiles:
      return gate_amx::tile_grads_to_mix(g, sums, grad_mix, grad_left, grad_right);
    case GradsLayout::kByBlock:
      return gate_by_block::grads_to_mix(g, sums, grad_mix, grad_left, grad_right);
    default: {
      const int64_t numel = mix_numel(g);
      std::copy_n(sums, numel, grad_mix);
      if (g.variant != 2) return;
      std::copy_n(sums + numel, numel, grad_left);
      std::copy_n(sums + 2 * numel, numel, grad_right);
    }
  }
}

}  // namespace nanomoe::cpu::gate_tile

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <optional>
#include <type_traits>
#include <vector>

#include "avx512.h"
#include "thread_buffer.h"

namespace nanomoe::cpu::gate_tile {
namespace {

// Tokens converted and mixed together. diagonal_outer's lanes keep a sum per token, which must
// cover the FMA latency times its two pipes (4 tokens measured half the rate of 8).
constexpr int kGroupTokens = 8;

// out[j] = <a, b[j]> over r elements for j < count (at most 16; the pointers of lanes beyond count
// must still be readable): each load of a serves the 16.
NANOMOE_AVX512 inline void dots16(const float* a, const float* const b[16], int64_t r,
                                  int64_t count, float* out) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < r; c += 16) {
    const __mmask16 lanes = first_lanes(r - c);
    const __m512 shared = _mm512_maskz_loadu_ps(lanes, a + c);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      acc[j] = _mm512_fmadd_ps(shared, _mm512_maskz_loadu_ps(lanes, b[j] + c), acc[j]);
    }
  }
  _mm512_mask_storeu_ps(out, first_lanes(count), sum_lanes16(acc));
}

// diagonal_outer's dot products for destination block d and kTokens tokens (float32 source rows
// at x + t * x_row): dots[s * kTokens + t] = <right_ds, x_ts>. Two source blocks at a time, so
// each load of right serves every token and the 2 kTokens sums fill (at most) one reduction of 16.
template <int kTokens>
NANOMOE_AVX512 void right_dots(const GateRows<float>& g, const float* x, int64_t x_row, int64_t d,
                               float* dots) {
  static_assert(2 * kTokens <= 16, "two source blocks' sums fit one reduction");
  const int64_t r = g.rank;
  for (int64_t s0 = 0; s0 < g.src_blocks; s0 += 2) {
    const int blocks = g.src_blocks - s0 > 1 ? 2 : 1;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < r; c += 16) {
      const __mmask16 lanes = first_lanes(r - c);
      for (int e = 0; e < blocks; ++e) {
        const int64_t s = s0 + e;
        const __m512 right =
            _mm512_maskz_loadu_ps(lanes, g.right + d * g.dst_stride + s * g.src_stride + c);
#pragma GCC unroll 8
        for (int t = 0; t < kTokens; ++t) {
          acc[e * kTokens + t] = _mm512_fmadd_ps(
              right, _mm512_maskz_loadu_ps(lanes, x + t * x_row + s * r + c), acc[e * kTokens + t]);
        }
      }
    }
    _mm512_mask_storeu_ps(dots + s0 * kTokens, first_lanes(blocks * kTokens), sum_lanes16(acc));
  }
}

// Vector v of kVectors at from: the last one masked to lanes[v] where kMasked.
template <bool kMasked, int kVectors>
NANOMOE_AVX512 __attribute__((always_inline)) inline __m512 load_vector(int v,
                                                                        const __mmask16* lanes,
                                                                        const float* from) {
  return kMasked && v == kVectors - 1 ? _mm512_maskz_loadu_ps(lanes[v], from)
                                      : _mm512_loadu_ps(from);
}

// diagonal_outer's lanes [c, c + 16 kVectors) of destination block d for kTokens tokens: float32
// source rows at x + t * x_row, their dot products with right_d at dots (right_dots' layout).
// kMasked: the last vector holds the block's last lanes, up to 16. Two vectors share each
// broadcast dot product and keep 16 sums in flight; with one, each pass over the source blocks
// ended after 8 FMA latencies.
template <int kTokens, int kVectors, bool kMasked, typename T>
NANOMOE_AVX512 __attribute__((always_inline)) inline void mix_lanes(const GateRows<float>& g,
                                                                    const float* x, int64_t x_row,
                                                                    const float* dots, T* y,
                                                                    int64_t y_row, int64_t d,
                                                                    int64_t c) {
  const int64_t r = g.rank;
  __mmask16 lanes[kVectors];
#pragma GCC unroll 2
  for (int v = 0; v < kVectors; ++v) {
    lanes[v] = kMasked && v == kVectors - 1 ? first_lanes(r - c - 16 * v) : __mmask16(0xFFFF);
  }
  __m512 acc[kTokens][kVectors];
#pragma GCC unroll 8
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) acc[t][v] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    const int64_t pair = d * g.dst_stride + s * g.src_stride;
    __m512 weight[kVectors];
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) {
      weight[v] = load_vector<kMasked, kVectors>(v, lanes, g.mix + pair + c + 16 * v);
    }
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) {
        acc[t][v] = _mm512_fmadd_ps(
            weight[v], load_vector<kMasked, kVectors>(v, lanes, x + t * x_row + s * r + c + 16 * v),
            acc[t][v]);
      }
    }
    __m512 left[kVectors];
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v)
      left[v] = load_vector<kMasked, kVectors>(v, lanes, g.left + pair + c + 16 * v);
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) {
      const __m512 dot = _mm512_set1_ps(dots[s * kTokens + t]);
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) acc[t][v] = _mm512_fmadd_ps(left[v], dot, acc[t][v]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) {
      store_lanes(y + t * y_row + c + 16 * v, lanes[v], acc[t][v]);
    }
  }
}

// diagonal_outer's destination block d for kTokens tokens, 32 lanes at a time, then 16.
template <int kTokens, typename T>
NANOMOE_AVX512 __attribute__((always_inline)) inline void mix_block(const GateRows<float>& g,
                                                                    const float* x, int64_t x_row,
                                                                    const float* dots, T* y,
                                                                    int64_t y_row, int64_t d) {
  const int64_t r = g.rank;
  int64_t c = 0;
  for (; c + 32 <= r; c += 32) {
    mix_lanes<kTokens, 2, false>(g, x, x_row, dots, y + d * r, y_row, d, c);
  }
  if (c + 16 < r) {
    mix_lanes<kTokens, 2, true>(g, x, x_row, dots, y + d * r, y_row, d, c);
  } else if (c < r) {
    mix_lanes<kTokens, 1, true>(g, x, x_row, dots, y + d * r, y_row, d, c);
  }
}

// The scalar and diagonal gates' destination blocks [d0, d0 + kDst) for kTokens tokens, 16 lanes
// from c (kMasked: the block's last lanes, up to 16), in kTokens x kDst sums: each weight (the
// scalar broadcast, or diagonal's vector) serves the kTokens tokens, and each load of a source row
// the kDst blocks. Tokens alone sharing each weight took a load per multiply-add (NOTES, version
// 73).
template <int kVariant, int kTokens, int kDst, bool kMasked, typename T>
NANOMOE_AVX512 __attribute__((always_inline)) inline void mix_shared(const GateRows<float>& g,
                                                                     const float* x, int64_t x_row,
                                                                     T* y, int64_t y_row,
                                                                     int64_t d0, int64_t c) {
  static_assert(kVariant != 2, "diagonal_outer's dot products are per destination block");
  static_assert(kTokens * kDst <= 16, "the sums, weights and a source row fit the 32 registers");
  const int64_t r = g.rank;
  const __mmask16 lanes[1] = {kMasked ? first_lanes(r - c) : __mmask16(0xFFFF)};
  __m512 acc[kTokens][kDst];
#pragma GCC unroll 8
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 4
    for (int d = 0; d < kDst; ++d) acc[t][d] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    __m512 weight[kDst];
#pragma GCC unroll 4
    for (int d = 0; d < kDst; ++d) {
      const int64_t pair = (d0 + d) * g.dst_stride + s * g.src_stride;
      weight[d] = kVariant == 0 ? _mm512_set1_ps(g.mix[pair])
                                : load_vector<kMasked, 1>(0, lanes, g.mix + pair + c);
    }
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) {
      const __m512 source = load_vector<kMasked, 1>(0, lanes, x + t * x_row + s * r + c);
#pragma GCC unroll 4
      for (int d = 0; d < kDst; ++d) acc[t][d] = _mm512_fmadd_ps(weight[d], source, acc[t][d]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 4
    for (int d = 0; d < kDst; ++d) {
      store_lanes(y + t * y_row + (d0 + d) * r + c, lanes[0], acc[t][d]);
    }
  }
}

// Every lane of destination blocks [d0, d0 + kDst) for kTokens tokens.
template <int kVariant, int kTokens, int kDst, typename T>
NANOMOE_AVX512 void mix_shared_blocks(const GateRows<float>& g, const float* x, int64_t x_row, T* y,
                                      int64_t y_row, int64_t d0) {
  int64_t c = 0;
  for (; c + 16 <= g.rank; c += 16) {
    mix_shared<kVariant, kTokens, kDst, false>(g, x, x_row, y, y_row, d0, c);
  }
  if (c < g.rank) mix_shared<kVariant, kTokens, kDst, true>(g, x, x_row, y, y_row, d0, c);
}

// The scalar and diagonal gates' sums: kSharedTokens tokens by kSharedBlocks destination blocks,
// 16 (enough to cover the FMA latency on both pipes; with their weights and a source row, 21 of
// the 32 registers).
constexpr int kSharedTokens = 4;
constexpr int kSharedBlocks = 4;

// The scalar and diagonal gates for kTokens tokens (a group): the destination blocks
// kSharedBlocks at a time, kSharedTokens tokens at a time, then the last 1 to 3 blocks with all
// kTokens tokens at once, so that they too keep 8 to 16 sums in flight.
template <int kVariant, int kTokens, typename T>
NANOMOE_AVX512 void mix_shared_group(const GateRows<float>& g, const float* x, int64_t x_row, T* y,
                                     int64_t y_row) {
  constexpr int kFirst = kTokens < kSharedTokens ? kTokens : kSharedTokens;
  const int64_t whole = g.dst_blocks / kSharedBlocks * kSharedBlocks;
  for (int64_t d0 = 0; d0 < whole; d0 += kSharedBlocks) {
    mix_shared_blocks<kVariant, kFirst, kSharedBlocks>(g, x, x_row, y, y_row, d0);
    if constexpr (kTokens > kSharedTokens) {
      mix_shared_blocks<kVariant, kTokens - kSharedTokens, kSharedBlocks>(
          g, x + kSharedTokens * x_row, x_row, y + kSharedTokens * y_row, y_row, d0);
    }
  }
  int64_t d0 = whole;
  if (d0 + 2 <= g.dst_blocks) {
    mix_shared_blocks<kVariant, kTokens, 2>(g, x, x_row, y, y_row, d0);
    d0 += 2;
  }
  if (d0 < g.dst_blocks) mix_shared_blocks<kVariant, kTokens, 1>(g, x, x_row, y, y_row, d0);
}

// Tokens per product of the dot products from pairs, and the row of its sums (dots_by_amx's
// layout, below, which dots_by_dpbf16 writes too).
constexpr int64_t kAmxTokens = amx::kTokens;
constexpr int64_t kAmxCols = amx::kCols;

// Where dots_by_amx leaves the dot product of column b with block a (of `blocks`), for the first
// token: each further token's lies kAmxCols on, each further block's kAmxTokens * kAmxCols.
constexpr int64_t amx_dot_at(int64_t blocks, int64_t a, int64_t b) {
  return ((b / kAmxCols * blocks + a) * kAmxTokens) * kAmxCols + b % kAmxCols;
}

// values[0, count) rounded to bfloat16 (to nearest even), in place.
NANOMOE_AVX512 inline void round_to_bfloat16(float* values, int64_t count) {
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 lanes = first_lanes(count - i);
    const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes, values + i));
    const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16);
    _mm512_mask_storeu_ps(values + i, lanes, _mm512_castsi512_ps(wide));
  }
}

// kTokens tokens mixed into every destination block, from float32 rows: diagonal_outer's dot
// products by right_dots, into dots (rounded to bfloat16 where the mixed rows are, as in pairs:
// mix_group_in_pairs).
template <int kVariant, int kTokens, typename T>
NANOMOE_AVX512 void mix_group(const GateRows<float>& g, const float* x, int64_t x_row, float* dots,
                              T* y, int64_t y_row) {
  if constexpr (kVariant != 2) {
    mix_shared_group<kVariant, kTokens>(g, x, x_row, y, y_row);
  } else {
    for (int64_t d = 0; d < g.dst_blocks; ++d) {
      right_dots<kTokens>(g, x, x_row, d, dots);
      if constexpr (!std::is_same_v<T, float>) round_to_bfloat16(dots, g.src_blocks * kTokens);
      mix_block<kTokens>(g, x, x_row, dots, y, y_row, d);
    }
  }
}

// mix_group for a group of 1 to kGroupTokens tokens (fixed at compile time, so the sums stay in
// registers).
template <int kVariant, int kTokens = kGroupTokens, typename T>
NANOMOE_AVX512 void mix_group_of(int64_t tokens, const GateRows<float>& g, const float* x,
                                 int64_t x_row, float* dots, T* y, int64_t y_row) {
  assert(tokens <= kTokens && "a group is at most kGroupTokens tokens");
  if constexpr (kTokens > 1) {
    if (tokens < kTokens)
      return mix_group_of<kVariant, kTokens - 1>(tokens, g, x, x_row, dots, y, y_row);
  }
  mix_group<kVariant, kTokens>(g, x, x_row, dots, y, y_row);
}

// rows (`tokens` of them, row_stride apart) as `count` rows: in place where count is tokens, else
// copied into padded with zero rows after them.
const uint16_t* padded_to(const uint16_t* rows, int64_t row_stride, int64_t tokens, int64_t count,
                          uint16_t* padded) {
  if (count == tokens) return rows;
  std::copy_n(rows, tokens * row_stride, padded);
  std::fill_n(padded + tokens * row_stride, (count - tokens) * row_stride, uint16_t(0));
  return padded;
}

// diagonal_outer's dot products on the tile unit (dots_from_pairs, with AMX) for `tokens` (at most
// kAmxTokens) bfloat16 rows at rows + t * row_stride, each `blocks` blocks of `rank`: block a's
// product with its (rank x cols) matrix at pairs (GateRows::right_pairs or left_pairs), 32 columns
// at a time, into sums as amx_dot_at says, amx_dots_size floats. Rows past a multiple of 16 are
// copied into padded (kAmxTokens rows) first, zeros after them.
int64_t amx_dots_size(int64_t blocks, int64_t cols) {
  return (cols + kAmxCols - 1) / kAmxCols * blocks * kAmxTokens * kAmxCols;
}
NANOMOE_AVX512 void dots_by_amx(const uint16_t* pairs, int64_t cols, int64_t blocks, int64_t rank,
                                const uint16_t* rows, int64_t row_stride, int64_t tokens,
                                uint16_t* padded, float* sums) {
  const int64_t padded_rows = (tokens + 15) / 16 * 16, pair_rows = (rank + 1) / 2;
  rows = padded_to(rows, row_stride, tokens, padded_rows, padded);
  for (int64_t b0 = 0; b0 < cols; b0 += kAmxCols) {
    for (int64_t a = 0; a < blocks; ++a) {
      amx::product(padded_rows, rows + a * rank, row_stride,
                   pairs + (a * pair_rows * cols + b0) * 2, 2 * cols, rank,
                   sums + amx_dot_at(blocks, a, b0), std::min<int64_t>(kAmxCols, cols - b0));
    }
  }
}

// Tokens whose dot products dots_by_dpbf16 sums at once, each in one vector.
constexpr int64_t kDpbf16Tokens = 8;

// dots_by_amx's sums by vdpbf16ps, where there is no tile unit: per source block a, 16 columns and
// kDpbf16Tokens tokens, each token's sums in one vector, every step adding a pair of its rank
// positions (broadcast) times the columns' pairs. With 8 columns or fewer (kTwoPairs) the lanes are
// (column b, j) for pairs 2q + j, so that a step adds two pairs, not one with half the lanes zero;
// the two lanes' sums are added at the end. Rows come whole, kDpbf16Tokens at a time (a call's last
// ones copied into padded first, zeros after them).
template <bool kTwoPairs>
NANOMOE_AVX512 void dots_by_dpbf16(const uint16_t* pairs, int64_t cols, int64_t blocks,
                                   int64_t rank, const uint16_t* rows, int64_t row_stride,
                                   float* sums) {
  const int64_t pair_rows = (rank + 1) / 2;
  // (b, j) at lane 2b + j: pair row j's column b.
  const __m512i interleave =
      _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i even_lanes =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  for (int64_t a = 0; a < blocks; ++a) {
    const uint16_t* block_pairs = pairs + a * pair_rows * cols * 2;
    for (int64_t b0 = 0; b0 < (kTwoPairs ? 16 : cols); b0 += 16) {
      __m512 acc[kDpbf16Tokens];
#pragma GCC unroll 8
      for (int t = 0; t < kDpbf16Tokens; ++t) acc[t] = _mm512_setzero_ps();
      const uint16_t* in = rows + a * rank;
      if constexpr (kTwoPairs) {
        for (int64_t p = 0; p < pair_rows; p += 2) {
          const __m512i first = _mm512_loadu_si512(block_pairs + p * cols * 2);
          const __m512i second = p + 1 < pair_rows
                                     ? _mm512_loadu_si512(block_pairs + (p + 1) * cols * 2)
                                     : _mm512_setzero_si512();
          const __m512bh weights = (__m512bh)_mm512_permutex2var_epi32(first, interleave, second);
          // Rank positions 2p to 2p + 3, those past the block's end read as zeros.
          const __mmask8 present = __mmask8((1u << std::min<int64_t>(4, rank - 2 * p)) - 1);
#pragma GCC unroll 8
          for (int t = 0; t < kDpbf16Tokens; ++t) {
            const __m128i four = _mm_maskz_loadu_epi16(present, in + t * row_stride + 2 * p);
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_broadcast_i32x2(four), weights);
          }
        }
      } else {
        for (int64_t p = 0; p < pair_rows; ++p) {
          const __m512bh weights = (__m512bh)_mm512_loadu_si512(block_pairs + (p * cols + b0) * 2);
          const bool whole = 2 * p + 1 < rank;  // an odd rank's last pair has no partner
#pragma GCC unroll 8
          for (int t = 0; t < kDpbf16Tokens; ++t) {
            const uint16_t* at = in + t * row_stride + 2 * p;
            uint32_t pair = at[0];
            if (whole) std::memcpy(&pair, at, sizeof pair);
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32(int(pair)), weights);
          }
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < kDpbf16Tokens; ++t) {
        float* out = sums + amx_dot_at(blocks, a, b0) + t * kAmxCols;
        if constexpr (kTwoPairs) {
          const __m512 both = _mm512_add_ps(acc[t], _mm512_permute_ps(acc[t], 0xB1));
          _mm256_storeu_ps(out, _mm512_castps512_ps256(_mm512_permutexvar_ps(even_lanes, both)));
        } else {
          _mm512_storeu_ps(out, acc[t]);
        }
      }
    }
  }
}

// diagonal_outer's dot products from their bfloat16 pairs for `tokens` (at most kAmxTokens) rows,
// into sums in dots_by_amx's layout: on the tile unit where it runs, else by vdpbf16ps; `used` of
// the layout's cols columns are blocks (the rest are zeros).
NANOMOE_AVX512 void pair_dots(const uint16_t* pairs, int64_t cols, int64_t used, int64_t blocks,
                              int64_t rank, const uint16_t* rows, int64_t row_stride,
                              int64_t tokens, uint16_t* padded, float* sums) {
  if (amx::available()) {
    return dots_by_amx(pairs, cols, blocks, rank, rows, row_stride, tokens, padded, sums);
  }
  for (int64_t t0 = 0; t0 < tokens; t0 += kDpbf16Tokens) {
    const uint16_t* in = padded_to(rows + t0 * row_stride, row_stride,
                                   std::min(kDpbf16Tokens, tokens - t0), kDpbf16Tokens, padded);
    float* out = sums + t0 * kAmxCols;
    if (used <= 8) {
      dots_by_dpbf16<true>(pairs, cols, blocks, rank, in, row_stride, out);
    } else {
      dots_by_dpbf16<false>(pairs, cols, blocks, rank, in, row_stride, out);
    }
  }
}

// ---- bfloat16's diagonal_outer in pairs of source blocks -------------------------------------

// Where the dot products come from pairs, bfloat16's diagonal_outer mixes by rank position with
// vdpbf16ps, each step adding two source blocks: G_ds x_s + G_(d, s+1) x_(s+1) as mix's pair
// (GateRows::mix_source_pairs) times the rows' pair, plus left's pair times the dot products'
// pair, the dot products rounded to bfloat16 (as on AMX and by block). float32 FMAs on widened
// rows did one source block a step.

// A group's `count` bfloat16 rows (at rows + t * row) paired over source blocks: token t's pair p,
// rank position c, at pairs + (t * src_pairs + p) * rank + c. 32 rank positions a step, two
// permutes of the two rows' loads.
NANOMOE_AVX512 void pair_sources(const GateRows<float>& g, const uint16_t* rows, int64_t row,
                                 int64_t count, uint32_t* pairs) {
  const int64_t r = g.rank;
  // 16-bit lane 2i of the first half: first[i], 2i + 1: second[i] (index 32 + i); then i + 16.
  const __m512i low_half =
      _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high_half = _mm512_add_epi16(low_half, _mm512_set1_epi16(16));
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t p = 0; p < g.src_pairs(); ++p) {
      const uint16_t* first = rows + t * row + 2 * p * r;
      const bool second = 2 * p + 1 < g.src_blocks;
      uint32_t* out = pairs + (t * g.src_pairs() + p) * r;
      for (int64_t c = 0; c < r; c += 32) {
        const __mmask32 lanes = first_lanes32(r - c);
        const __m512i a = _mm512_maskz_loadu_epi16(lanes, first + c);
        const __m512i b =
            second ? _mm512_maskz_loadu_epi16(lanes, first + r + c) : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(out + c, first_lanes(r - c),
                                 _mm512_permutex2var_epi16(a, low_half, b));
        _mm512_mask_storeu_epi32(out + c + 16, first_lanes(r - c - 16),
                                 _mm512_permutex2var_epi16(a, high_half, b));
      }
    }
  }
}

// Destination blocks' lanes of the dot products in pairs (a multiple of 16).
int64_t dot_lanes(const GateRows<float>& g) {
  return (g.dst_blocks + 15) / 16 * 16;
}

// A group's `count` tokens' dot products from pairs (dots_by_amx's layout, from the group's first
// token, at sums), rounded to bfloat16 and paired over source blocks: token t's pair p for
// destination block d at pairs + (t * src_pairs + p) * dot_lanes + d.
NANOMOE_AVX512 void pair_dot_sums(const GateRows<float>& g, const float* sums, int64_t count,
                                  uint32_t* pairs) {
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t p = 0; p < g.src_pairs(); ++p) {
      const bool second = 2 * p + 1 < g.src_blocks;
      for (int64_t b0 = 0; b0 < g.dst_blocks; b0 += 16) {
        const __mmask16 lanes = first_lanes(g.dst_blocks - b0);
        const auto row = [&](int64_t s) NANOMOE_AVX512 {
          return _mm512_maskz_loadu_ps(lanes,
                                       sums + amx_dot_at(g.src_blocks, s, b0) + t * kAmxCols);
        };
        const __m512 high = second ? row(2 * p + 1) : _mm512_setzero_ps();
        _mm512_storeu_si512(pairs + (t * g.src_pairs() + p) * dot_lanes(g) + b0,
                            pair_rounded(row(2 * p), high));
      }
    }
  }
}

// Lanes [c, c + 16 kVectors) of destination block d for kTokens tokens from their pairs
// (pair_sources' and pair_dot_sums' layouts), as mix_lanes.
template <int kTokens, int kVectors, bool kMasked>
NANOMOE_AVX512 __attribute__((always_inline)) inline void mix_pair_lanes(const GateRows<float>& g,
                                                                         const uint32_t* x_pairs,
                                                                         const uint32_t* dot_pairs,
                                                                         uint16_t* y, int64_t y_row,
                                                                         int64_t d, int64_t c) {
  const int64_t r = g.rank, pairs = g.src_pairs();
  __mmask16 lanes[kVectors];
#pragma GCC unroll 2
  for (int v = 0; v < kVectors; ++v) {
    lanes[v] = kMasked && v == kVectors - 1 ? first_lanes(r - c - 16 * v) : __mmask16(0xFFFF);
  }
  const auto load = [&](int v, const uint32_t* from) NANOMOE_AVX512 {
    return (__m512bh)_mm512_castps_si512(
        load_vector<kMasked, kVectors>(v, lanes, reinterpret_cast<const float*>(from)));
  };
  __m512 acc[kTokens][kVectors];
#pragma GCC unroll 8
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) acc[t][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t at = (d * pairs + p) * r + c;
    __m512bh weight[kVectors], left[kVectors];
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) {
      weight[v] = load(v, g.mix_source_pairs + at + 16 * v);
      left[v] = load(v, g.left_source_pairs + at + 16 * v);
    }
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) {
      const uint32_t* x = x_pairs + (t * pairs + p) * r + c;
      const __m512bh dot =
          (__m512bh)_mm512_set1_epi32(int(dot_pairs[(t * pairs + p) * dot_lanes(g) + d]));
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) {
        acc[t][v] = _mm512_dpbf16_ps(acc[t][v], weight[v], load(v, x + 16 * v));
        acc[t][v] = _mm512_dpbf16_ps(acc[t][v], left[v], dot);
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < kTokens; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) {
      store_lanes(y + t * y_row + d * r + c + 16 * v, lanes[v], acc[t][v]);
    }
  }
}

// kTokens tokens from their pairs into every destination block, 32 lanes at a time, then 16.
template <int kTokens>
NANOMOE_AVX512 void mix_pairs_group(const GateRows<float>& g, const uint32_t* x_pairs,
                                    const uint32_t* dot_pairs, uint16_t* y, int64_t y_row) {
  const int64_t r = g.rank;
  for (int64_t d = 0; d < g.dst_blocks; ++d) {
    int64_t c = 0;
    for (; c + 32 <= r; c += 32) {
      mix_pair_lanes<kTokens, 2, false>(g, x_pairs, dot_pairs, y, y_row, d, c);
    }
    if (c + 16 < r) {
      mix_pair_lanes<kTokens, 2, true>(g, x_pairs, dot_pairs, y, y_row, d, c);
    } else if (c < r) {
      mix_pair_lanes<kTokens, 1, true>(g, x_pairs, dot_pairs, y, y_row, d, c);
    }
  }
}

// mix_pairs_group for 1 to kGroupTokens tokens (fixed at compile time, so the sums stay in
// registers).
template <int kTokens = kGroupTokens>
NANOMOE_AVX512 void mix_pairs_group_of(int64_t tokens, const GateRows<float>& g,
                                       const uint32_t* x_pairs, const uint32_t* dot_pairs,
                                       uint16_t* y, int64_t y_row) {
  if constexpr (kTokens > 1) {
    if (tokens < kTokens) {
      return mix_pairs_group_of<kTokens - 1>(tokens, g, x_pairs, dot_pairs, y, y_row);
    }
  }
  mix_pairs_group<kTokens>(g, x_pairs, dot_pairs, y, y_row);
}

// bfloat16's diagonal_outer for a group of `count` (at most kGroupTokens) tokens in pairs of
// source blocks: rows at src + t * src_row, their dot products from pairs at sums (dots_by_amx's
// layout, from the group's first token), into dst + t * dst_row.
NANOMOE_AVX512 void mix_group_in_pairs(const GateRows<float>& g, const uint16_t* src,
                                       const float* sums, int64_t count, uint16_t* dst) {
  assert(g.mix_source_pairs && "the gate has its source pairs where its dots come from pairs");
  const int64_t x_size = kGroupTokens * g.src_pairs() * g.rank;
  thread_local std::vector<uint32_t> buffer;  // the rows' pairs, then the dot products'
  uint32_t* x_pairs = thread_buffer(buffer, x_size + kGroupTokens * g.src_pairs() * dot_lanes(g));
  uint32_t* dot_pairs = x_pairs + x_size;
  pair_sources(g, src, g.src_blocks * g.rank, count, x_pairs);
  pair_dot_sums(g, sums, count, dot_pairs);
  mix_pairs_group_of(count, g, x_pairs, dot_pairs, dst, g.dst_blocks * g.rank);
}

// bfloat16's diagonal_outer where its dot products come from pairs: kAmxTokens tokens' dot
// products at a time, then their groups mixed in pairs.
NANOMOE_AVX512 void mix_tokens_in_pairs(const GateRows<float>& g, const uint16_t* src,
                                        uint16_t* dst, int64_t tokens) {
  const int64_t src_row = g.src_blocks * g.rank, dst_row = g.dst_blocks * g.rank;
  thread_local std::vector<float> sums_buffer;
  thread_local std::vector<uint16_t> padded_buffer;
  float* sums = thread_buffer(sums_buffer, amx_dots_size(g.src_blocks, g.right_cols));
  uint16_t* padded = thread_buffer(padded_buffer, kAmxTokens * src_row);
  std::optional<amx::Tiles> tiles;
  if (amx::available()) tiles.emplace();
  for (int64_t t0 = 0; t0 < tokens; t0 += kAmxTokens) {
    const int64_t in_chunk = std::min(kAmxTokens, tokens - t0);
    pair_dots(g.right_pairs, g.right_cols, g.dst_blocks, g.src_blocks, g.rank, src + t0 * src_row,
              src_row, in_chunk, padded, sums);
    for (int64_t t = t0; t < t0 + in_chunk; t += kGroupTokens) {
      const int64_t group = std::min<int64_t>(kGroupTokens, t0 + in_chunk - t);
      mix_group_in_pairs(g, src + t * src_row, sums + (t - t0) * kAmxCols, group,
                         dst + t * dst_row);
    }
  }
}

// The rest from float32 rows (bfloat16's widened a group at a time).
template <int kVariant, typename T>
NANOMOE_AVX512 void mix_tokens(const GateRows<float>& g, const T* src, T* dst, int64_t tokens) {
  const int64_t src_row = g.src_blocks * g.rank, dst_row = g.dst_blocks * g.rank;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  // A group's dot products, then its float32 copies of bfloat16 rows: written before they are read,
  // so kept between calls rather than allocated and zeroed for each tile.
  thread_local std::vector<float> buffer;
  const int64_t dots_size = kVariant == 2 ? kGroupTokens * g.src_blocks : 0;
  float* dots = thread_buffer(buffer, (kConvert ? kGroupTokens * src_row : 0) + dots_size);
  float* converted = dots + dots_size;
  for (int64_t t = 0; t < tokens; t += kGroupTokens) {
    const int64_t group = std::min<int64_t>(kGroupTokens, tokens - t);
    const float* x = as_float(src + t * src_row, group * src_row, converted);
    mix_group_of<kVariant>(group, g, x, src_row, dots, dst + t * dst_row, dst_row);
  }
}

// ---- the gate's weight gradients ------------------------------------------------------------

// Tokens whose dot products (diagonal_outer's) are one product from pairs: a pass. Each pass's
// tokens are then converted to float32 and summed one mixing group (kGroupTokens) at a time
// (except where diagonal_outer's dot products are not from pairs: accumulate_grads_as), so
// that a bfloat16 group's widened rows (8 tokens of hidden and grad_mixed: 32 KiB at K = 8,
// r = 64) stay in L1 for every use (the weight gradients, and passes_together's mixing): widened
// 32 at a time, 128 KiB, the backward took 1.04x to 1.12x its time at 4096 tokens (NOTES,
// version 83).
constexpr int kGradTokens = 32;
// Blocks of destination x source blocks whose sums sit in registers at once: per token, 4 + 4 row
// loads serve 16 multiply-adds, in 16 independent sums (enough to cover the FMA latency).
constexpr int kGradDst = 4;
constexpr int kGradSrc = 4;

// grad_mix[d, s(, :)] += sum_t <grad_dst[t, d], src[t, s]> (scalar: over the rank too) for
// destination blocks [d0, d0 + kDst) and source blocks [s0, s0 + kSrc); forward gate layout (dst =
// output block).
template <int kVariant, int kDst, int kSrc>
NANOMOE_AVX512 void mix_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                              int64_t tokens, int64_t d0, int64_t s0, float* grad_mix) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  const auto grad_at = [&](int d, int s) {
    return grad_mix + (d0 + d) * g.dst_stride + (s0 + s) * g.src_stride;
  };
  __m512 acc[kDst][kSrc];
#pragma GCC unroll 4
  for (int d = 0; d < kDst; ++d) {
#pragma GCC unroll 4
    for (int s = 0; s < kSrc; ++s) acc[d][s] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < r; c += 16) {
    const __mmask16 lanes = first_lanes(r - c);
    if constexpr (kVariant != 0) {  // per rank position: the sums so far, lane by lane
#pragma GCC unroll 4
      for (int d = 0; d < kDst; ++d) {
#pragma GCC unroll 4
        for (int s = 0; s < kSrc; ++s) acc[d][s] = _mm512_maskz_loadu_ps(lanes, grad_at(d, s) + c);
      }
    }
    for (int64_t t = 0; t < tokens; ++t) {
      __m512 gy[kDst];
#pragma GCC unroll 4
      for (int d = 0; d < kDst; ++d) {
        gy[d] = _mm512_maskz_loadu_ps(lanes, grad_dst + t * dst_row + (d0 + d) * r + c);
      }
#pragma GCC unroll 4
      for (int s = 0; s < kSrc; ++s) {
        const __m512 x = _mm512_maskz_loadu_ps(lanes, src + t * src_row + (s0 + s) * r + c);
#pragma GCC unroll 4
        for (int d = 0; d < kDst; ++d) acc[d][s] = _mm512_fmadd_ps(gy[d], x, acc[d][s]);
      }
    }
    if constexpr (kVariant != 0) {
#pragma GCC unroll 4
      for (int d = 0; d < kDst; ++d) {
#pragma GCC unroll 4
        for (int s = 0; s < kSrc; ++s) _mm512_mask_storeu_ps(grad_at(d, s) + c, lanes, acc[d][s]);
      }
    }
  }
  if constexpr (kVariant == 0) {  // the scalar gate sums over the rank too: the lanes, at the end
#pragma GCC unroll 4
    for (int d = 0; d < kDst; ++d) {
#pragma GCC unroll 4
      for (int s = 0; s < kSrc; ++s) *grad_at(d, s) += _mm512_reduce_add_ps(acc[d][s]);
    }
  }
}

// mix_grads for blocks of 1 to kGradDst by 1 to kGradSrc (fixed at compile time, so the sums stay
// in registers).
template <int kVariant, int kDst = kGradDst, int kSrc = kGradSrc>
NANOMOE_AVX512 void mix_grads_of(int64_t dst_count, int64_t src_count, const GateRows<float>& g,
                                 const float* src, const float* grad_dst, int64_t tokens,
                                 int64_t d0, int64_t s0, float* grad_mix) {
  if constexpr (kDst > 1) {
    if (dst_count < kDst) {
      return mix_grads_of<kVariant, kDst - 1, kSrc>(dst_count, src_count, g, src, grad_dst, tokens,
                                                    d0, s0, grad_mix);
    }
  }
  if constexpr (kSrc > 1) {
    if (src_count < kSrc) {
      return mix_grads_of<kVariant, kDst, kSrc - 1>(dst_count, src_count, g, src, grad_dst, tokens,
                                                    d0, s0, grad_mix);
    }
  }
  mix_grads<kVariant, kDst, kSrc>(g, src, grad_dst, tokens, d0, s0, grad_mix);
}

// diagonal_outer's dot products over a pass of tokens: right's <right_ds, x_ts> at right_at(s, d)[t
// * per_token()] and left's <left_ds, gy_td> at left_at(d, s)[t * per_token()]. Made from pairs
// (pair_dots, in dots_by_amx's layout) where the gate has its pairs, else by outer_dots in rows of
// kGradTokens, one per pair of blocks.
struct PassDots {
  float* right = nullptr;
  float* left = nullptr;
  int64_t src_blocks = 0, dst_blocks = 0;
  bool paired = false;

  float* right_at(int64_t s, int64_t d) const {
    return right + (paired ? amx_dot_at(src_blocks, s, d) : (s * dst_blocks + d) * kGradTokens);
  }
  float* left_at(int64_t d, int64_t s) const {
    return left + (paired ? amx_dot_at(dst_blocks, d, s) : (d * src_blocks + s) * kGradTokens);
  }
  int64_t per_token() const { return paired ? kAmxCols : 1; }
};

// Floats outer_dots writes.
int64_t outer_dots_size(const GateRows<float>& g) {
  return 2 * g.src_blocks * g.dst_blocks * kGradTokens;
}

// Both sets of dot products for a pass of `tokens` (at most kGradTokens) float32 rows, into dots.
NANOMOE_AVX512 PassDots outer_dots(const GateRows<float>& g, const float* src,
                                   const float* grad_dst, int64_t tokens, float* dots) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  const PassDots pass{dots, dots + outer_dots_size(g) / 2, g.src_blocks, g.dst_blocks, false};
  for (int64_t d = 0; d < g.dst_blocks; ++d) {
    for (int64_t s = 0; s < g.src_blocks; ++s) {
      const int64_t pair = d * g.dst_stride + s * g.src_stride;
      for (int64_t first = 0; first < tokens; first += 16) {
        const float* x[16];
        const float* gy[16];
        for (int64_t j = 0; j < 16; ++j) {
          const int64_t t = std::min(first + j, tokens - 1);
          x[j] = src + t * src_row + s * r;
          gy[j] = grad_dst + t * dst_row + d * r;
        }
        const int64_t count = std::min<int64_t>(16, tokens - first);
        dots16(g.right + pair, x, r, count, pass.right_at(s, d) + first);
        dots16(g.left + pair, gy, r, count, pass.left_at(d, s) + first);
      }
    }
  }
  return pass;
}

// sums[i][16 v + j] += sum_t dots[i][t * per_token] * rows[t * row + 16 v + j] for i < kPairs and
// 16 v + j < lanes (v < kVectors): diagonal_outer's rank-one gradients for kPairs pairs of blocks
// that share their rows, as a register tile. Each load of a row serves kPairs pairs and each
// broadcast kVectors vectors, in kPairs * kVectors independent sums (a pair at a time, in two
// sums, ran at the FMA's latency: 10% of the bfloat16 backward at K = 8, r = 64).
template <int kPairs, int kVectors>
NANOMOE_AVX512 void outer_tile(const float* const dots[], int64_t per_token, const float* rows,
                               int64_t row, int64_t tokens, float* const sums[], int64_t lanes) {
  __mmask16 mask[kVectors];
#pragma GCC unroll 4
  for (int v = 0; v < kVectors; ++v) mask[v] = first_lanes(lanes - 16 * v);
  __m512 acc[kPairs][kVectors];
#pragma GCC unroll 4
  for (int i = 0; i < kPairs; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_maskz_loadu_ps(mask[v], sums[i] + 16 * v);
  }
  for (int64_t t = 0; t < tokens; ++t) {
    __m512 x[kVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v)
      x[v] = _mm512_maskz_loadu_ps(mask[v], rows + t * row + 16 * v);
#pragma GCC unroll 4
    for (int i = 0; i < kPairs; ++i) {
      const __m512 dot = _mm512_set1_ps(dots[i][t * per_token]);
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_fmadd_ps(dot, x[v], acc[i][v]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < kPairs; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) _mm512_mask_storeu_ps(sums[i] + 16 * v, mask[v], acc[i][v]);
  }
}

constexpr int kOuterPairs = 4;    // pairs of blocks per register tile
constexpr int kOuterVectors = 4;  // vectors of 16 lanes per pair

// outer_tile for kPairs pairs over the whole rank, kOuterVectors vectors at a time.
template <int kPairs>
NANOMOE_AVX512 void outer_rank(const float* const dots[], int64_t per_token, const float* rows,
                               int64_t row, int64_t tokens, float* const sums[], int64_t rank) {
  for (int64_t c = 0; c < rank; c += 16 * kOuterVectors) {
    float* into[kPairs];
    for (int i = 0; i < kPairs; ++i) into[i] = sums[i] + c;
    const int64_t lanes = rank - c;
    switch (std::min<int64_t>(kOuterVectors, (lanes + 15) / 16)) {
      case 1:
        outer_tile<kPairs, 1>(dots, per_token, rows + c, row, tokens, into, lanes);
        break;
      case 2:
        outer_tile<kPairs, 2>(dots, per_token, rows + c, row, tokens, into, lanes);
        break;
      case 3:
        outer_tile<kPairs, 3>(dots, per_token, rows + c, row, tokens, into, lanes);
        break;
      default:
        outer_tile<kPairs, 4>(dots, per_token, rows + c, row, tokens, into, lanes);
    }
  }
}

// outer_rank for 1 to kOuterPairs pairs (fixed at compile time, so the sums stay in registers).
template <int kPairs = kOuterPairs>
NANOMOE_AVX512 void outer_rank_of(int64_t pairs, const float* const dots[], int64_t per_token,
                                  const float* rows, int64_t row, int64_t tokens,
                                  float* const sums[], int64_t rank) {
  if constexpr (kPairs > 1) {
    if (pairs < kPairs)
      return outer_rank_of<kPairs - 1>(pairs, dots, per_token, rows, row, tokens, sums, rank);
  }
  outer_rank<kPairs>(dots, per_token, rows, row, tokens, sums, rank);
}

// diagonal_outer's rank-one part, G_ds = ... + left_ds right_ds^T: grad_left_ds += sum_t
// <right_ds, x_ts> gy_td (the pairs of one destination block share gy_td) and grad_right_ds +=
// sum_t <left_ds, gy_td> x_ts (the pairs of one source block share x_ts).
NANOMOE_AVX512 void outer_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                                int64_t tokens, const PassDots& dots, float* grad_left,
                                float* grad_right) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  const float* pair_dots[kOuterPairs];
  float* sums[kOuterPairs];
  for (int64_t d = 0; d < g.dst_blocks; ++d) {
    for (int64_t s0 = 0; s0 < g.src_blocks; s0 += kOuterPairs) {
      const int64_t pairs = std::min<int64_t>(kOuterPairs, g.src_blocks - s0);
      for (int64_t i = 0; i < pairs; ++i) {
        pair_dots[i] = dots.right_at(s0 + i, d);
        sums[i] = grad_left + d * g.dst_stride + (s0 + i) * g.src_stride;
      }
      outer_rank_of(pairs, pair_dots, dots.per_token(), grad_dst + d * r, dst_row, tokens, sums, r);
    }
  }
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    for (int64_t d0 = 0; d0 < g.dst_blocks; d0 += kOuterPairs) {
      const int64_t pairs = std::min<int64_t>(kOuterPairs, g.dst_blocks - d0);
      for (int64_t i = 0; i < pairs; ++i) {
        pair_dots[i] = dots.left_at(d0 + i, s);
        sums[i] = grad_right + (d0 + i) * g.dst_stride + s * g.src_stride;
      }
      outer_rank_of(pairs, pair_dots, dots.per_token(), src + s * r, src_row, tokens, sums, r);
    }
  }
}

// The weight gradients of a pass of float32 rows (diagonal_outer's dot products in dots).
template <int kVariant>
NANOMOE_AVX512 void grads_of_group(const GateRows<float>& g, const float* src,
                                   const float* grad_dst, int64_t tokens, const PassDots& dots,
                                   float* grad_mix, float* grad_left, float* grad_right) {
  for (int64_t d = 0; d < g.dst_blocks; d += kGradDst) {
    for (int64_t s = 0; s < g.src_blocks; s += kGradSrc) {
      mix_grads_of<kVariant>(g.dst_blocks - d, g.src_blocks - s, g, src, grad_dst, tokens, d, s,
                             grad_mix);
    }
  }
  if constexpr (kVariant == 2) outer_grads(g, src, grad_dst, tokens, dots, grad_left, grad_right);
}

// The weight gradients over `tokens` rows, a pass of kGradTokens at a time (diagonal_outer's dot
// products for the pass, then its groups); after each group, with its float32 rows and dot
// products (the group's first token, count, its src and grad_dst rows, and the dots from its first
// token), after_group(t, count, src_rows, grad_rows, dots) runs (passes_together_as's mixing).
struct NoMoreWork {
  void operator()(int64_t, int64_t, const float*, const float*, const PassDots&) const {}
};
template <int kVariant, typename T, typename AfterGroup = NoMoreWork>
void accumulate_grads_as(const GateRows<float>& g, const T* src, const T* grad_dst, int64_t tokens,
                         float* grad_mix, float* grad_left, float* grad_right,
                         const AfterGroup& after_group = {}) {
  const int64_t src_row = g.src_blocks * g.rank, dst_row = g.dst_blocks * g.rank;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  // diagonal_outer's dot products: made from pairs for a pass where the gate has them
  // (dots_from_pairs), else by outer_dots for the pass's rows into dots (16 tokens a vector, so
  // there a group is the whole pass: in groups of 8, float32's forward+backward took 1.04x its
  // time).
  static_assert(kGradTokens == kAmxTokens, "a pass's dot products are one product's");
  float* made = nullptr;
  float* dots = nullptr;
  uint16_t* padded = nullptr;
  std::optional<amx::Tiles> tiles;
  const int64_t right_size = amx_dots_size(g.src_blocks, g.right_cols);
  if constexpr (kVariant == 2) {
    if (std::is_same_v<T, uint16_t> && g.left_pairs) {
      thread_local std::vector<float> sums_buffer;
      thread_local std::vector<uint16_t> padded_buffer;
      made = thread_buffer(sums_buffer, right_size + amx_dots_size(g.dst_blocks, g.left_cols));
      padded = thread_buffer(padded_buffer, kAmxTokens * std::max(src_row, dst_row));
      if (amx::available()) tiles.emplace();
    } else {
      thread_local std::vector<float> dots_buffer;
      dots = thread_buffer(dots_buffer, outer_dots_size(g));
    }
  }
  const int64_t group_tokens = kVariant == 2 && !made ? kGradTokens : kGroupTokens;
  // float32 copies of a group's bfloat16 rows (kept between calls, where allocating and zeroing
  // them for each tile showed in profiles).
  thread_local std::vector<float> converted;
  float* src_float =
      kConvert ? thread_buffer(converted, group_tokens * (src_row + dst_row)) : nullptr;
  float* grad_float = kConvert ? src_float + group_tokens * src_row : nullptr;
  for (int64_t t0 = 0; t0 < tokens; t0 += kGradTokens) {
    const int64_t in_pass = std::min<int64_t>(kGradTokens, tokens - t0);
    if constexpr (kVariant == 2 && std::is_same_v<T, uint16_t>) {
      if (made) {
        pair_dots(g.right_pairs, g.right_cols, g.dst_blocks, g.src_blocks, g.rank,
                  src + t0 * src_row, src_row, in_pass, padded, made);
        pair_dots(g.left_pairs, g.left_cols, g.src_blocks, g.dst_blocks, g.rank,
                  grad_dst + t0 * dst_row, dst_row, in_pass, padded, made + right_size);
      }
    }
    for (int64_t t = t0; t < t0 + in_pass; t += group_tokens) {
      const int64_t group = std::min<int64_t>(group_tokens, t0 + in_pass - t);
      const float* src_rows = as_float(src + t * src_row, group * src_row, src_float);
      const float* grad_rows = as_float(grad_dst + t * dst_row, group * dst_row, grad_float);
      PassDots pass;
      if constexpr (kVariant == 2) {
        const int64_t from = (t - t0) * kAmxCols;  // the group's first token in the pass's dots
        pass =
            made ? PassDots{made + from, made + right_size + from, g.src_blocks, g.dst_blocks, true}
                 : outer_dots(g, src_rows, grad_rows, group, dots);
      }
      grads_of_group<kVariant>(g, src_rows, grad_rows, group, pass, grad_mix, grad_left,
                               grad_right);
      after_group(t, group, src_rows, grad_rows, pass);
    }
  }
}

// Where sums in mix's layout keep each gradient: grad_mix's, then (diagonal_outer only, else
// null) grad_left's and grad_right's.
struct MixLayoutSums {
  float* mix;
  float* left;
  float* right;
};
MixLayoutSums in_mix_layout(const GateRows<float>& g, float* sums) {
  const int64_t numel = mix_numel(g);
  const bool outer = g.variant == 2;
  return {sums, outer ? sums + numel : nullptr, outer ? sums + 2 * numel : nullptr};
}

// The three passes of passes_together: the weight gradients a group at a time (hidden and
// grad_mixed widened once, by accumulate_grads_as), then mixed and grad_hidden mixed from the same
// float32 rows; diagonal_outer's from the bfloat16 rows in pairs (mix_group_in_pairs, as apart)
// with the weight gradients' dot products, <right_ds, hidden_ts> for mixed and
// <left_ds, grad_mixed_td> for grad_hidden (the transposed gate's right is left). The same bits as
// the passes apart: the same sums per group, the same dot products (one product from pairs per 32
// tokens either way), and each token's mixed sums run over the source blocks in the same order
// whatever its group.
template <int kVariant>
NANOMOE_AVX512 void passes_together_as(const GateRows<float>& g, const GateRows<float>& g_t,
                                       const uint16_t* hidden, const uint16_t* grad_mixed,
                                       int64_t tokens, float* sums, uint16_t* mixed,
                                       uint16_t* grad_hidden) {
  const int64_t hidden_row = g.src_blocks * g.rank, mixed_row = g.dst_blocks * g.rank;
  const MixLayoutSums grads = in_mix_layout(g, sums);
  const auto mix_group_pass = [&](int64_t t, int64_t count, const float* hidden_rows,
                                  const float* grad_rows, const PassDots& dots) NANOMOE_AVX512 {
    // diagonal_outer's mixing reads its dot products in the paired layout (passes_together).
    assert((kVariant != 2 || dots.paired) && "diagonal_outer together needs its dots from pairs");
    if constexpr (kVariant == 2) {
      mix_group_in_pairs(g, hidden + t * hidden_row, dots.right, count, mixed + t * mixed_row);
      mix_group_in_pairs(g_t, grad_mixed + t * mixed_row, dots.left, count,
                         grad_hidden + t * hidden_row);
    } else {
      mix_group_of<kVariant>(count, g, hidden_rows, hidden_row, nullptr, mixed + t * mixed_row,
                             mixed_row);
      mix_group_of<kVariant>(count, g_t, grad_rows, mixed_row, nullptr,
                             grad_hidden + t * hidden_row, hidden_row);
    }
  };
  accumulate_grads_as<kVariant>(g, hidden, grad_mixed, tokens, grads.mix, grads.left, grads.right,
                                mix_group_pass);
}

// Sums in mix's layout: grad_mix's, then for diagonal_outer grad_left's and grad_right's.
template <typename T>
void accumulate_in_mix_layout(const GateRows<float>& g, const T* src, const T* grad_dst,
                              int64_t tokens, float* sums) {
  const MixLayoutSums grads = in_mix_layout(g, sums);
  with_variant(g.variant, [&](auto v) {
    accumulate_grads_as<decltype(v)::value>(g, src, grad_dst, tokens, grads.mix, grads.left,
                                            grads.right);
  });
}

}  // namespace

void accumulate_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                      int64_t tokens, float* sums) {
  // A float32 gate has no AMX layout (Gate lays one out for bfloat16 only): by block or mix's.
  if (grads_layout(g) == GradsLayout::kByBlock) {
    return gate_by_block::accumulate_grads(g, src, grad_dst, tokens, sums);
  }
  accumulate_in_mix_layout(g, src, grad_dst, tokens, sums);
}

void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* sums) {
  switch (grads_layout(g)) {
    case GradsLayout::kAmxTiles:
      return gate_amx::accumulate_tile_grads(g, src, grad_dst, tokens, sums);
    case GradsLayout::kByBlock:
      return gate_by_block::accumulate_grads(g, src, grad_dst, tokens, sums);
    default:
      if (gate_amx::grads_chosen(g))
        return gate_amx::accumulate_grads(g, src, grad_dst, tokens, sums);
      accumulate_in_mix_layout(g, src, grad_dst, tokens, sums);
  }
}

void mix(const GateRows<float>& g, const float* src, float* dst, int64_t tokens) {
  if (g.mix_by_block) return gate_by_block::mix(g, src, dst, tokens);
  with_variant(g.variant, [&](auto v) { mix_tokens<decltype(v)::value>(g, src, dst, tokens); });
}

void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens) {
  if (g.amx_gate) return gate_amx::mix(g, src, dst, tokens);
  if (g.mix_by_block) return gate_by_block::mix(g, src, dst, tokens);
  if (g.right_pairs) return mix_tokens_in_pairs(g, src, dst, tokens);
  with_variant(g.variant, [&](auto v) { mix_tokens<decltype(v)::value>(g, src, dst, tokens); });
}

bool passes_together(const GateRows<float>& g, const GateRows<float>& g_t) {
  // Without a layout for AMX or by block, the gradients are summed in mix's layout here too.
  // diagonal_outer's dot products must come from pairs for the weight gradients (g.left_pairs:
  // its mixing takes theirs, in that layout), and for the transposed gate apart (g_t.right_pairs,
  // never read here: with its dot products summed by FMAs, apart would have other bits).
  const bool dots_shared = g.variant != 2 || (g.left_pairs && g_t.right_pairs);
  return dots_shared && !g.amx_gate && !g.mix_by_block && !g_t.amx_gate && !g_t.mix_by_block;
}

void backward_passes(const GateRows<float>& g, const GateRows<float>& g_t, const uint16_t* hidden,
                     const uint16_t* grad_mixed, int64_t tokens, float* sums, uint16_t* mixed,
                     uint16_t* grad_hidden) {
  with_variant(g.variant, [&](auto v) {
    passes_together_as<decltype(v)::value>(g, g_t, hidden, grad_mixed, tokens, sums, mixed,
                                           grad_hidden);
  });
}

}  // namespace nanomoe::cpu::gate_tile

#else  // not x86-64: projection::runs_float() is false, so this is never reached

#include <cstdlib>

namespace nanomoe::cpu::gate_tile {
void mix(const GateRows<float>&, const float*, float*, int64_t) {
  std::abort();
}
void accumulate_grads(const GateRows<float>&, const float*, const float*, int64_t, float*) {
  std::abort();
}
void accumulate_grads(const GateRows<float>&, const uint16_t*, const uint16_t*, int64_t, float*) {
  std::abort();
}
void mix(const GateRows<float>&, const uint16_t*, uint16_t*, int64_t) {
  std::abort();
}
bool passes_together(const GateRows<float>&, const GateRows<float>&) {
  return false;
}
void backward_passes(const GateRows<float>&, const GateRows<float>&, const uint16_t*,
                     const uint16_t*, int64_t, float*, uint16_t*, uint16_t*) {
  std::abort();
}
}  // namespace nanomoe::cpu::gate_tile

#endif
