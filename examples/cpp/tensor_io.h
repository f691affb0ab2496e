// Tensors and dicts in torch.save's format, so Python writes what these programs read and reads
// what they write (torch.save / torch.load on the Python side).
#pragma once

#include <torch/serialize.h>

#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace nanomoe_example {

inline c10::IValue load_value(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  const std::vector<char> bytes{std::istreambuf_iterator<char>(in),
                                std::istreambuf_iterator<char>()};
  return torch::pickle_load(bytes);
}

inline at::Tensor load_tensor(const std::string& path) {
  return load_value(path).toTensor();
}

inline void save_value(const std::string& path, const c10::IValue& value) {
  const std::vector<char> bytes = torch::pickle_save(value);
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace nanomoe_example
