// What every implementation of the operators shares besides validation (checks.h): the order of
// linear_backward's gradients, the output's shape, and inputs read as rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace nanomoe {

// linear_backward's inputs with gradients, in the order of its output_mask and of its outputs.
enum Input { kX, kDown, kMix, kUp, kBias, kMixLeft, kMixRight, kNumInputs };
using Grads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// x's shape with the last dimension replaced by out_features.
inline std::vector<int64_t> output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

// t as (tokens, features) rows, each row contiguous (a copy only when t's rows are not).
inline at::Tensor rows_of(const at::Tensor& t, int64_t features) {
  at::Tensor rows = t.detach().reshape({-1, features});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

}  // namespace nanomoe
