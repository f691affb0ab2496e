// The CPU kernels' own GEMM-shaped inner loops: a token tile times a set of weight rows, for
// float32 (FMA) and bfloat16 (AVX512-BF16 dot products accumulated in float32), written for
// AVX-512.
//
// This header and projection.cpp see only raw pointers and sizes, no ATen: projection.cpp is
// compiled for AVX-512, and no inline function of a shared header may be compiled that way (the
// linker could keep the AVX-512 copy for every caller). bfloat16 is passed as its bits, uint16_t.
#pragma once

#include <cstdint>

namespace nanomoe::cpu::projection {

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

// The same product read straight from the weight rows, no packing: dot products along each row.
// For a few tokens, where the weights dominate and packing them would cost more than it saves.
void project_rows(int64_t tokens, const float* in, int64_t in_stride, const WeightRows<float>& w,
                  const float* bias, float* out, int64_t out_stride);
void project_rows(int64_t tokens, const uint16_t* in, int64_t in_stride,
                  const WeightRows<uint16_t>& w, const float* bias, uint16_t* out,
                  int64_t out_stride);

}  // namespace nanomoe::cpu::projection
