// The mixing step's inner loops on float / double rows, and on bfloat16 rows converted one row at a
// time (the gate itself is always in the accumulation type).
// They are compiled once per x86 vector ISA (AVX-512, AVX2+FMA, baseline) and the best one is
// picked when the library loads, so no -march flag is needed at build time.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "gate_layout.h"

namespace nanomoe::cpu {

// dst[t, d, :] = sum_s G_ds src[t, s, :] for tokens t in [0, tokens) and every dst block d;
// src and dst rows are contiguous (tokens, blocks, rank).
void gate_rows(const GateRows<float>& g, const float* src, float* dst, int64_t tokens);
void gate_rows(const GateRows<float>& g, const c10::BFloat16* src, c10::BFloat16* dst,
               int64_t tokens);
void gate_rows(const GateRows<double>& g, const double* src, double* dst, int64_t tokens);

// For one forward dst block d, sums over tokens the gradients of its gate tensors, given src
// (hidden) and grad_dst (grad_mixed): grad_mix[s, :per_pair], grad_left[s, :r], grad_right[s, :r]
// (contiguous over s; grad_left/right null unless diagonal_outer).
void gate_rows_backward(const GateRows<float>& g, const float* src, const float* grad_dst,
                        int64_t tokens, int64_t d, float* grad_mix, float* grad_left,
                        float* grad_right);
void gate_rows_backward(const GateRows<double>& g, const double* src, const double* grad_dst,
                        int64_t tokens, int64_t d, double* grad_mix, double* grad_left,
                        double* grad_right);

}  // namespace nanomoe::cpu
