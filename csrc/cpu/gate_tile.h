// The elementwise gates applied to a token tile with AVX-512, for the forward and backward of
// projected_forward.h and projected_backward.h (raw pointers only, like projection.h, for the same
// reason). A gate laid out by block (GateRows::mix_by_block set) is handed to gate_by_block.h, and
// bfloat16's gates laid out for AMX (GateRows::amx_gate set) to gate_amx.h; bfloat16's
// diagonal_outer takes its dot products from products of bfloat16 pairs where dots_from_pairs says.
#pragma once

#include <cstdint>

#include "gate_layout.h"

namespace nanomoe::cpu::gate_tile {

// dst[t, d, :] = sum_s G_ds src[t, s, :] for t < tokens and every dst block d, src and dst
// contiguous (tokens, blocks, rank); bfloat16 as its bits, summed in float32. Callers check
// projection::runs_float() / runs_bfloat16() first.
void mix(const GateRows<float>& g, const float* src, float* dst, int64_t tokens);
void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens);

// Whether bfloat16's gate g, in a call of `tokens` tokens, takes diagonal_outer's dot products
// <right_ds, src[t, s]> from bfloat16 pairs: per 32 tokens and source block s, the tokens' rows
// (read in place) by block s's right, into float32 sums; on the tile unit where AMX runs, else by
// vdpbf16ps (the float32 FMAs on widened rows took 1.1x the forward's time: NOTES, version 98).
// Where mix runs its own kernel here (g laid out neither by block nor for gate_amx) and the call
// has 32 tokens or more; accumulate_grads takes its <left_ds, grad_dst[t, d]> there too. There
// the mixing itself runs by vdpbf16ps on pairs of source blocks (GateRows::mix_source_pairs), the
// dot products rounded to bfloat16 (below 32 tokens they are rounded too, so that a token's
// output hardly depends on the tokens beside it; NOTES, version 107).
// lay_out_dot_pairs writes dot_pairs_size(g, with_left) elements: g.right as GateRows::right_pairs
// and, with_left (a forward gate, whose weight gradients may be summed), g.left as left_pairs, and
// points g at them.
bool dots_from_pairs(const GateRows<float>& g, int64_t tokens);
int64_t dot_pairs_size(const GateRows<float>& g, bool with_left);
void lay_out_dot_pairs(GateRows<float>& g, bool with_left, uint16_t* pairs);

// The forward gate's weight gradients (g is the forward gate: dst = output blocks), summed over
// tokens into a thread's float32 sums laid out as the kernel chosen for g sums them: mix's layout
// (grad_mix, then for diagonal_outer grad_left and grad_right), or gate_amx's or gate_by_block's
// own. grads_size(g) floats, zeroed by the caller; accumulate_grads adds the sums over a tile
// (src = hidden (tokens, K_in, r), grad_dst = grad_mixed (tokens, K_out, r)), and grads_to_mix
// writes a total in mix's layout (grad_left and grad_right like mix_left and mix_right,
// diagonal_outer only, else null).
int64_t grads_size(const GateRows<float>& g);
void accumulate_grads(const GateRows<float>& g, const float* src, const float* grad_dst,
                      int64_t tokens, float* sums);
void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* sums);
void grads_to_mix(const GateRows<float>& g, const float* sums, float* grad_mix, float* grad_left,
                  float* grad_right);

// A bfloat16 backward tile's three gate passes at once, where passes_together(g, g_t) says (g the
// forward gate, g_t the transposed one, mixed here, the gradients in mix's layout; diagonal_outer's
// dot products from pairs both ways): per 8 tokens, hidden and grad_mixed widened to float32
// once, then the weight gradients added to sums (as accumulate_grads), mixed = G hidden (as mix)
// and grad_hidden = G^T grad_mixed from them (diagonal_outer's from the bfloat16 rows, in pairs
// of source blocks, as mix); diagonal_outer's dot products made once per 32
// tokens for the gradients and the mixing both. Apart, each pass widened the rows it read:
// 0.976 to 0.989 the backward's time (NOTES, version 81; diagonal_outer, version 84). The same
// bits as the three passes.
bool passes_together(const GateRows<float>& g, const GateRows<float>& g_t);
void backward_passes(const GateRows<float>& g, const GateRows<float>& g_t, const uint16_t* hidden,
                     const uint16_t* grad_mixed, int64_t tokens, float* sums, uint16_t* mixed,
                     uint16_t* grad_hidden);

}  // namespace nanomoe::cpu::gate_tile
