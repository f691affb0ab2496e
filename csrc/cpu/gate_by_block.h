// The elementwise gates with destination blocks as the vector lanes, for gate_tile.h's mix where
// mixes_by_block (gate_layout.h) chooses it, once per call: small ranks under many blocks.
#pragma once

#include <cstdint>

#include "gate_layout.h"

namespace nanomoe::cpu::gate_by_block {

// Whether bfloat16's gate g, laid out by block, also mixes by vdpbf16ps on pairs of bfloat16
// (GateRows::mix_pairs_by_block), two multiply-adds a lane per instruction where the float32 FMAs
// on widened rows did one: every scalar and diagonal gate, and diagonal_outer at even ranks (its
// dot products pair rank positions within a source block; an odd rank's last pair would reach
// into the next block). Its dot products are then rounded to bfloat16 before their rank-one sums,
// as on AMX.
inline bool mixes_in_pairs(const GateRows<float>& g) {
  return g.variant != 2 || g.rank % 2 == 0;
}

// dst[t, d, :] = sum_s G_ds src[t, s, :] as gate_tile::mix, reading g.mix_by_block (and, for
// diagonal_outer, left_by_block and right_by_block), which must be set; bfloat16 reads the pairs
// (GateRows::mix_pairs_by_block) where they are set.
void mix(const GateRows<float>& g, const float* src, float* dst, int64_t tokens);
void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens);

// The forward gate's weight gradients as gate_tile::accumulate_grads, with the output blocks as the
// lanes, summed in float32 in this file's own layout, the gate's by block: grad_mix's sums, then
// for diagonal_outer grad_left's and grad_right's, each entry (s, c, d) at (s * steps + c) *
// dst_lanes + d (see GateRows), so that every sum is added as a whole vector. grads_size(g)
// floats, zeroed by the caller; grads_to_mix writes a total in mix's layout (grad_left and
// grad_right for diagonal_outer only, else null).
int64_t grads_size(const GateRows<float>& g);
void accumulate_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                      int64_t tokens, float* sums);
void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* sums);
void grads_to_mix(const GateRows<float>& g, const float* sums, float* grad_mix, float* grad_left,
                  float* grad_right);

}  // namespace nanomoe::cpu::gate_by_block
