// The gate as one dense (K_out r, K_in r) matrix for the projected kernels: the full gate always,
// and diagonal_outer at a small rank. diagonal_outer's gate is 3 K^2 r multiply-adds per token, two
// thirds of them in products r deep (the dot products with right) or r rows wide (left's rank-one
// terms): at r = 4 to 8 those fill an eighth to a quarter of an AMX step or of the register tile's
// columns. As one matrix it is K^2 r^2 multiply-adds, r / 3 times as many, but in one product
// K_in r deep and K_out r wide, on the full gate's kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/eye.h>

#include "../checks.h"
#include "amx.h"
#include "gate.h"
#include "operands.h"

namespace nanomoe::cpu {

// Below this many tokens the forward reads the weights in place (projected_forward.cpp's
// kRowsTokens), and the matrix would cost more to build than the gate costs to run.
constexpr int64_t kDenseMinTokens = 17;

// diagonal_outer's largest rank run dense. Measured against its own kernels (2 threads, 4096
// tokens, NOTES version 51): bfloat16 on AMX at r = 4 to 8, the forward 0.45x to 0.97x the time and
// forward+backward 0.5x to 0.95x (r = 16: 1.7x and 1.5x); float32, and bfloat16 without AMX, at
// r = 4, 0.88x to 1.05x and 0.74x to 0.99x (r = 6 to 8: up to 1.4x slower).
inline int64_t dense_max_rank(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && amx::available() ? 8 : 4;
}

// Whether the projected kernels run this call's gate as one dense matrix.
inline bool mixes_densely(const LinearDims& d, at::ScalarType dtype) {
  if (d.mixing == Mixing::kFull) return true;
  return d.mixing == Mixing::kDiagonalOuter && d.tokens >= kDenseMinTokens &&
         d.rank <= dense_max_rank(dtype);
}

// Row (i, a), column (j, b): the gate G_ij's entry (a, b), in the weights' dtype. diagonal_outer's
// diag(mix_ij) + left_ij right_ij^T is made in float32 and rounded once.
inline at::Tensor dense_gate_matrix(const LinearDims& d, const Weights& w) {
  if (d.mixing == Mixing::kFull) return full_mix_matrix(w.mix);
  const at::Tensor mix = w.mix.to(at::kFloat), left = w.mix_left.to(at::kFloat);
  const at::Tensor right = w.mix_right.to(at::kFloat);
  const at::Tensor eye = at::eye(d.rank, mix.options());
  const at::Tensor by_pair =
      mix.unsqueeze(-1).mul(eye).add(left.unsqueeze(-1).mul(right.unsqueeze(-2)));
  return full_mix_matrix(by_pair).to(w.mix.scalar_type());
}

// From the sums of the dense matrix's gradient, (i, a) x (j, b), contiguous.
inline GateGrads dense_gate_grads(const LinearDims& d, const Weights& w, const at::Tensor& sums) {
  const int64_t r = d.rank;
  const at::Tensor by_pair = sums.view({d.out_blocks, r, d.in_blocks, r}).permute({0, 2, 1, 3});
  if (d.mixing == Mixing::kFull) return {by_pair, {}, {}};
  // G_ij = diag(mix_ij) + left_ij right_ij^T: mix's gradient is the diagonal, left's the
  // gradient times right, right's left times the gradient.
  const at::Tensor left = w.mix_left.to(at::kFloat), right = w.mix_right.to(at::kFloat);
  return {by_pair.diagonal(0, 2, 3), by_pair.matmul(right.unsqueeze(-1)).squeeze(-1),
          left.unsqueeze(-2).matmul(by_pair).squeeze(-2)};
}

}  // namespace nanomoe::cpu
