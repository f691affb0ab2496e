// The operator schemas, defined once, so they exist in any process that loads this library,
// with or without Python. Kernels register themselves per dispatch key in csrc/cpu/ and csrc/cuda/;
// autograd is registered in csrc/autograd.cpp.
#include <torch/library.h>

#include "cpu/features.h"

TORCH_LIBRARY(nanomoe, m) {
  // y = NanoMoE(x): see SPEC.md sections 2 and 3. The variant is read from the gate tensors.
  m.def(
      "linear(Tensor x, Tensor down, Tensor mix, Tensor up, Tensor? bias=None, "
      "Tensor? mix_left=None, Tensor? mix_right=None) -> Tensor");
  // The forward used for training: also returns `hidden`, the per-block down-projections
  // x_j @ down[j].T laid out (tokens, K_in, rank), which the backward needs.
  m.def(
      "linear_forward(Tensor x, Tensor down, Tensor mix, Tensor up, Tensor? bias=None, "
      "Tensor? mix_left=None, Tensor? mix_right=None) -> (Tensor out, Tensor hidden)");
  // Gradients for (x, down, mix, up, bias, mix_left, mix_right); an entry whose output_mask is
  // false comes back undefined (None in Python).
  m.def(
      "linear_backward(Tensor grad_out, Tensor x, Tensor down, Tensor mix, Tensor up, "
      "Tensor? mix_left, Tensor? mix_right, Tensor hidden, bool[7] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The CPU instruction sets the kernels use on this machine (no tensors, so one kernel for all).
  m.def("cpu_features() -> str[]", &nanomoe::cpu::features);
}
