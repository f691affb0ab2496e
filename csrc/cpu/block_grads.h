// The projections' weight gradients of a bfloat16 call with few tokens (one sequential tile), on
// AVX-512: per block, the sum over the tokens of outer products, in float32, rounded once. ATen's
// batched product of the blocks copies both operands first (their blocks are not batch-major) and
// takes its scratch from the allocator: on a CPU without AMX that put the backward's peak memory
// above the reference's (tests/test_memory.py). Raw pointers only, like projection.h.
#pragma once

#include <cstdint>

namespace nanomoe::cpu::block_grads {

// out[i, p, q] = sum_{t < tokens} a[t * a_row + i * rows + p] * b[t * b_row + i * cols + q] for the
// block i, p < rows and q < cols; bfloat16 as its bits, out contiguous (blocks, rows, cols). The
// block's rows of a and b are interleaved into pairs of tokens in this thread's scratch first.
// Callers check projection::runs_bfloat16() first.
void block_outer_sums(int64_t i, int64_t tokens, const uint16_t* a, int64_t a_row, int64_t rows,
                      const uint16_t* b, int64_t b_row, int64_t cols, uint16_t* out);

}  // namespace nanomoe::cpu::block_grads
