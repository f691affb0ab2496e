// The elementwise gates (scalar, diagonal, diagonal_outer) as the CPU mixing loops read them: raw
// pointers and sizes only, so AVX-512 translation units can include it (see projection.h).
#pragma once

#include <cstdint>
#include <type_traits>

namespace nanomoe::cpu {

// The gate of one direction (forward G or transposed G^T), over acc_t copies of its tensors.
// variant: 0 scalar, 1 diagonal, 2 diagonal_outer (full mixing is a GEMM, not done here).
template <typename acc_t>
struct GateRows {
  int variant;
  int64_t rank, dst_blocks, src_blocks;
  int64_t dst_stride, src_stride;  // elements between consecutive dst / src blocks in mix
  const acc_t* mix;
  const acc_t* left;   // diagonal_outer only
  const acc_t* right;  // diagonal_outer only
  // The same tensors with the destination block innermost, set where mixes_by_block says so (else
  // null): entry (s, c, d) at (s * steps + c) * dst_lanes + d, steps = 1 for scalar and rank
  // otherwise, dst_lanes = dst_blocks rounded up to a multiple of 16 (the padding is zeros).
  const acc_t* mix_by_block;
  const acc_t* left_by_block;
  const acc_t* right_by_block;
  int64_t dst_lanes;
  // bfloat16's gates laid out by block, again in pairs of bfloat16 (one 32-bit element each, the
  // first low) for vdpbf16ps, set where gate_by_block::mixes_in_pairs says (else null): mix and
  // left paired over source blocks, element (p, c, d) = entries (2p, c, d) and (2p + 1, c, d) at
  // (p * steps + c) * dst_lanes + d (zeros past src_blocks); right over rank positions, element
  // (s, q, d) = entries (s, 2q, d) and (s, 2q + 1, d) at (s * rank / 2 + q) * dst_lanes + d, and
  // left so too in the forward gate (for the weight gradients' dot products; else null).
  const uint32_t* mix_pairs_by_block;
  const uint32_t* left_pairs_by_block;
  const uint32_t* right_pairs_by_block;
  const uint32_t* left_rank_pairs_by_block;
  // The gate in bfloat16 for gate_amx.h, set where gate_amx::chosen says (else null).
  const uint16_t* amx_gate;
  // diagonal_outer's right and left in bfloat16 for its dot products from pairs, set where
  // gate_tile::dots_from_pairs says (else null): right as block s's (rank x dst) matrix by pairs of
  // rank positions, pair p's entry for destination block d at
  // right_pairs + (s * ((rank + 1) / 2) + p) * 2 * right_cols + 2 * d (zeros from d = dst_blocks);
  // left (for the weight gradients' <left_ds, grad_dst[t, d]>) the same with the roles of d and s
  // swapped: left_pairs + (d * ((rank + 1) / 2) + p) * 2 * left_cols + 2 * s.
  const uint16_t* right_pairs;
  const uint16_t* left_pairs;
  int64_t right_cols, left_cols;
  // Where the dot products come from pairs (right_pairs set), mix and left again in pairs of
  // bfloat16 over source blocks, for mixing by rank position with vdpbf16ps: element (d, p, c) =
  // entries (d, 2p, c) and (d, 2p + 1, c), the first low, at (d * src_pairs() + p) * rank + c
  // (zeros past src_blocks).
  const uint32_t* mix_source_pairs;
  const uint32_t* left_source_pairs;

  // Entries per (dst, src) pair of blocks: one for the scalar gate, one per rank position else.
  int64_t steps() const { return variant == 0 ? 1 : rank; }
  // Pairs of source blocks, the last one's partner zero where they are odd.
  int64_t src_pairs() const { return (src_blocks + 1) / 2; }
};

constexpr int64_t kGateLanes = 16;      // float32 lanes of an AVX-512 vector
constexpr int64_t kByBlockTokens = 12;  // tokens per load of the gate when mixing by block

// The share of the lanes that n elements fill, in as many vectors as they need.
inline double filled_lanes(int64_t n) {
  return double(n) / double((n + kGateLanes - 1) / kGateLanes * kGateLanes);
}

// Where blocks and rank fill the lanes equally, at ranks from 16 up to this one, diagonal_outer
// mixes by block, and so does bfloat16's every gate where it mixes in pairs (gate_by_block.h; no
// tile unit takes the gate). By block, diagonal_outer's dot products <right_ds, x_s> are plain
// multiply-adds with 16 blocks in the lanes, where with rank positions as the lanes each one ends
// in a lane reduction. Measured (4096 tokens, float32 and bfloat16, alternating in one process):
// the forward 1.3x to 2.5x faster and forward+backward 1.2x to 1.65x at ranks 16 and 32 with 16 to
// 64 blocks; at rank 64 with 16 blocks the same within noise, at rank 128 forward+backward 6 to
// 10% slower. The scalar and diagonal gates in pairs (vdpbf16ps) against float32 FMAs on widened
// rows by rank position: forward 0.79x and 0.82x, forward+backward 0.70x and 0.77x at K = 64,
// r = 16; at K = 32, r = 32 0.96x to 1.01x forward, 0.86x to 1.00x forward+backward (NOTES,
// version 104). In float32 by block measured 1.06x to 1.15x there, so float32's stay by rank.
constexpr int64_t kLanesAlikeMaxRank = 32;

// Whether the AVX-512 mixing runs with destination blocks as its vector lanes (a product of the
// (dst, src) gate with the (src, tokens) activations per rank position: one GEMM-shaped step)
// rather than rank positions, for a call of `tokens` tokens: when the rank fills fewer lanes than
// the blocks do (below kByBlockTokens tokens, part of each group is padding); where they fill them
// alike, at ranks 16 to kLanesAlikeMaxRank, for diagonal_outer (variant 2) and, in_pairs (a
// bfloat16 gate no tile unit takes), for every variant. Decided once per call, never per token
// tile: diagonal_outer's two layouts sum its dot products in different orders, so a choice per
// tile would make the bits depend on how the threads cut the tokens.
inline bool mixes_by_block(int variant, int64_t rank, int64_t dst_blocks, int64_t tokens,
                           bool in_pairs) {
  const double group = double(tokens < kByBlockTokens ? tokens : kByBlockTokens) / kByBlockTokens;
  const double block_lanes = group * filled_lanes(dst_blocks), rank_lanes = filled_lanes(rank);
  const bool lanes_alike = (variant == 2 || in_pairs) && rank >= kGateLanes &&
                           rank <= kLanesAlikeMaxRank && block_lanes >= rank_lanes;
  return block_lanes > rank_lanes || lanes_alike;
}

// fn(std::integral_constant<int, variant>{}): the variant as a compile-time constant, for the
// kernels templated on it.
template <typename F>
void with_variant(int variant, const F& fn) {
  switch (variant) {
    case 0:
      return fn(std::integral_constant<int, 0>{});
    case 1:
      return fn(std::integral_constant<int, 1>{});
    default:
      return fn(std::integral_constant<int, 2>{});
  }
}

}  // namespace nanomoe::cpu
