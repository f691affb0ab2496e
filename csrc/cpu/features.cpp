#include "features.h"

#include "amx.h"
#include "projection.h"

namespace nanomoe::cpu {

std::vector<std::string> features() {
  std::vector<std::string> found;
  if (projection::runs_float()) found.push_back("avx512");
  if (projection::runs_bfloat16()) found.push_back("avx512_bf16");
  if (projection::runs_bfloat16() && amx::available()) found.push_back("amx_bf16");
  return found;
}

}  // namespace nanomoe::cpu
