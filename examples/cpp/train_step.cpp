// One training step of a TorchScript model in C++, autograd running through nanomoe's operators
// in libtorch: loss = mean squared error to a target, gradients by backward(), then plain SGD.
//
//   train_step MODEL INPUT TARGET LEARNING_RATE OUTPUT
//
// OUTPUT receives a dict {parameter name: value after the step, "loss": loss before it}, in
// torch.save's format, for comparison with the same step taken in Python.
#include <torch/script.h>

#include <iostream>
#include <string>

#include "tensor_io.h"

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: train_step MODEL INPUT TARGET LEARNING_RATE OUTPUT\n";
    return 2;
  }
  try {
    torch::jit::Module module = torch::jit::load(argv[1]);
    module.train();
    const at::Tensor input = nanomoe_example::load_tensor(argv[2]);
    const at::Tensor target = nanomoe_example::load_tensor(argv[3]);
    const double learning_rate = std::stod(argv[4]);

    const at::Tensor output = module.forward({input}).toTensor();
    const at::Tensor loss = (output - target).square().mean();
    loss.backward();

    c10::Dict<std::string, at::Tensor> result;
    result.insert("loss", loss.detach());
    {
      const torch::NoGradGuard no_grad;
      for (const auto& parameter : module.named_parameters(/*recurse=*/true)) {
        parameter.value.sub_(parameter.value.grad() * learning_rate);
        result.insert(parameter.name, parameter.value.detach().clone());
      }
    }
    nanomoe_example::save_value(argv[5], result);
    std::cout << "loss " << loss.item<double>() << ", " << result.size() - 1
              << " parameters updated\n";
  } catch (const std::exception& error) {
    std::cerr << "train_step: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
