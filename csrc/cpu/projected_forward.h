// The CPU forward on the kernels of projection.h: float32 and bfloat16 on CPUs with AVX-512.
#pragma once

#include <ATen/core/Tensor.h>

#include "../checks.h"
#include "operands.h"

namespace nanomoe::cpu {

// Whether projected_forward runs tensors of this dtype on this CPU.
bool runs_projected(at::ScalarType dtype);

// Writes out (tokens, out_features) and, when hidden is defined, every token's hidden (tokens,
// K_in, r). x_rows: (tokens, in_features), rows contiguous; bias: float32 or undefined.
void projected_forward(const LinearDims& dims, const at::Tensor& x_rows, const Weights& w,
                       const at::Tensor& bias, const at::Tensor& out, const at::Tensor& hidden);

}  // namespace nanomoe::cpu
