// The CPU backward on the kernels of projection.h: float32 and bfloat16 on CPUs with AVX-512
// (runs_projected in projected_forward.h), for batches of more than kRowsTokens tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

#include "../checks.h"
#include "../operator_io.h"
#include "operands.h"

namespace nanomoe::cpu {

// Below this many tokens the backward keeps ATen's BLAS, which splits each weight product across
// threads; the tile loop here splits tokens.
constexpr int64_t kProjectedBackwardTokens = 17;

// linear_backward's gradients: those asked for in needs, the others undefined; grad_x as
// (tokens, in_features). grad_rows: (tokens, out_features) and x_rows: (tokens,
// in_features), rows contiguous; hidden: the forward's (tokens, K_in, r), contiguous.
Grads projected_backward(const LinearDims& dims, const at::Tensor& grad_rows,
                         const at::Tensor& x_rows, const Weights& w, const at::Tensor& hidden,
                         const std::array<bool, kNumInputs>& needs);

}  // namespace nanomoe::cpu
