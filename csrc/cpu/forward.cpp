// CPU forward: for each token tile, the per-block down-projections, the mixing and the per-block
// up-projections run back to back, so the tile's intermediates never leave cache. float32 and
// bfloat16 on CPUs with AVX-512 run the project's own kernels (projected_forward.h); every other
// case sends the GEMM-shaped pieces to ATen's BLAS (MKL / oneDNN) on strided views.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "../operator_io.h"
#include "gate.h"
#include "matmul.h"
#include "operands.h"
#include "parallel.h"
#include "projected_forward.h"

namespace nanomoe::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Writes out (tokens, out_features) and, when hidden_all is given, keeps every tile's hidden in it.
template <typename scalar_t>
void forward_tiles(const LinearDims& dims, const Tensor& x_rows, const Tensor& down,
                   const Gate<scalar_t>& gate, const Tensor& up, const OptTensor& bias,
                   const Tensor& out, const Tensor* hidden_all) {
  const int64_t n_b = dims.in_block, m_b = dims.out_block, r = dims.rank;
  for_each_token_tile(dims.tokens, kBlasTiling, [&](int64_t begin, int64_t end) {
    const int64_t rows = end - begin;
    const Tensor hidden = hidden_all ? hidden_all->narrow(0, begin, rows)
                                     : at::empty({rows, dims.in_blocks, r}, x_rows.options());
    const Tensor mixed = at::empty({rows, dims.out_blocks, r}, x_rows.options());
    const Tensor x_tile = x_rows.narrow(0, begin, rows);
    for_each_block(dims.in_blocks, [&](int64_t j) {
      matmul_into(hidden.select(1, j), x_tile.narrow(1, j * n_b, n_b), down[j].t());
    });
    apply_gate(gate, hidden, mixed);
    const Tensor out_tile = out.narrow(0, begin, rows);
    for_each_block(dims.out_blocks, [&](int64_t i) {
      matmul_into(out_tile.narrow(1, i * m_b, m_b), mixed.select(1, i), up[i].t());
    });
    // One pass over the tile's contiguous rows: cheaper than GEMM-with-bias per block, which
    // first copies the bias into every block's strided columns.
    if (bias) out_tile.add_(*bias);
  });
}

// Shared by linear and linear_forward; returns (out, hidden), hidden undefined unless asked for.
std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& down_in, const Tensor& mix_in,
                                   const Tensor& up_in, const OptTensor& bias_in,
                                   const OptTensor& left_in, const OptTensor& right_in,
                                   bool keep_hidden) {
  const LinearDims dims = check_linear_args(x, down_in, mix_in, up_in, bias_in, left_in, right_in);
  check_cpu_dtype(x);
  const Weights w(down_in, mix_in, up_in, left_in, right_in);
  const OptTensor bias = bias_in ? OptTensor(bias_in->detach()) : std::nullopt;
  const Tensor x_rows = rows_of(x, dims.in_features);

  const Tensor out = at::empty(output_shape(x, dims.out_features), x.options());
  const Tensor hidden =
      keep_hidden ? at::empty({dims.tokens, dims.in_blocks, dims.rank}, x.options()) : Tensor();
  const Tensor out_rows = out.view({dims.tokens, dims.out_features});
  if (runs_projected(x.scalar_type())) {
    const Tensor bias_float = bias ? bias->to(at::kFloat).contiguous() : Tensor();
    projected_forward(dims, x_rows, w, bias_float, out_rows, hidden);
    return {out, hidden};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "nanomoe_linear_cpu", [&] {
    const auto gate = Gate<scalar_t>::make(dims, w, /*transposed=*/false, /*for_kernels=*/false);
    forward_tiles<scalar_t>(dims, x_rows, w.down, gate, w.up, bias, out_rows,
                            keep_hidden ? &hidden : nullptr);
  });
  return {out, hidden};
}

Tensor linear_cpu(const Tensor& x, const Tensor& down, const Tensor& mix, const Tensor& up,
                  const OptTensor& bias, const OptTensor& mix_left, const OptTensor& mix_right) {
  return std::get<0>(forward(x, down, mix, up, bias, mix_left, mix_right, false));
}

std::tuple<Tensor, Tensor> linear_forward_cpu(const Tensor& x, const Tensor& down,
                                              const Tensor& mix, const Tensor& up,
                                              const OptTensor& bias, const OptTensor& mix_left,
                                              const OptTensor& mix_right) {
  return forward(x, down, mix, up, bias, mix_left, mix_right, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanomoe, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_forward", &linear_forward_cpu);
}

}  // namespace nanomoe::cpu
