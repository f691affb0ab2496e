// The GEMM-shaped pieces of the CPU kernels, in one place: ATen's BLAS (MKL / oneDNN) on strided
// views, writing straight into views of larger tensors (no copy when the view has unit stride along
// its rows, which every caller arranges).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

namespace nanomoe::cpu {

// out = a @ b
inline void matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b);
}

}  // namespace nanomoe::cpu
