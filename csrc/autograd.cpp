// Autograd for nanomoe::linear, registered in C++ so gradients work from Python, TorchScript and
// libtorch alike. The forward runs nanomoe::linear_forward (which keeps `hidden` for the backward)
// only when a gradient is needed; otherwise plain nanomoe::linear, which keeps nothing.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>

#include "checks.h"
#include "operator_io.h"

namespace nanomoe {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor linear_op(const Tensor& x, const Tensor& down, const Tensor& mix, const Tensor& up,
                 const OptTensor& bias, const OptTensor& mix_left, const OptTensor& mix_right) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nanomoe::linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op.call(x, down, mix, up, bias, mix_left, mix_right);
}

std::tuple<Tensor, Tensor> linear_forward_op(const Tensor& x, const Tensor& down, const Tensor& mix,
                                             const Tensor& up, const OptTensor& bias,
                                             const OptTensor& mix_left,
                                             const OptTensor& mix_right) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nanomoe::linear_forward", "")
                       .typed<std::tuple<Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op.call(x, down, mix, up, bias, mix_left, mix_right);
}

Grads linear_backward_op(const Tensor& grad_out, const Tensor& x, const Tensor& down,
                         const Tensor& mix, const Tensor& up, const OptTensor& mix_left,
                         const OptTensor& mix_right, const Tensor& hidden,
                         std::array<bool, kNumInputs> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nanomoe::linear_backward", "")
                       .typed<Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, const OptTensor&, const OptTensor&,
                                    const Tensor&, std::array<bool, kNumInputs>)>();
  return op.call(grad_out, x, down, mix, up, mix_left, mix_right, hidden, output_mask);
}

OptTensor optional_of(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& down,
                        const Tensor& mix, const Tensor& up, const OptTensor& bias,
                        const OptTensor& mix_left, const OptTensor& mix_right) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hidden] = linear_forward_op(x, down, mix, up, bias, mix_left, mix_right);
    ctx->save_for_backward(
        {x, down, mix, up, mix_left.value_or(Tensor()), mix_right.value_or(Tensor()), hidden});
    ctx->saved_data["has_bias"] = bias.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &down = saved[1], &mix = saved[2], &up = saved[3];
    const OptTensor mix_left = optional_of(saved[4]), mix_right = optional_of(saved[5]);
    const Tensor& hidden = saved[6];
    // needs_input_grad counts only the tensors that were passed, so absent optionals are skipped.
    const std::array<bool, kNumInputs> present{true,
                                               true,
                                               true,
                                               true,
                                               ctx->saved_data["has_bias"].toBool(),
                                               mix_left.has_value(),
                                               mix_right.has_value()};
    std::array<bool, kNumInputs> mask{};
    size_t edge = 0;
    for (size_t i = 0; i < kNumInputs; ++i) {
      if (present[i]) mask[i] = ctx->needs_input_grad(edge++);
    }
    auto [grad_x, grad_down, grad_mix, grad_up, grad_bias, grad_left, grad_right] =
        linear_backward_op(grad_outputs[0], x, down, mix, up, mix_left, mix_right, hidden, mask);
    return {grad_x, grad_down, grad_mix, grad_up, grad_bias, grad_left, grad_right};
  }
};

bool any_requires_grad(std::initializer_list<OptTensor> tensors) {
  for (const auto& t : tensors) {
    if (t && t->requires_grad()) return true;
  }
  return false;
}

Tensor linear_autograd(const Tensor& x, const Tensor& down, const Tensor& mix, const Tensor& up,
                       const OptTensor& bias, const OptTensor& mix_left,
                       const OptTensor& mix_right) {
  // Shapes are checked by the kernel, first thing; here sizes may be symbolic (torch.compile).
  check_placement(x, down, mix, up, bias, mix_left, mix_right);
  if (!at::GradMode::is_enabled() ||
      !any_requires_grad({x, down, mix, up, bias, mix_left, mix_right})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_op(x, down, mix, up, bias, mix_left, mix_right);
  }
  return LinearFunction::apply(x, down, mix, up, bias, mix_left, mix_right);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanomoe, Autograd, m) {
  m.impl("linear", &linear_autograd);
}

}  // namespace nanomoe
