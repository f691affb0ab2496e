// bfloat16 products on Intel's AMX tile unit (Sapphire Rapids and later): one TDPBF16PS multiplies
// a 16 x 32 tile of the input by a 32 x 16 tile of the weights into 16 x 16 float32 sums, 16 times
// the multiply-adds of an AVX-512 vdpbf16ps. oneDNN uses it for ATen's bfloat16 matmuls (so for
// LowRankLinear) wherever the CPU has it; the projections here do too.
//
// Raw pointers only, like projection.h: amx.cpp is compiled for AMX, no ATen.
#pragma once

#include <cstdint>

namespace nanomoe::cpu::amx {

// Whether the products below run here: the CPU has AMX-TILE and AMX-BF16, Linux granted this
// process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), and NANOMOE_AMX is not "0" in the
// environment when first asked (the switch that lets tests and A/Bs run the AVX-512 tile instead).
bool available();

// A block of the product is kTokens x kCols: two (or one) 16-token rows of tiles by two 16-column
// tiles.
constexpr int64_t kTokens = 32;
constexpr int64_t kCols = 32;

// Holds the tile unit on the calling thread for its lifetime: the products below configure it for
// their depth when it is not already (a configuration zeroes every tile, so none is kept between
// products), and the outermost Tiles releases it. Hold one around a run of products on one thread,
// with nothing in between that configures the tile unit otherwise (oneDNN does); nested, the inner
// ones do nothing, so a caller may hold it across many products that each hold their own.
class Tiles {
 public:
  Tiles();
  ~Tiles();
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// sums[t * kCols + c] = sum_{k < depth} in[t * in_stride + k] * W(k, c), for t < tokens (16 or
// 32) and c < kCols. W is laid out by pairs of steps, as projection.h's packed panels and Steps
// are: the pair (W(2p, c), W(2p + 1, c)) at weights + p * pair_stride + 2 * c, for every
// p < ceil(depth / 2) and c < kCols, and an odd depth's missing partner reads as zero. The input
// is read only for k < depth. cols = 16 computes (and reads W for) the first 16 columns only, at
// the same rate per column. Needs a live Tiles on this thread.
void product(int64_t tokens, const uint16_t* in, int64_t in_stride, const uint16_t* weights,
             int64_t pair_stride, int64_t depth, float* sums, int64_t cols = kCols);

// sums[t * sums_stride + c] += the same sum, for t < tokens (16 or 32) and c < cols (kCols or 16,
// as product's): sums kept in memory across calls (a weight gradient's, over many chunks of
// tokens), loaded into the tiles before the steps and stored after them.
void add_product(int64_t tokens, const uint16_t* in, int64_t in_stride, const uint16_t* weights,
                 int64_t pair_stride, int64_t depth, float* sums, int64_t sums_stride,
                 int64_t cols = kCols);

}  // namespace nanomoe::cpu::amx
