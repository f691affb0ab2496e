// The CPU backward on the kernels of projection.h: float32 and bfloat16 on CPUs with AVX-512
// (runs_projected in projected_forward.h), for the calls backward_projected picks.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

#include "../checks.h"
#include "../operator_io.h"
#include "operands.h"

namespace nanomoe::cpu {

// Below this many tokens the backward keeps ATen's BLAS, which splits each weight product across
// threads (the tile loop here splits tokens), unless either side has this many blocks: ATen's
// loop of small per-block products then costs more than one thread's pass over the weights.
// Measured at 16 tokens and at one (2 threads, forward+backward, benchmarks/NOTES.md version 35):
// with 16 to 64 blocks the tile loop took 0.24x to 0.9x ATen's time but for one case (1.16x:
// diagonal_outer, 16 blocks of rank 64, bfloat16); with 8 blocks, 0.56x to 2.7x.
constexpr int64_t kProjectedBackwardTokens = 17;
constexpr int64_t kProjectedBackwardBlocks = 16;

// Whether the backward of this call runs here (on a CPU where runs_projected holds).
// The full gate with fewer tokens than its rank stays on ATen, which reads its K^2 r^2 entries in
// place (the tile loop packs them).
inline bool backward_projected(const LinearDims& dims) {
  const bool many_blocks =
      dims.in_blocks >= kProjectedBackwardBlocks || dims.out_blocks >= kProjectedBackwardBlocks;
  const bool full_in_place = dims.mixing == Mixing::kFull && dims.tokens < dims.rank;
  return dims.tokens >= kProjectedBackwardTokens || (many_blocks && !full_in_place);
}

// linear_backward's gradients: those asked for in needs, the others undefined; grad_x as
// (tokens, in_features). grad_rows: (tokens, out_features) and x_rows: (tokens,
// in_features), rows contiguous; hidden: the forward's (tokens, K_in, r), contiguous.
Grads projected_backward(const LinearDims& dims, const at::Tensor& grad_rows,
                         const at::Tensor& x_rows, const Weights& w, const at::Tensor& hidden,
                         const std::array<bool, kNumInputs>& needs);

}  // namespace nanomoe::cpu
