// The CPU kernels' own GEMM-shaped inner loops: a token tile times a set of weight rows, for
// float32 (FMA) and bfloat16 (AVX512-BF16 dot products accumulated in float32), written for
// AVX-512.
//
// This header and projection.cpp see only raw pointers and sizes, no ATen: projection.cpp is
// compiled for AVX-512, and no inline function of a shared header may be compiled that way (the
// linker could keep the AVX-512 copy for every caller). bfloat16 is passed as its bits, uint16_t.
#pragma once

#include <cstdint>
#include <type_traits>

namespace nanomoe::cpu::projection {

// Elements of the reduction one multiply-add covers per lane: one float32, or a pair of bfloat16
// (vdpbf16ps).
template <typename T>
constexpr int64_t kElementsPerStep = std::is_same_v<T, uint16_t> ? 2 : 1;

// Weight rows as a projection reads them: row c is `segments` runs of `segment_len` contiguous
// elements, run s at data + c * row_stride + s * segment_stride; the runs together make the row's
// `depth()` elements. A plain (rows, depth) matrix is one segment; the full gate, seen from output
// block i, is K_in segments (one r x r matrix per input block).
template <typename T>
struct WeightRows {
  const T* data;
  int64_t rows, segments, segment_len, row_stride, segment_stride;
  int64_t depth() const { return segments * segment_len; }
};

// Whether this CPU runs the kernels below: float32 needs AVX-512 (F, BW, VL, DQ); bfloat16 also
// needs AVX512-BF16. False on every other architecture, where the callers use ATen's BLAS.
bool runs_float();
bool runs_bfloat16();

// Weight rows copied into panels of kPanelRows rows, laid out for project_packed: one copy per
// call, worth it when many tokens reuse it.
constexpr int64_t kPanelRows = 32;
int64_t packed_size(const WeightRows<float>& w);     // floats
int64_t packed_size(const WeightRows<uint16_t>& w);  // bfloat16 elements
void pack(const WeightRows<float>& w, float* packed);
void pack(const WeightRows<uint16_t>& w, uint16_t* packed);

// out[t, c] = sum_k in[t, k] * W[c, k] (+ bias[c]) for t < tokens, c < rows, k < depth, where
// in[t, k] = in[t * in_stride + k] and out[t, c] = out[t * out_stride + c]; bias may be null.
// The bfloat16 forms accumulate in float32 and round once, when they store.
void project_packed(int64_t tokens, const float* in, int64_t in_stride, const float* packed,
                    int64_t rows, int64_t depth, const float* bias, float* out, int64_t out_stride);
void project_packed(int64_t tokens, const uint16_t* in, int64_t in_stride, const uint16_t* packed,
                    int64_t rows, int64_t depth, const float* bias, uint16_t* out,
                    int64_t out_stride);

// A (steps, cols) matrix read step by step, as the backward's operands come: element (k, c) at
// data + k * stride + c for float32 (any row-major matrix, read in place). For bfloat16 rows k and
// k + 1 (k even) are interleaved, element (k, c) at data + k * stride + 2 * c + k % 2, as
// pair_steps lays them out (an odd last row is paired with zeros).
template <typename T>
struct Steps {
  const T* data;
  int64_t stride;
};

// bfloat16: src, (steps, cols) with row stride src_stride, paired into dst: pair row p (rows 2p
// and 2p + 1 side by side) at dst + p * pair_stride, at least 2 * cols; with pair_stride = 2 *
// cols, Steps with stride cols, in paired_size(steps, cols) elements.
int64_t paired_size(int64_t steps, int64_t cols);
void pair_steps(int64_t steps, int64_t cols, const uint16_t* src, int64_t src_stride, uint16_t* dst,
                int64_t pair_stride);
// pair_steps, and sums[c] += sum_k src(k, c) in float32, k in order: accumulate_columns' bias
// gradient, taken while grad_out passes through here anyway.
void pair_steps_summing(int64_t steps, int64_t cols, const uint16_t* src, int64_t src_stride,
                        uint16_t* dst, int64_t pair_stride, float* sums);

// dst row c (at dst + c * dst_stride) = column c of src, its pairs side by side: a transpose of
// 32-bit pairs, src's `pairs` rows of pairs (row q at src + q * src_row) by `cols` columns. Only
// the pairs < `pairs` of each dst row are written, and src is read only within its rows.
void transpose_pairs(int64_t pairs, int64_t cols, const uint16_t* src, int64_t src_row,
                     uint16_t* dst, int64_t dst_stride);

// out[t, c] = sum_k in[t, k] W(k, c) for t < tokens, c < cols, k < depth: W by steps, read in
// place (no packing), rounded like project_packed.
void project_steps(int64_t tokens, const float* in, int64_t in_stride, Steps<float> w, int64_t cols,
                   int64_t depth, float* out, int64_t out_stride);
void project_steps(int64_t tokens, const uint16_t* in, int64_t in_stride, Steps<uint16_t> w,
                   int64_t cols, int64_t depth, uint16_t* out, int64_t out_stride);

// sums[p, c] += sum_k A(k, p) B(k, c) for p < a_cols, c < b_cols, k < depth, both by steps: a
// weight gradient, summed over a tile's tokens into float32.
void accumulate_products(int64_t depth, Steps<float> a, int64_t a_cols, Steps<float> b,
                         int64_t b_cols, float* sums, int64_t sums_stride);
void accumulate_products(int64_t depth, Steps<uint16_t> a, int64_t a_cols, Steps<uint16_t> b,
                         int64_t b_cols, float* sums, int64_t sums_stride);

// sums[c] += sum_t in[t * stride + c] for t < tokens, c < cols (the bias gradient).
void accumulate_columns(int64_t tokens, int64_t cols, const float* in, int64_t stride, float* sums);
void accumulate_columns(int64_t tokens, int64_t cols, const uint16_t* in, int64_t stride,
                        float* sums);

// The same product read straight from the weight rows, no packing: dot products along each row,
// kDotTokens tokens at a time. For a few tokens, where the weights dominate and packing them would
// cost more than it saves.
constexpr int64_t kDotTokens = 4;
void project_rows(int64_t tokens, const float* in, int64_t in_stride, const WeightRows<float>& w,
                  const float* bias, float* out, int64_t out_stride);
void project_rows(int64_t tokens, const uint16_t* in, int64_t in_stride,
                  const WeightRows<uint16_t>& w, const float* bias, uint16_t* out,
                  int64_t out_stride);

// project_rows on AMX, for bfloat16 where rows_on_amx says: the weight rows are the tile unit's
// first operand, read in place, and the input its second, packed once per call and input by
// pack_rows_input (rows_input_size(w) elements), its pairs of features side by side per token.
// From kRowsMinTokensOnAmx tokens (below, the tile's columns would be mostly empty) to
// kRowsTokensOnAmx; each segment of w must have an even length. `in` is read too, by the dot
// products that take the rows past the last multiple of 16.
constexpr int64_t kRowsMinTokensOnAmx = 2;
constexpr int64_t kRowsTokensOnAmx = 16;
bool rows_on_amx(int64_t tokens, const WeightRows<uint16_t>& w);
int64_t rows_input_size(const WeightRows<uint16_t>& w);
void pack_rows_input(int64_t tokens, const uint16_t* in, int64_t in_stride, int64_t depth,
                     uint16_t* packed);
void project_rows(int64_t tokens, const uint16_t* packed, const uint16_t* in, int64_t in_stride,
                  const WeightRows<uint16_t>& w, const float* bias, uint16_t* out,
                  int64_t out_stride);

// Whether all of count contiguous bfloat16 values are finite.
bool all_finite(int64_t count, const uint16_t* data);

}  // namespace nanomoe::cpu::projection
