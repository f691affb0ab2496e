// The elementwise gates applied to a token tile with AVX-512, for the forward and backward of
// projected_forward.h and projected_backward.h (raw pointers only, like projection.h, for the same
// reason). A gate laid out by block (GateRows::mix_by_block set) is handed to gate_by_block.h, and
// bfloat16's gates laid out for AMX (GateRows::amx_gate set) to gate_amx.h.
#pragma once

#include <cstdint>

#include "gate_layout.h"

namespace nanomoe::cpu::gate_tile {

// dst[t, d, :] = sum_s G_ds src[t, s, :] for t < tokens and every dst block d, src and dst
// contiguous (tokens, blocks, rank); bfloat16 as its bits, summed in float32. Callers check
// projection::runs_float() / runs_bfloat16() first.
void mix(const GateRows<float>& g, const float* src, float* dst, int64_t tokens);
void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens);

// The forward gate's weight gradients summed over tokens and added into float32 sums laid out like
// mix (grad_left / grad_right: like mix_left / mix_right, diagonal_outer only, else null), given
// src = hidden (tokens, K_in, r) and grad_dst = grad_mixed (tokens, K_out, r); g is the forward
// gate (dst = output blocks).
void accumulate_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                      int64_t tokens, float* grad_mix, float* grad_left, float* grad_right);
void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* grad_mix, float* grad_left, float* grad_right);

}  // namespace nanomoe::cpu::gate_tile
