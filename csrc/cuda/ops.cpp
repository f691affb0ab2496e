// Registers the CUDA kernels for the CUDA dispatch key: checks the arguments (checks.cpp, shared
// with the CPU), lays the tensors out as the kernels take them, and composes the kernels on the
// current stream. Only this file includes torch's CUDA headers, so it is built only where torch has
// CUDA; the kernels themselves (kernels.h) see raw pointers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>

#include "../checks.h"
#include "../operator_io.h"
#include "kernels.h"

namespace nanomoe::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;  // check_cuda_dtype admitted nothing else
  }
}

cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

// The parameters as the kernels read them: contiguous, plus the full gate as one dense
// (K_out rank, K_in rank) matrix whose block (i, j) is mix[i, j].
struct Weights {
  Tensor down, mix, up, left, right, dense_mix;
  Weights(const LinearDims& dims, const Tensor& down_in, const Tensor& mix_in, const Tensor& up_in,
          const OptTensor& left_in, const OptTensor& right_in)
      : down(down_in.contiguous()), mix(mix_in.contiguous()), up(up_in.contiguous()) {
    if (left_in) left = left_in->contiguous();
    if (right_in) right = right_in->contiguous();
    if (dims.mixing == Mixing::kFull) {
      const int64_t r = dims.rank;
      dense_mix = mix.permute({0, 2, 1, 3}).reshape({dims.out_blocks * r, dims.in_blocks * r});
    }
  }
};

const void* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

void run_gemm(DType dtype, int64_t m, int64_t n, int64_t k, int64_t batch, Operand a, Operand b,
              void* c, int64_t c_ld, int64_t c_batch_stride, const void* bias = nullptr,
              int64_t bias_batch_stride = 0) {
  GemmProblem p{
      dtype, m, n, k, batch, a, b, c, c_ld, c_batch_stride, 0, false, bias, bias_batch_stride, 1};
  gemm(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A weight gradient: sum over every token of A (m x tokens) B (tokens x n), per batch, split over
// the tokens into float32 partial products summed in a fixed order. Returns (batch, m, n) in dtype.
Tensor sum_over_tokens(DType dtype, const at::TensorOptions& options, int64_t m, int64_t n,
                       int64_t tokens, int64_t batch, Operand a, Operand b) {
  const int splits = gemm_splits(m, n, tokens, batch);
  const Tensor partial = at::empty({splits, batch, m, n}, options.dtype(at::kFloat));
  GemmProblem p{dtype,         m,    n,       tokens, batch, a, b, partial.data_ptr(), n, m * n,
                batch * m * n, true, nullptr, 0,      splits};
  gemm(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return (splits == 1 ? partial[0] : partial.sum(0)).to(options.dtype());
}

// gate(o, s, c) over (output block, input block, feature) of a (K_out, K_in[, rank]) tensor, read
// forward (o = i, s = j) or transposed (o = j, s = i).
GateView gate_view(const LinearDims& dims, const Tensor& t, bool transposed) {
  const bool per_feature = t.dim() == 3;
  const int64_t row = dims.in_blocks * (per_feature ? dims.rank : 1);  // stride of i
  const int64_t col = per_feature ? dims.rank : 1;                     // stride of j
  return transposed ? GateView{t.data_ptr(), col, row, per_feature ? 1 : 0}
                    : GateView{t.data_ptr(), row, col, per_feature ? 1 : 0};
}

// out = G in (forward: (tokens, K_in, rank) -> (tokens, K_out, rank)) or G^T in (transposed),
// for any variant. For diagonal_outer, G^T swaps the roles of mix_left and mix_right.
void apply_gate(const LinearDims& dims, const Weights& w, const Tensor& in, const Tensor& out,
                bool transposed) {
  const DType dtype = dtype_of(in);
  const int64_t r = dims.rank, k_out = dims.out_blocks, k_in = dims.in_blocks;
  const int64_t ins = transposed ? k_out : k_in, outs = transposed ? k_in : k_out;
  if (dims.mixing == Mixing::kFull) {
    // forward: mixed = hidden @ dense.T; transposed: grad_hidden = grad_mixed @ dense.
    const Operand dense{w.dense_mix.data_ptr(), k_in * r, 0, !transposed};
    run_gemm(dtype, dims.tokens, outs * r, ins * r, 1, Operand{in.data_ptr(), ins * r, 0, true},
             dense, out.data_ptr(), outs * r, 0);
    return;
  }
  MixProblem p{
      dtype,         dims.tokens, outs,           ins,      r,
      in.data_ptr(), ins * r,     out.data_ptr(), outs * r, gate_view(dims, w.mix, transposed),
      GateView{},    GateView{}};
  if (dims.mixing == Mixing::kDiagonalOuter) {
    p.left = gate_view(dims, transposed ? w.right : w.left, transposed);
    p.right = gate_view(dims, transposed ? w.left : w.right, transposed);
  }
  mix(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward as separate steps through device memory, for layers whose tile intermediates do not
// fit in shared memory.
void forward_unfused(const LinearDims& dims, const Weights& w, const Tensor& x_rows,
                     const OptTensor& bias, const Tensor& out_rows, const Tensor& hidden) {
  const DType dtype = dtype_of(x_rows);
  const int64_t r = dims.rank, n_b = dims.in_block, m_b = dims.out_block;
  const int64_t k_in = dims.in_blocks, k_out = dims.out_blocks;
  run_gemm(dtype, dims.tokens, r, n_b, k_in,
           Operand{x_rows.data_ptr(), x_rows.stride(0), n_b, true},
           Operand{w.down.data_ptr(), n_b, r * n_b, true}, hidden.data_ptr(), k_in * r, r);
  const Tensor mixed = at::empty({dims.tokens, k_out, r}, x_rows.options());
  apply_gate(dims, w, hidden, mixed, /*transposed=*/false);
  run_gemm(dtype, dims.tokens, m_b, r, k_out, Operand{mixed.data_ptr(), k_out * r, r, true},
           Operand{w.up.data_ptr(), r, m_b * r, true}, out_rows.data_ptr(), out_rows.stride(0), m_b,
           bias ? bias->data_ptr() : nullptr, m_b);
}

std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& down_in, const Tensor& mix_in,
                                   const Tensor& up_in, const OptTensor& bias_in,
                                   const OptTensor& left_in, const OptTensor& right_in,
                                   bool keep_hidden) {
  const LinearDims dims = check_linear_args(x, down_in, mix_in, up_in, bias_in, left_in, right_in);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor out = at::empty(output_shape(x, dims.out_features), x.options());
  Tensor hidden =
      keep_hidden ? at::empty({dims.tokens, dims.in_blocks, dims.rank}, x.options()) : Tensor();
  if (dims.tokens == 0) return {out, hidden};

  const Weights w(dims, down_in, mix_in, up_in, left_in, right_in);
  const OptTensor bias = bias_in ? OptTensor(bias_in->contiguous()) : std::nullopt;
  const Tensor x_rows = rows_of(x, dims.in_features);
  const Tensor out_rows = out.view({dims.tokens, dims.out_features});
  const Tensor& gate = dims.mixing == Mixing::kFull ? w.dense_mix : w.mix;
  const FusedForwardProblem p{dtype_of(x),
                              static_cast<int>(dims.mixing),
                              dims.tokens,
                              dims.in_blocks,
                              dims.out_blocks,
                              dims.rank,
                              dims.in_block,
                              dims.out_block,
                              x_rows.data_ptr(),
                              x_rows.stride(0),
                              w.down.data_ptr(),
                              gate.data_ptr(),
                              data_or_null(w.left),
                              data_or_null(w.right),
                              w.up.data_ptr(),
                              bias ? bias->data_ptr() : nullptr,
                              out_rows.data_ptr(),
                              dims.out_features,
                              keep_hidden ? hidden.data_ptr() : nullptr};
  if (!fused_forward(p, current_stream())) {
    if (!keep_hidden) hidden = at::empty({dims.tokens, dims.in_blocks, dims.rank}, x.options());
    forward_unfused(dims, w, x_rows, bias, out_rows, hidden);
    if (!keep_hidden) hidden = Tensor();
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, hidden};
}

Tensor linear_cuda(const Tensor& x, const Tensor& down, const Tensor& mix, const Tensor& up,
                   const OptTensor& bias, const OptTensor& mix_left, const OptTensor& mix_right) {
  return std::get<0>(forward(x, down, mix, up, bias, mix_left, mix_right, false));
}

std::tuple<Tensor, Tensor> linear_forward_cuda(const Tensor& x, const Tensor& down,
                                               const Tensor& mix, const Tensor& up,
                                               const OptTensor& bias, const OptTensor& mix_left,
                                               const OptTensor& mix_right) {
  return forward(x, down, mix, up, bias, mix_left, mix_right, true);
}

// Gradients of mix (and mix_left, mix_right) for the elementwise gates, from the kernel's
// per-chunk float32 partial sums.
void gate_grads(const LinearDims& dims, const Weights& w, const Tensor& grad_mixed,
                const Tensor& hidden, Tensor& grad_mix, Tensor& grad_left, Tensor& grad_right) {
  const bool outer = dims.mixing == Mixing::kDiagonalOuter;
  const int64_t chunk_tokens = std::max<int64_t>(256, (dims.tokens + 1023) / 1024);
  const int64_t chunks = (dims.tokens + chunk_tokens - 1) / chunk_tokens;
  const auto floats = hidden.options().dtype(at::kFloat);
  const std::vector<int64_t> shape{chunks, dims.out_blocks, dims.in_blocks, dims.rank};
  const Tensor partial_gate = at::empty(shape, floats);
  const Tensor partial_left = outer ? at::empty(shape, floats) : Tensor();
  const Tensor partial_right = outer ? at::empty(shape, floats) : Tensor();
  const GateGradProblem p{dtype_of(hidden),
                          dims.tokens,
                          dims.out_blocks,
                          dims.in_blocks,
                          dims.rank,
                          chunk_tokens,
                          grad_mixed.data_ptr(),
                          hidden.data_ptr(),
                          outer ? w.left.data_ptr() : nullptr,
                          outer ? w.right.data_ptr() : nullptr,
                          partial_gate.data_ptr<float>(),
                          outer ? partial_left.data_ptr<float>() : nullptr,
                          outer ? partial_right.data_ptr<float>() : nullptr};
  gate_grad(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto dtype = hidden.scalar_type();
  if (dims.mixing == Mixing::kScalar) {
    grad_mix = partial_gate.sum(at::IntArrayRef{0, 3}).to(dtype);
  } else {
    grad_mix = partial_gate.sum(0).to(dtype);
  }
  if (outer) {
    grad_left = partial_left.sum(0).to(dtype);
    grad_right = partial_right.sum(0).to(dtype);
  }
}

Grads linear_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& down_in,
                           const Tensor& mix_in, const Tensor& up_in, const OptTensor& left_in,
                           const OptTensor& right_in, const Tensor& hidden_in,
                           std::array<bool, kNumInputs> needs) {
  const LinearDims dims =
      check_linear_args(x, down_in, mix_in, up_in, std::nullopt, left_in, right_in);
  check_backward_args(dims, x, grad_out, hidden_in, needs[kMixLeft] || needs[kMixRight]);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = dims.tokens, r = dims.rank, n_b = dims.in_block, m_b = dims.out_block;
  const int64_t k_in = dims.in_blocks, k_out = dims.out_blocks;
  const auto opts = x.options();
  const DType dtype = dtype_of(x);
  Tensor grad_x, grad_down, grad_mix, grad_up, grad_bias, grad_left, grad_right;
  if (needs[kBias]) {
    grad_bias =
        grad_out.reshape({tokens, dims.out_features}).sum(0, false, at::kFloat).to(x.scalar_type());
  }
  if (tokens == 0) {
    if (needs[kX]) grad_x = at::empty(x.sizes(), opts);
    if (needs[kDown]) grad_down = at::zeros(down_in.sizes(), opts);
    if (needs[kMix]) grad_mix = at::zeros(mix_in.sizes(), opts);
    if (needs[kUp]) grad_up = at::zeros(up_in.sizes(), opts);
    if (needs[kMixLeft]) grad_left = at::zeros(left_in->sizes(), opts);
    if (needs[kMixRight]) grad_right = at::zeros(right_in->sizes(), opts);
    return {grad_x, grad_down, grad_mix, grad_up, grad_bias, grad_left, grad_right};
  }

  const Weights w(dims, down_in, mix_in, up_in, left_in, right_in);
  const Tensor hidden = hidden_in.contiguous();
  const Tensor x_rows = rows_of(x, dims.in_features);
  const Tensor grad_rows = rows_of(grad_out, dims.out_features);
  const int64_t grad_row = grad_rows.stride(0);
  const bool need_gate = needs[kMix] || needs[kMixLeft] || needs[kMixRight];
  const bool need_grad_hidden = needs[kX] || needs[kDown];

  // grad_mixed[t, i, :] = grad_out[t, block i] @ up[i]
  Tensor grad_mixed;
  if (need_grad_hidden || need_gate) {
    grad_mixed = at::empty({tokens, k_out, r}, opts);
    run_gemm(dtype, tokens, r, m_b, k_out, Operand{grad_rows.data_ptr(), grad_row, m_b, true},
             Operand{w.up.data_ptr(), r, m_b * r, false}, grad_mixed.data_ptr(), k_out * r, r);
  }
  // grad_up[i] = grad_out[:, block i].T @ mixed[:, i, :], mixed recomputed from hidden.
  if (needs[kUp]) {
    const Tensor mixed = at::empty({tokens, k_out, r}, opts);
    apply_gate(dims, w, hidden, mixed, /*transposed=*/false);
    grad_up = sum_over_tokens(dtype, opts, m_b, r, tokens, k_out,
                              Operand{grad_rows.data_ptr(), grad_row, m_b, false},
                              Operand{mixed.data_ptr(), k_out * r, r, false})
                  .view(up_in.sizes());
  }
  if (need_gate) {
    if (dims.mixing == Mixing::kFull) {
      // grad of the dense gate = grad_mixed.T @ hidden, then back to (K_out, K_in, rank, rank).
      grad_mix = sum_over_tokens(dtype, opts, k_out * r, k_in * r, tokens, 1,
                                 Operand{grad_mixed.data_ptr(), k_out * r, 0, false},
                                 Operand{hidden.data_ptr(), k_in * r, 0, false})
                     .view({k_out, r, k_in, r})
                     .permute({0, 2, 1, 3})
                     .contiguous();
    } else {
      gate_grads(dims, w, grad_mixed, hidden, grad_mix, grad_left, grad_right);
    }
    if (!needs[kMix]) grad_mix = Tensor();
    if (!needs[kMixLeft]) grad_left = Tensor();
    if (!needs[kMixRight]) grad_right = Tensor();
  }
  if (need_grad_hidden) {
    const Tensor grad_hidden = at::empty({tokens, k_in, r}, opts);
    apply_gate(dims, w, grad_mixed, grad_hidden, /*transposed=*/true);
    // grad_down[j] = grad_hidden[:, j, :].T @ x[:, block j]
    if (needs[kDown]) {
      grad_down = sum_over_tokens(dtype, opts, r, n_b, tokens, k_in,
                                  Operand{grad_hidden.data_ptr(), k_in * r, r, false},
                                  Operand{x_rows.data_ptr(), x_rows.stride(0), n_b, false})
                      .view(down_in.sizes());
    }
    // grad_x[:, block j] = grad_hidden[:, j, :] @ down[j]
    if (needs[kX]) {
      grad_x = at::empty(x.sizes(), opts);
      run_gemm(dtype, tokens, n_b, r, k_in, Operand{grad_hidden.data_ptr(), k_in * r, r, true},
               Operand{w.down.data_ptr(), n_b, r * n_b, false}, grad_x.data_ptr(), dims.in_features,
               n_b);
    }
  }
  return {grad_x, grad_down, grad_mix, grad_up, grad_bias, grad_left, grad_right};
}

}  // namespace

TORCH_LIBRARY_IMPL(nanomoe, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("linear_forward", &linear_forward_cuda);
  m.impl("linear_backward", &linear_backward_cuda);
}

}  // namespace nanomoe::cuda
