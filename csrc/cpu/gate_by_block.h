// The elementwise gates with destination blocks as the vector lanes, for gate_tile.h's mix where
// mixes_by_block (gate_layout.h) chooses it: small ranks under many blocks.
#pragma once

#include <cstdint>

#include "gate_layout.h"

namespace nanomoe::cpu::gate_by_block {

// dst[t, d, :] = sum_s G_ds src[t, s, :] as gate_tile::mix, reading g.mix_by_block (and, for
// diagonal_outer, left_by_block and right_by_block), which must be set.
void mix(const GateRows<float>& g, const float* src, float* dst, int64_t tokens);
void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens);

}  // namespace nanomoe::cpu::gate_by_block
