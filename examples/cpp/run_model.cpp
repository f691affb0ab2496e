// Runs a model exported by examples/export_model.py without Python: loads it, reads an input
// tensor from a file, runs the model, writes the output tensor to a file.
//
//   run_model MODEL INPUT OUTPUT [--cuda]
//
// MODEL is a TorchScript file (torch.jit.save, any name but .pt2) or an AOTInductor package (.pt2).
// INPUT and OUTPUT are single tensors in torch.save's format (torch::pickle_load / pickle_save).
// The model calls nanomoe::linear through the dispatcher; this program links nanomoe_ops, whose
// operators register themselves when the library loads.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <iostream>
#include <string>

#include "tensor_io.h"

namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

at::Tensor run(const std::string& model_path, const at::Tensor& input) {
  if (ends_with(model_path, ".pt2")) {
    torch::inductor::AOTIModelPackageLoader loader(model_path);
    return loader.run({input}).at(0);
  }
  torch::jit::Module module = torch::jit::load(model_path, input.device());
  module.eval();
  return module.forward({input}).toTensor();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: run_model MODEL INPUT OUTPUT [--cuda]\n";
    return 2;
  }
  try {
    const bool cuda = argc == 5 && std::string(argv[4]) == "--cuda";
    at::Tensor input = nanomoe_example::load_tensor(argv[2]);
    if (cuda) input = input.to(at::kCUDA);
    const torch::NoGradGuard no_grad;
    const at::Tensor output = run(argv[1], input).to(at::kCPU);
    nanomoe_example::save_value(argv[3], output);
    std::cout << "input " << input.sizes() << " -> output " << output.sizes() << "\n";
  } catch (const std::exception& error) {
    std::cerr << "run_model: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
