// The scalar gate in bfloat16 on AMX, for gate_tile.h's mix where Gate::make chose it: per token,
// dst (K_dst x r) = G (K_dst x K_src) src (K_src x r), so over a tile of tokens one product of G
// with the (K_src, tokens * r) activations, the tile unit's 16 x 32 steps in place of float32
// FMAs. Raw pointers only, like projection.h.
#pragma once

#include <cstdint>

#include "gate_layout.h"

namespace nanomoe::cpu::gate_amx {

// Whether a bfloat16 call's scalar gate with these block counts mixes here: the CPU runs AMX
// (amx::available) and the blocks fill enough of the 16 x 32 steps (measured in
// benchmarks/NOTES.md, version 31).
bool chosen(int64_t dst_blocks, int64_t src_blocks);

// The gate's (dst, src) entries as the tile unit's first operand: row d (src_blocks long) of
// G_ds, the rows padded with zeros to a multiple of 16. gate_size elements.
int64_t gate_size(int64_t dst_blocks, int64_t src_blocks);
void lay_out(const uint16_t* mix, int64_t dst_stride, int64_t src_stride, int64_t dst_blocks,
             int64_t src_blocks, uint16_t* gate);

// dst[t, d, :] = sum_s G_ds src[t, s, :] as gate_tile::mix, reading g.amx_gate (Gate::make lays it
// out), summed in float32 and rounded once. Configures the tile unit itself.
void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens);

}  // namespace nanomoe::cpu::gate_amx
