// Which of the CPU kernels' instruction sets this machine runs, for users and tests to see which
// kernel a call takes (torch.ops.nanomoe.cpu_features()).
#pragma once

#include <string>
#include <vector>

namespace nanomoe::cpu {

// Of "avx512" (the float32 kernels), "avx512_bf16" (the bfloat16 kernels) and "amx_bf16" (their
// products on AMX tiles), those in use here; empty where every call goes to ATen's BLAS.
std::vector<std::string> features();

}  // namespace nanomoe::cpu
