// The elementwise gates (scalar, diagonal, diagonal_outer) as the CPU mixing loops read them: raw
// pointers and sizes only, so AVX-512 translation units can include it (see projection.h).
#pragma once

#include <cstdint>

namespace nanomoe::cpu {

// The gate of one direction (forward G or transposed G^T), over acc_t copies of its tensors.
// variant: 0 scalar, 1 diagonal, 2 diagonal_outer (full mixing is a GEMM, not done here).
template <typename acc_t>
struct GateRows {
  int variant;
  int64_t rank, dst_blocks, src_blocks;
  int64_t dst_stride, src_stride;  // elements between consecutive dst / src blocks in mix
  const acc_t* mix;
  const acc_t* left;   // diagonal_outer only
  const acc_t* right;  // diagonal_outer only
};

}  // namespace nanomoe::cpu
