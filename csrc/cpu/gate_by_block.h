// The elementwise gates with destination blocks as the vector lanes, for gate_tile.h's mix where
// mixes_by_block (gate_layout.h) chooses it, once per call: small ranks under many blocks.
#pragma once

#include <cstdint>

#include "gate_layout.h"

namespace nanomoe::cpu::gate_by_block {

// dst[t, d, :] = sum_s G_ds src[t, s, :] as gate_tile::mix, reading g.mix_by_block (and, for
// diagonal_outer, left_by_block and right_by_block), which must be set.
void mix(const GateRows<float>& g, const float* src, float* dst, int64_t tokens);
void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens);

// The forward gate's weight gradients as gate_tile::accumulate_grads, with the output blocks as the
// lanes: g is the forward gate, laid out by block.
void accumulate_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                      int64_t tokens, float* grad_mix, float* grad_left, float* grad_right);
void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* grad_mix, float* grad_left, float* grad_right);

}  // namespace nanomoe::cpu::gate_by_block
