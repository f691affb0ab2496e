// The mixing step on the CPU: dst_d = sum_s G_ds src_s for every token, where src and dst are
// (tokens, blocks, rank) activations. The forward mixes hidden into mixed (d = output block i,
// s = input block j); the backward applies the transposed gate, G_ij^T, to push grad_mixed back
// to grad_hidden (d = j, s = i). Storage is scalar_t; every sum is taken in acc_t.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

#include <vector>

#include "../checks.h"
#include "matmul.h"
#include "operands.h"
#include "parallel.h"

namespace nanomoe::cpu {

// Full mixing as one dense (K_out * r, K_in * r) matrix acting on a token's concatenated blocks:
// row (i, a), column (j, b) holds mix[i, j, a, b].
inline at::Tensor full_mix_matrix(const at::Tensor& mix) {
  const int64_t k_out = mix.size(0), k_in = mix.size(1), r = mix.size(2);
  return mix.permute({0, 2, 1, 3}).reshape({k_out * r, k_in * r});
}

// The gate seen from one direction. For diagonal_outer, G_ds = diag(mix_ds) + left_ds right_ds^T;
// transposing swaps the roles of mix_left and mix_right.
template <typename scalar_t>
struct Gate {
  Mixing mixing;
  int64_t rank;
  int64_t dst_blocks, src_blocks;
  const scalar_t* mix;             // scalar, diagonal and diagonal_outer: contiguous mix
  const scalar_t* left;            // diagonal_outer only
  const scalar_t* right;           // diagonal_outer only
  int64_t dst_stride, src_stride;  // elements between consecutive dst / src blocks in mix
  at::Tensor matrix;               // full only: (K_dst * r, K_src * r)

  static Gate make(const LinearDims& dims, const Weights& w, bool transposed) {
    const at::Tensor &mix = w.mix, &mix_left = w.mix_left, &mix_right = w.mix_right;
    Gate g{};
    g.mixing = dims.mixing;
    g.rank = dims.rank;
    g.dst_blocks = transposed ? dims.in_blocks : dims.out_blocks;
    g.src_blocks = transposed ? dims.out_blocks : dims.in_blocks;
    g.mix = mix.data_ptr<scalar_t>();
    g.dst_stride = transposed ? mix.stride(1) : mix.stride(0);
    g.src_stride = transposed ? mix.stride(0) : mix.stride(1);
    if (dims.mixing == Mixing::kDiagonalOuter) {
      g.left = (transposed ? mix_right : mix_left).data_ptr<scalar_t>();
      g.right = (transposed ? mix_left : mix_right).data_ptr<scalar_t>();
    }
    if (dims.mixing == Mixing::kFull) {
      const at::Tensor forward = full_mix_matrix(mix);
      g.matrix = transposed ? forward.t() : forward;
    }
    return g;
  }
};

// dst = G src for a tile. src: (tokens, src_blocks, r), dst: (tokens, dst_blocks, r), both
// contiguous.
template <typename scalar_t>
void apply_gate(const Gate<scalar_t>& g, const at::Tensor& src, const at::Tensor& dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = src.size(0), r = g.rank;
  if (g.mixing == Mixing::kFull) {
    matmul_into(dst.view({tokens, g.dst_blocks * r}), src.view({tokens, g.src_blocks * r}),
                g.matrix.t());
    return;
  }
  const scalar_t* src_data = src.const_data_ptr<scalar_t>();
  scalar_t* dst_data = dst.mutable_data_ptr<scalar_t>();
  const int64_t src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  for_each_block(g.dst_blocks, [&](int64_t d) {
    std::vector<acc_t> acc(r);
    for (int64_t t = 0; t < tokens; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t s = 0; s < g.src_blocks; ++s) {
        const scalar_t* x = src_data + t * src_row + s * r;
        const int64_t pair = d * g.dst_stride + s * g.src_stride;
        if (g.mixing == Mixing::kScalar) {
          const acc_t w = g.mix[pair];
          for (int64_t c = 0; c < r; ++c) acc[c] += w * acc_t(x[c]);
          continue;
        }
        const scalar_t* w = g.mix + pair;
        for (int64_t c = 0; c < r; ++c) acc[c] += acc_t(w[c]) * acc_t(x[c]);
        if (g.mixing == Mixing::kDiagonalOuter) {
          const scalar_t* left = g.left + pair;
          const scalar_t* right = g.right + pair;
          acc_t dot = 0;
          for (int64_t c = 0; c < r; ++c) dot += acc_t(right[c]) * acc_t(x[c]);
          for (int64_t c = 0; c < r; ++c) acc[c] += acc_t(left[c]) * dot;
        }
      }
      scalar_t* y = dst_data + t * dst_row + d * r;
      for (int64_t c = 0; c < r; ++c) y[c] = scalar_t(acc[c]);
    }
  });
}

// Gradients of the forward gate's tensors, summed over every token, given the forward's input
// hidden (tokens, K_in, r) and grad_mixed (tokens, K_out, r). Fills those of grad_mix, grad_left,
// grad_right that are defined (contiguous, shaped like mix).
template <typename scalar_t>
void gate_backward(const Gate<scalar_t>& g, const at::Tensor& hidden, const at::Tensor& grad_mixed,
                   const at::Tensor& grad_mix, const at::Tensor& grad_left,
                   const at::Tensor& grad_right) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = hidden.size(0), r = g.rank;
  if (g.mixing == Mixing::kFull) {
    const int64_t k_out = g.dst_blocks, k_in = g.src_blocks;
    const at::Tensor matrix =
        at::mm(grad_mixed.view({tokens, k_out * r}).t(), hidden.view({tokens, k_in * r}));
    grad_mix.copy_(matrix.view({k_out, r, k_in, r}).permute({0, 2, 1, 3}));
    return;
  }
  const scalar_t* src = hidden.const_data_ptr<scalar_t>();
  const scalar_t* grad_dst = grad_mixed.const_data_ptr<scalar_t>();
  const int64_t src_row = g.src_blocks * r, dst_row = g.dst_blocks * r;
  const int64_t per_pair = g.mixing == Mixing::kScalar ? 1 : r;
  const bool outer = g.mixing == Mixing::kDiagonalOuter;
  for_each_block(g.dst_blocks, [&](int64_t d) {
    std::vector<acc_t> acc_mix(g.src_blocks * per_pair, 0);
    std::vector<acc_t> acc_left(outer ? g.src_blocks * r : 0, 0);
    std::vector<acc_t> acc_right(outer ? g.src_blocks * r : 0, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      const scalar_t* gy = grad_dst + t * dst_row + d * r;
      for (int64_t s = 0; s < g.src_blocks; ++s) {
        const scalar_t* x = src + t * src_row + s * r;
        if (g.mixing == Mixing::kScalar) {
          acc_t dot = 0;
          for (int64_t c = 0; c < r; ++c) dot += acc_t(gy[c]) * acc_t(x[c]);
          acc_mix[s] += dot;
          continue;
        }
        acc_t* am = acc_mix.data() + s * r;
        for (int64_t c = 0; c < r; ++c) am[c] += acc_t(gy[c]) * acc_t(x[c]);
        if (outer) {
          const int64_t pair = d * g.dst_stride + s * g.src_stride;
          acc_t right_x = 0, left_gy = 0;
          for (int64_t c = 0; c < r; ++c) {
            right_x += acc_t(g.right[pair + c]) * acc_t(x[c]);
            left_gy += acc_t(g.left[pair + c]) * acc_t(gy[c]);
          }
          acc_t* al = acc_left.data() + s * r;
          acc_t* ar = acc_right.data() + s * r;
          for (int64_t c = 0; c < r; ++c) {
            al[c] += right_x * acc_t(gy[c]);
            ar[c] += left_gy * acc_t(x[c]);
          }
        }
      }
    }
    // grad tensors are contiguous and shaped like mix, so pair offsets carry over.
    for (int64_t s = 0; s < g.src_blocks; ++s) {
      const int64_t pair = d * g.dst_stride + s * g.src_stride;
      for (int64_t c = 0; c < per_pair; ++c) {
        if (grad_mix.defined()) {
          grad_mix.mutable_data_ptr<scalar_t>()[pair + c] = scalar_t(acc_mix[s * per_pair + c]);
        }
        if (grad_left.defined()) {
          grad_left.mutable_data_ptr<scalar_t>()[pair + c] = scalar_t(acc_left[s * r + c]);
        }
        if (grad_right.defined()) {
          grad_right.mutable_data_ptr<scalar_t>()[pair + c] = scalar_t(acc_right[s * r + c]);
        }
      }
    }
  });
}

}  // namespace nanomoe::cpu
