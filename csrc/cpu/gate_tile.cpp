// AVX-512 mixing (see gate_tile.h): eight tokens at a time, each destination block 16 lanes at a
// time in registers, summed over the source blocks; each load of the gate serves the eight tokens.
// Where the gate is laid out by block (gate_layout.h, mixes_by_block), gate_by_block.cpp mixes, and
// where bfloat16's gates are laid out for AMX (gate_amx::chosen), gate_amx.cpp.
// Their source rows (converted to float32 once when they are bfloat16) and the gate stay in L1.
// The weight gradients are summed in the layout of whichever of these kernels sums them.
#include "gate_tile.h"

#include <algorithm>

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

#include <type_traits>
#include <vector>

#include "avx512.h"

namespace nanomoe::cpu::gate_tile {
namespace {

// Tokens that share each load of the gate: also the number of independent sums in flight, which
// must cover the FMA latency times its two pipes (4 tokens measured half the rate of 8).
constexpr int kGroupTokens = 8;

template <bool kMasked>
NANOMOE_AVX512 inline __m512 load(__mmask16 lanes, const float* from) {
  return kMasked ? _mm512_maskz_loadu_ps(lanes, from) : _mm512_loadu_ps(from);
}

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

// Lanes [c, c + 16) of destination block d for kTokens tokens: float32 source rows at
// x + t * x_row; for diagonal_outer, dots[s * kTokens + t] = <right_ds, x_ts>. kMasked: the
// block's last, partial 16 lanes.
template <int kVariant, int kTokens, bool kMasked, typename T>
NANOMOE_AVX512 __attribute__((always_inline)) inline void mix_lanes(const GateRows<float>& g,
                                                                    const float* x, int64_t x_row,
                                                                    const float* dots, T* y,
                                                                    int64_t y_row, int64_t d,
                                                                    int64_t c) {
  const int64_t r = g.rank;
  const __mmask16 lanes = kMasked ? first_lanes(r - c) : __mmask16(0xFFFF);
  __m512 acc[kTokens];
#pragma GCC unroll 8
  for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t s = 0; s < g.src_blocks; ++s) {
    const int64_t pair = d * g.dst_stride + s * g.src_stride;
    const __m512 weight =
        kVariant == 0 ? _mm512_set1_ps(g.mix[pair]) : load<kMasked>(lanes, g.mix + pair + c);
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) {
      acc[t] = _mm512_fmadd_ps(weight, load<kMasked>(lanes, x + t * x_row + s * r + c), acc[t]);
    }
    if constexpr (kVariant == 2) {
      const __m512 left = load<kMasked>(lanes, g.left + pair + c);
#pragma GCC unroll 8
      for (int t = 0; t < kTokens; ++t) {
        acc[t] = _mm512_fmadd_ps(left, _mm512_set1_ps(dots[s * kTokens + t]), acc[t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < kTokens; ++t) store_lanes(y + t * y_row + c, lanes, acc[t]);
}

template <int kVariant, int kTokens, typename T>
NANOMOE_AVX512 void mix_group(const GateRows<float>& g, const float* x, int64_t x_row, float* dots,
                              T* y, int64_t y_row) {
  const int64_t r = g.rank;
  for (int64_t d = 0; d < g.dst_blocks; ++d) {
    if constexpr (kVariant == 2) right_dots<kTokens>(g, x, x_row, d, dots);
    int64_t c = 0;
    for (; c + 16 <= r; c += 16) {
      mix_lanes<kVariant, kTokens, false>(g, x, x_row, dots, y + d * r, y_row, d, c);
    }
    if (c < r) mix_lanes<kVariant, kTokens, true>(g, x, x_row, dots, y + d * r, y_row, d, c);
  }
}

// mix_group for a group of 1 to kGroupTokens tokens (fixed at compile time, so the sums stay in
// registers).
template <int kVariant, int kTokens = kGroupTokens, typename T>
NANOMOE_AVX512 void mix_group_of(int64_t tokens, const GateRows<float>& g, const float* x,
                                 int64_t x_row, float* dots, T* y, int64_t y_row) {
  if constexpr (kTokens > 1) {
    if (tokens < kTokens)
      return mix_group_of<kVariant, kTokens - 1>(tokens, g, x, x_row, dots, y, y_row);
  }
  mix_group<kVariant, kTokens>(g, x, x_row, dots, y, y_row);
}

template <int kVariant, typename T>
NANOMOE_AVX512 void mix_tokens(const GateRows<float>& g, const T* src, T* dst, int64_t tokens) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  std::vector<float> buffer((kConvert ? kGroupTokens * src_row : 0) + kGroupTokens * g.src_blocks);
  float* dots = buffer.data();
  float* converted = buffer.data() + kGroupTokens * g.src_blocks;
  for (int64_t t = 0; t < tokens; t += kGroupTokens) {
    const int64_t group = std::min<int64_t>(kGroupTokens, tokens - t);
    const float* x = as_float(src + t * src_row, group * src_row, converted);
    T* y = dst + t * dst_row;
    mix_group_of<kVariant>(group, g, x, src_row, dots, y, dst_row);
  }
}

// ---- the gate's weight gradients ------------------------------------------------------------

constexpr int kGradTokens = 32;  // tokens converted to float32 and summed per pass
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

// diagonal_outer's rank-one part, G_ds = ... + left_ds right_ds^T: grad_left_ds += sum_t
// <right_ds, x_ts> gy_td and grad_right_ds += sum_t <left_ds, gy_td> x_ts. dots holds
// 2 * kGradTokens floats.
NANOMOE_AVX512 void outer_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                                int64_t tokens, int64_t d, int64_t s, float* dots, float* grad_left,
                                float* grad_right) {
  const int64_t r = g.rank, src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  const int64_t pair = d * g.dst_stride + s * g.src_stride;
  float* right_dots = dots;               // <right_ds, x_ts>
  float* left_dots = dots + kGradTokens;  // <left_ds, gy_td>
  for (int64_t first = 0; first < tokens; first += 16) {
    const float* x[16];
    const float* gy[16];
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t t = std::min(first + j, tokens - 1);
      x[j] = src + t * src_row + s * r;
      gy[j] = grad_dst + t * dst_row + d * r;
    }
    const int64_t count = std::min<int64_t>(16, tokens - first);
    dots16(g.right + pair, x, r, count, right_dots + first);
    dots16(g.left + pair, gy, r, count, left_dots + first);
  }
  for (int64_t c = 0; c < r; c += 16) {
    const __mmask16 lanes = first_lanes(r - c);
    __m512 left = _mm512_maskz_loadu_ps(lanes, grad_left + pair + c);
    __m512 right = _mm512_maskz_loadu_ps(lanes, grad_right + pair + c);
    for (int64_t t = 0; t < tokens; ++t) {
      left =
          _mm512_fmadd_ps(_mm512_set1_ps(right_dots[t]),
                          _mm512_maskz_loadu_ps(lanes, grad_dst + t * dst_row + d * r + c), left);
      right = _mm512_fmadd_ps(_mm512_set1_ps(left_dots[t]),
                              _mm512_maskz_loadu_ps(lanes, src + t * src_row + s * r + c), right);
    }
    _mm512_mask_storeu_ps(grad_left + pair + c, lanes, left);
    _mm512_mask_storeu_ps(grad_right + pair + c, lanes, right);
  }
}

template <int kVariant>
NANOMOE_AVX512 void grads_of_group(const GateRows<float>& g, const float* src,
                                   const float* grad_dst, int64_t tokens, float* dots,
                                   float* grad_mix, float* grad_left, float* grad_right) {
  for (int64_t d = 0; d < g.dst_blocks; d += kGradDst) {
    for (int64_t s = 0; s < g.src_blocks; s += kGradSrc) {
      mix_grads_of<kVariant>(g.dst_blocks - d, g.src_blocks - s, g, src, grad_dst, tokens, d, s,
                             grad_mix);
    }
  }
  if constexpr (kVariant == 2) {
    for (int64_t d = 0; d < g.dst_blocks; ++d) {
      for (int64_t s = 0; s < g.src_blocks; ++s) {
        outer_grads(g, src, grad_dst, tokens, d, s, dots, grad_left, grad_right);
      }
    }
  }
}

template <int kVariant, typename T>
void accumulate_grads_as(const GateRows<float>& g, const T* src, const T* grad_dst, int64_t tokens,
                         float* grad_mix, float* grad_left, float* grad_right) {
  const int64_t src_row = g.src_blocks * g.rank, dst_row = g.dst_blocks * g.rank;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  std::vector<float> buffer((kConvert ? kGradTokens * (src_row + dst_row) : 0) + 2 * kGradTokens);
  float* dots = buffer.data();
  float* src_float = dots + 2 * kGradTokens;
  float* grad_float = src_float + kGradTokens * src_row;
  for (int64_t t = 0; t < tokens; t += kGradTokens) {
    const int64_t group = std::min<int64_t>(kGradTokens, tokens - t);
    grads_of_group<kVariant>(g, as_float(src + t * src_row, group * src_row, src_float),
                             as_float(grad_dst + t * dst_row, group * dst_row, grad_float), group,
                             dots, grad_mix, grad_left, grad_right);
  }
}

// Sums in mix's layout: grad_mix's, then for diagonal_outer grad_left's and grad_right's.
template <typename T>
void accumulate_in_mix_layout(const GateRows<float>& g, const T* src, const T* grad_dst,
                              int64_t tokens, float* sums) {
  const int64_t numel = mix_numel(g);
  float* grad_left = g.variant == 2 ? sums + numel : nullptr;
  float* grad_right = g.variant == 2 ? sums + 2 * numel : nullptr;
  with_variant(g.variant, [&](auto v) {
    accumulate_grads_as<decltype(v)::value>(g, src, grad_dst, tokens, sums, grad_left, grad_right);
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
  with_variant(g.variant, [&](auto v) { mix_tokens<decltype(v)::value>(g, src, dst, tokens); });
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
}  // namespace nanomoe::cpu::gate_tile

#endif
