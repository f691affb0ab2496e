// Argument validation shared by every kernel and by the autograd wrapper: one place decides what a
// valid call is, and raises ValueError / TypeError / RuntimeError (as Python sees them) naming the
// problem before any work starts.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace nanomoe {

enum class Mixing { kScalar, kDiagonal, kDiagonalOuter, kFull };

// Sizes of one call, read off the tensors.
struct LinearDims {
  int64_t tokens;        // product of x's leading dimensions
  int64_t in_features;   // n
  int64_t out_features;  // m
  int64_t in_blocks;     // K_in
  int64_t out_blocks;    // K_out
  int64_t rank;          // r
  int64_t in_block;      // n_b = n / K_in
  int64_t out_block;     // m_b = m / K_out
  Mixing mixing;
};

// Same dtype and device for every tensor. Reads no sizes, so it also runs on symbolic (traced)
// tensors; the autograd wrapper calls it before dispatching on.
void check_placement(const at::Tensor& x, const at::Tensor& down, const at::Tensor& mix,
                     const at::Tensor& up, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& mix_left,
                     const std::optional<at::Tensor>& mix_right);

// Everything: placement, then every shape. Kernels call it first.
LinearDims check_linear_args(const at::Tensor& x, const at::Tensor& down, const at::Tensor& mix,
                             const at::Tensor& up, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& mix_left,
                             const std::optional<at::Tensor>& mix_right);

// The backward's extra arguments: grad_out shaped like the output, hidden as linear_forward made
// it, and gradients of mix_left / mix_right asked for only where the mixing has them.
void check_backward_args(const LinearDims& dims, const at::Tensor& x, const at::Tensor& grad_out,
                         const at::Tensor& hidden, bool wants_outer_grads);

// Dtypes the CPU kernels implement; raises TypeError otherwise.
void check_cpu_dtype(const at::Tensor& x);

// Dtypes the CUDA kernels implement; raises TypeError otherwise.
void check_cuda_dtype(const at::Tensor& x);

}  // namespace nanomoe
