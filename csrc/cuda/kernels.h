// The CUDA kernels' interface: plain C++ (raw pointers, sizes in elements, cudaStream_t), so the
// .cu files need no torch headers and compile with nvcc alone; ops.cpp fills these structs from
// tensors. Every launcher enqueues on `stream` and returns without synchronizing; the caller checks
// cudaGetLastError.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nanomoe::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// One operand of a batched product, element (row, k) of A or (k, col) of B:
//   k_major: data[batch * batch_stride + index_other * ld + k]
//   else:    data[batch * batch_stride + k * ld + index_other]
struct Operand {
  const void* data;
  int64_t ld;
  int64_t batch_stride;
  bool k_major;
};

// C[b] (m x n, row-major) = A[b] (m x k) * B[b] (k x n) (+ bias[b] per column), accumulated in
// float32. With splits > 1 the reduction over k is cut into `splits` ranges whose float32 partial
// products go to c + split * c_split_stride (c_is_float must then be set); the caller sums them.
struct GemmProblem {
  DType dtype;
  int64_t m, n, k, batch;
  Operand a, b;
  void* c;
  int64_t c_ld, c_batch_stride, c_split_stride;
  bool c_is_float;   // C holds float32 instead of dtype
  const void* bias;  // dtype, or null
  int64_t bias_batch_stride;
  int splits;
};
void gemm(const GemmProblem& problem, cudaStream_t stream);

// How many k ranges make a product with a long reduction (a weight gradient, k = tokens) fill the
// device: enough CTAs for every multiprocessor, each range at least a few pipeline stages long.
int gemm_splits(int64_t m, int64_t n, int64_t k, int64_t batch);

// gate(o, s, c) = data[o * o_stride + s * s_stride + c * c_stride]: the mixing tensors read as
// (output block, input block, feature); transposing the gate is swapping the two strides.
struct GateView {
  const void* data;
  int64_t o_stride, s_stride, c_stride;
};

// out(t, o, :) = sum_s gate(o, s, :) * in(t, s, :) + left(o, s, :) * <right(o, s, :), in(t, s, :)>
// for the elementwise gates (scalar: c_stride 0; diagonal; diagonal_outer with left and right).
// in(t, s, c) = in[t * in_row + s * rank + c], out(t, o, c) = out[t * out_row + o * rank + c].
struct MixProblem {
  DType dtype;
  int64_t tokens, outs, ins, rank;
  const void* in;
  int64_t in_row;
  void* out;
  int64_t out_row;
  GateView gate;
  GateView left, right;  // data null unless diagonal_outer
};
void mix(const MixProblem& problem, cudaStream_t stream);

// Gradients of the elementwise gates, as float32 partial sums over chunks of chunk_tokens tokens,
// each [chunks][K_out][K_in][rank] (the caller sums over chunks; scalar sums over rank too):
//   grad_gate  += grad_mixed(t, i, c) * hidden(t, j, c)
//   grad_left  += grad_mixed(t, i, c) * <right(i, j, :), hidden(t, j, :)>   (diagonal_outer)
//   grad_right += <left(i, j, :), grad_mixed(t, i, :)> * hidden(t, j, c)   (diagonal_outer)
// grad_mixed(t, i, c) = grad_mixed[t * K_out * rank + i * rank + c]; hidden likewise with K_in;
// left and right are contiguous (K_out, K_in, rank).
struct GateGradProblem {
  DType dtype;
  int64_t tokens, out_blocks, in_blocks, rank, chunk_tokens;
  const void* grad_mixed;
  const void* hidden;
  const void* left;  // null unless diagonal_outer
  const void* right;
  float* grad_gate;
  float* grad_left;  // null unless diagonal_outer
  float* grad_right;
};
void gate_grad(const GateGradProblem& problem, cudaStream_t stream);

// The whole forward of a token tile in one kernel: per-block down-projections into shared memory,
// mixing, per-block up-projections (+ bias) to `out`; `hidden` (tokens, K_in, rank), when not
// null, receives the down-projections for the backward. For full mixing, `mix` is the dense
// (K_out rank, K_in rank) matrix; otherwise the gate tensors as the operator takes them
// (contiguous). x rows and out rows are contiguous with strides x_row, out_row.
struct FusedForwardProblem {
  DType dtype;
  int mixing;  // 0 scalar, 1 diagonal, 2 diagonal_outer, 3 full
  int64_t tokens, in_blocks, out_blocks, rank, in_block, out_block;
  const void* x;
  int64_t x_row;
  const void* down;
  const void* mix;
  const void* left;
  const void* right;
  const void* up;
  const void* bias;
  void* out;
  int64_t out_row;
  void* hidden;
};
// Returns false, launching nothing, when a tile's intermediates exceed the current device's shared
// memory; the caller then runs the unfused steps.
bool fused_forward(const FusedForwardProblem& problem, cudaStream_t stream);

}  // namespace nanomoe::cuda
