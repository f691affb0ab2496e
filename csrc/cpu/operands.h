// Operands as the CPU kernels consume them: detached from autograd (worker threads do not inherit
// the caller's dispatch state) and laid out for strided GEMMs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <optional>

namespace nanomoe::cpu {

// The weights, contiguous. They are small next to the activations, so one copy per call at most.
struct Weights {
  at::Tensor down, mix, up;
  at::Tensor mix_left, mix_right;  // undefined unless diagonal_outer

  Weights(const at::Tensor& down_in, const at::Tensor& mix_in, const at::Tensor& up_in,
          const std::optional<at::Tensor>& left_in, const std::optional<at::Tensor>& right_in)
      : down(down_in.detach().contiguous()),
        mix(mix_in.detach().contiguous()),
        up(up_in.detach().contiguous()),
        mix_left(left_in ? left_in->detach().contiguous() : at::Tensor()),
        mix_right(right_in ? right_in->detach().contiguous() : at::Tensor()) {}
};

// The kernels' element type: bfloat16 as its bits.
template <typename scalar_t>
struct Element {
  using type = scalar_t;
};
template <>
struct Element<c10::BFloat16> {
  using type = uint16_t;
};

// A contiguous tensor's elements as the kernels read and write them.
template <typename scalar_t>
const typename Element<scalar_t>::type* elements(const at::Tensor& t) {
  return reinterpret_cast<const typename Element<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
typename Element<scalar_t>::type* mutable_elements(const at::Tensor& t) {
  return reinterpret_cast<typename Element<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

}  // namespace nanomoe::cpu
