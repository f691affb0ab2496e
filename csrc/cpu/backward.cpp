// CPU backward. Per token tile (in parallel): grad_mixed = grad_out blocks @ up, the forward's
// mixed recomputed from the saved hidden (cheap next to saving it), grad_hidden = G^T grad_mixed,
// and grad_x = grad_hidden blocks @ down. Then the weight gradients, which reduce over every token:
// one GEMM per block (down, up, full mixing) or one pass per output block (the other gates).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "../checks.h"
#include "../operator_io.h"
#include "block_grads.h"
#include "gate.h"
#include "matmul.h"
#include "operands.h"
#include "parallel.h"
#include "projected_backward.h"
#include "projected_forward.h"
#include "projection.h"

namespace nanomoe::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Grads linear_backward_cpu(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& down_in,
                          const Tensor& mix_in, const Tensor& up_in, const OptTensor& left_in,
                          const OptTensor& right_in, const Tensor& hidden_in,
                          std::array<bool, kNumInputs> needs) {
  const LinearDims dims =
      check_linear_args(x_in, down_in, mix_in, up_in, std::nullopt, left_in, right_in);
  check_backward_args(dims, x_in, grad_out_in, hidden_in, needs[kMixLeft] || needs[kMixRight]);
  check_cpu_dtype(x_in);

  const Weights w(down_in, mix_in, up_in, left_in, right_in);
  if (runs_projected(x_in.scalar_type()) && backward_projected(dims)) {
    Grads grads = projected_backward(dims, rows_of(grad_out_in, dims.out_features),
                                     rows_of(x_in, dims.in_features), w,
                                     hidden_in.detach().contiguous(), needs);
    if (needs[kX]) std::get<kX>(grads) = std::get<kX>(grads).view(x_in.sizes());
    return grads;
  }
  const Tensor &down = w.down, &up = w.up;
  const Tensor hidden = hidden_in.detach().contiguous();
  const Tensor x_rows = rows_of(x_in, dims.in_features);
  const Tensor grad_rows = rows_of(grad_out_in, dims.out_features);

  const bool need_gate = needs[kMix] || needs[kMixLeft] || needs[kMixRight];
  const bool need_grad_hidden = needs[kX] || needs[kDown];
  const bool need_grad_mixed = need_grad_hidden || need_gate;
  const int64_t tokens = dims.tokens, r = dims.rank, n_b = dims.in_block, m_b = dims.out_block;
  const auto opts = x_in.options();
  Tensor grad_mixed = need_grad_mixed ? at::empty({tokens, dims.out_blocks, r}, opts) : Tensor();
  Tensor mixed = needs[kUp] ? at::empty({tokens, dims.out_blocks, r}, opts) : Tensor();
  Tensor grad_hidden = need_grad_hidden ? at::empty({tokens, dims.in_blocks, r}, opts) : Tensor();
  const Tensor grad_x = needs[kX] ? at::empty(x_in.sizes(), opts) : Tensor();
  const Tensor grad_x_rows = needs[kX] ? grad_x.view({tokens, dims.in_features}) : Tensor();
  Tensor grad_down, grad_mix, grad_up, grad_bias, grad_left, grad_right;

  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, x_in.scalar_type(), "nanomoe_linear_backward_cpu", [&] {
        // Optional, so that their float32 copies of the gate go before the weight gradients come.
        std::optional<Gate<scalar_t>> gate =
            Gate<scalar_t>::make(dims, w, /*transposed=*/false, /*for_kernels=*/false);
        std::optional<Gate<scalar_t>> gate_t;
        if (need_grad_hidden) {
          gate_t = Gate<scalar_t>::make(dims, w, /*transposed=*/true, /*for_kernels=*/false);
        }

        // The weight gradients are products `tokens` deep. With few tokens (one sequential tile),
        // each block's is too small to share among ATen's threads and its call costs more than its
        // arithmetic, so the blocks run as one batched product (16 tokens, 4096 features, K = 8,
        // r = 256: the backward 0.72x its time in bfloat16, 0.83x in float32, 0.91x in float64;
        // NOTES, version 85); deeper, each block's product takes every thread (float64 at 4096
        // tokens: batched, 1.14x). Not at one token, where ATen's batched product copies
        // grad_hidden first, above the reference's peak memory. There bfloat16's grad_mixed and
        // grad_x are batched too (oneDNN's batched product: a further 0.88x; float32's, on the
        // blocks in parallel, 1.09x).
        const bool batched = tokens > 1 && tokens <= kBlasTiling.sequential_tokens;
        const bool batched_tile = batched && x_in.scalar_type() == at::kBFloat16;
        // bfloat16's weight gradients of one sequential tile on AVX-512 where it runs: ATen's
        // batched product copies its operands and takes scratch (block_grads.h).
        const bool own_grads = x_in.scalar_type() == at::kBFloat16 && projection::runs_bfloat16() &&
                               tokens <= kBlasTiling.sequential_tokens;
        for_each_token_tile(tokens, kBlasTiling, [&](int64_t begin, int64_t end) {
          const int64_t rows = end - begin;
          const Tensor grad_tile = grad_rows.narrow(0, begin, rows);
          if (need_grad_mixed) {
            const Tensor grad_mixed_tile = grad_mixed.narrow(0, begin, rows);
            if (batched_tile) {
              Tensor by_block = grad_mixed_tile.transpose(0, 1);
              at::bmm_out(by_block, grad_tile.view({rows, dims.out_blocks, m_b}).transpose(0, 1),
                          up);
            } else {
              for_each_block(dims.out_blocks, [&](int64_t i) {
                matmul_into(grad_mixed_tile.select(1, i), grad_tile.narrow(1, i * m_b, m_b), up[i]);
              });
            }
          }
          if (needs[kUp]) {
            apply_gate(*gate, hidden.narrow(0, begin, rows), mixed.narrow(0, begin, rows));
          }
          if (need_grad_hidden) {
            apply_gate(*gate_t, grad_mixed.narrow(0, begin, rows),
                       grad_hidden.narrow(0, begin, rows));
          }
          if (needs[kX]) {
            const Tensor grad_hidden_tile = grad_hidden.narrow(0, begin, rows);
            const Tensor grad_x_tile = grad_x_rows.narrow(0, begin, rows);
            if (batched_tile) {
              Tensor by_block = grad_x_tile.view({rows, dims.in_blocks, n_b}).transpose(0, 1);
              at::bmm_out(by_block, grad_hidden_tile.transpose(0, 1), down);
            } else {
              for_each_block(dims.in_blocks, [&](int64_t j) {
                matmul_into(grad_x_tile.narrow(1, j * n_b, n_b), grad_hidden_tile.select(1, j),
                            down[j]);
              });
            }
          }
        });

        // The weight gradients, the gate's first (its float32 scratch is freed before the
        // projections' gradients exist), each intermediate let go after its last use: at the peak,
        // the projections' gradients live beside as little as they need.
        if (need_gate) {
          grad_mix = needs[kMix] ? at::empty_like(w.mix) : Tensor();
          grad_left = needs[kMixLeft] ? at::empty_like(w.mix_left) : Tensor();
          grad_right = needs[kMixRight] ? at::empty_like(w.mix_right) : Tensor();
          gate_backward(*gate, hidden, grad_mixed, grad_mix, grad_left, grad_right);
        }
        gate.reset();
        gate_t.reset();
        grad_mixed.reset();
        if (needs[kDown]) {
          grad_down = at::empty_like(down);
          if (own_grads) {
            for_each_block(dims.in_blocks, [&](int64_t j) {
              block_grads::block_outer_sums(j, tokens, elements<c10::BFloat16>(grad_hidden),
                                            dims.in_blocks * r, r, elements<c10::BFloat16>(x_rows),
                                            x_rows.stride(0), n_b,
                                            mutable_elements<c10::BFloat16>(grad_down));
            });
          } else if (batched) {
            at::bmm_out(grad_down, grad_hidden.permute({1, 2, 0}),
                        x_rows.view({tokens, dims.in_blocks, n_b}).transpose(0, 1));
          } else {
            for (int64_t j = 0; j < dims.in_blocks; ++j) {
              matmul_into(grad_down[j], grad_hidden.select(1, j).t(),
                          x_rows.narrow(1, j * n_b, n_b));
            }
          }
        }
        grad_hidden.reset();
        if (needs[kUp]) {
          grad_up = at::empty_like(up);
          if (own_grads) {
            for_each_block(dims.out_blocks, [&](int64_t i) {
              block_grads::block_outer_sums(i, tokens, elements<c10::BFloat16>(grad_rows),
                                            grad_rows.stride(0), m_b,
                                            elements<c10::BFloat16>(mixed), dims.out_blocks * r, r,
                                            mutable_elements<c10::BFloat16>(grad_up));
            });
          } else if (batched) {
            at::bmm_out(grad_up, grad_rows.view({tokens, dims.out_blocks, m_b}).permute({1, 2, 0}),
                        mixed.transpose(0, 1));
          } else {
            for (int64_t i = 0; i < dims.out_blocks; ++i) {
              matmul_into(grad_up[i], grad_rows.narrow(1, i * m_b, m_b).t(), mixed.select(1, i));
            }
          }
        }
        mixed.reset();
      });
  if (needs[kBias]) grad_bias = grad_rows.sum(0);
  return {grad_x, grad_down, grad_mix, grad_up, grad_bias, grad_left, grad_right};
}

}  // namespace

TORCH_LIBRARY_IMPL(nanomoe, CPU, m) {
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace nanomoe::cpu
