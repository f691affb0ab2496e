// The elementwise gates in bfloat16 on AMX, for gate_tile.h's mix where Gate::make chose it.
// Scalar: per token, dst (K_dst x r) = G (K_dst x K_src) src (K_src x r), so over a tile of tokens
// one product of G with the (K_src, tokens * r) activations. Diagonal: per rank position, one
// product of that position's (K_dst x K_src) gate with the (K_src, tokens) activations.
// diagonal_outer: that, and its rank-one part as a product per source block (the dot products with
// right) and one per destination block (their sums weighted by left). The tile unit's 16 x 32 steps
// in place of float32 FMAs. Raw pointers only, like projection.h.
#pragma once

#include <cstdint>

#include "gate_layout.h"

namespace nanomoe::cpu::gate_amx {

// Whether a bfloat16 call's gate g (its counts and strides set) mixes here: the CPU runs AMX
// (amx::available) and the blocks fill enough of the 16 x 32 steps (measured in
// benchmarks/NOTES.md, versions 31, 33 and 38).
bool chosen(const GateRows<float>& g);

// The gate's (dst, src) entries as the tile unit's first operand, from mix (bfloat16 bits, at g's
// strides): per rank position c of diagonal (once for scalar), row d (src_blocks long) of G_ds at
// c, the rows padded with zeros to a multiple of 16; for diagonal_outer, then g.left and g.right
// (float32 copies of bfloat16 weights) in gate_amx.cpp's layouts. gate_size(g) elements.
int64_t gate_size(const GateRows<float>& g);
void lay_out(const GateRows<float>& g, const uint16_t* mix, uint16_t* gate);

// dst[t, d, :] = sum_s G_ds src[t, s, :] as gate_tile::mix, reading g.amx_gate (Gate::make lays it
// out), summed in float32 and rounded once. Holds its own amx::Tiles (a no-op
// inside a caller's).
void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens);

// Whether the forward gate g (laid out here) also sums its weight gradient here: scalar, an even
// rank of at least 16 (a pair of rank positions is then one 32-bit element of a token's row).
bool grads_chosen(const GateRows<float>& g);

// grad_mix[d, s] += sum_t <grad_dst[t, d], src[t, s]> as gate_tile::accumulate_grads, for a gate
// grads_chosen accepts, in float32 sums laid out like mix.
void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* grad_mix);

// Whether the forward gate g (laid out here) sums its weight gradients here in float32 tiles of its
// own: diagonal and diagonal_outer. tile_grads_size(g) floats, zeroed by the caller;
// accumulate_tile_grads adds the sums over a tile of tokens (src = hidden, grad_dst = grad_mixed)
// to them, and tile_grads_to_mix writes their total in mix's layout (grad_left and grad_right
// only for diagonal_outer).
bool tile_grads_chosen(const GateRows<float>& g);
int64_t tile_grads_size(const GateRows<float>& g);
void accumulate_tile_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                           int64_t tokens, float* sums);
void tile_grads_to_mix(const GateRows<float>& g, const float* sums, float* grad_mix,
                       float* grad_left, float* grad_right);

}  // namespace nanomoe::cpu::gate_amx
