// The elementwise gates (scalar, diagonal, diagonal_outer) outside the fused forward: applying a
// gate or its transpose to a (tokens, blocks, rank) tensor, and the gates' gradients. One warp per
// output row of `rank` features, lanes across features, so every access is coalesced; the
// diagonal_outer dot products are warp reductions.
#include "kernels.h"
#include "launch.cuh"
#include "tile.cuh"

namespace nanomoe::cuda {
namespace {

constexpr int kLaneValues = 8;                // features per lane per pass
constexpr int kPassWidth = 32 * kLaneValues;  // features per warp per pass
constexpr int kGradWarps = 4;                 // warps of one gate-gradient CTA

template <typename T>
__device__ __forceinline__ float gate_at(const GateView& g, int64_t o, int64_t s, int64_t c) {
  return to_float(static_cast<const T*>(g.data)[o * g.o_stride + s * g.s_stride + c * g.c_stride]);
}

// <v(o, s, :), in[:]> over the whole rank, summed across the warp.
template <typename T>
__device__ __forceinline__ float gate_dot(const GateView& v, int64_t o, int64_t s, const T* in,
                                          int64_t rank) {
  float dot = 0.f;
  for (int64_t c = threadIdx.x % 32; c < rank; c += 32)
    dot += gate_at<T>(v, o, s, c) * to_float(in[c]);
  return warp_sum(dot);
}

template <typename T, bool kOuter>
__global__ void __launch_bounds__(kThreads) mix_kernel(const MixProblem p) {
  const int lane = threadIdx.x % 32;
  // Grid-stride over output rows (token, output block); whole warps take a row together.
  for (int64_t item = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; item < p.tokens * p.outs;
       item += int64_t(gridDim.x) * kWarps) {
    const int64_t t = item / p.outs, o = item % p.outs;
    const T* in_row = static_cast<const T*>(p.in) + t * p.in_row;
    T* out = static_cast<T*>(p.out) + t * p.out_row + o * p.rank;
    for (int64_t c0 = 0; c0 < p.rank; c0 += kPassWidth) {
      float acc[kLaneValues] = {};
      for (int64_t s = 0; s < p.ins; ++s) {
        const T* in = in_row + s * p.rank;
        const float dot = kOuter ? gate_dot<T>(p.right, o, s, in, p.rank) : 0.f;
#pragma unroll
        for (int e = 0; e < kLaneValues; ++e) {
          const int64_t c = c0 + lane + 32 * e;
          if (c >= p.rank) break;
          acc[e] += gate_at<T>(p.gate, o, s, c) * to_float(in[c]);
          if (kOuter) acc[e] += gate_at<T>(p.left, o, s, c) * dot;
        }
      }
#pragma unroll
      for (int e = 0; e < kLaneValues; ++e) {
        const int64_t c = c0 + lane + 32 * e;
        if (c < p.rank) out[c] = from_float<T>(acc[e]);
      }
    }
  }
}

// CTA (pair (i, j), chunk of tokens): each warp sums over a quarter of the chunk's tokens, then the
// warps' sums are added in a fixed order, so the result does not depend on scheduling.
template <typename T, bool kOuter>
__global__ void __launch_bounds__(kGradWarps * 32) gate_grad_kernel(const GateGradProblem p) {
  __shared__ float partial[kGradWarps][3][kPassWidth];
  const int64_t i = blockIdx.x / p.in_blocks, j = blockIdx.x % p.in_blocks;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * p.chunk_tokens;
  const int64_t end = min64(p.tokens, begin + p.chunk_tokens);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = p.rank;
  const int64_t gate_offset = (i * p.in_blocks + j) * r;
  // This pair's (rank,) vectors of mix_left and mix_right.
  const GateView left =
      kOuter ? GateView{static_cast<const T*>(p.left) + gate_offset, 0, 0, 1} : GateView{};
  const GateView right =
      kOuter ? GateView{static_cast<const T*>(p.right) + gate_offset, 0, 0, 1} : GateView{};
  const int64_t out_offset = (chunk * p.out_blocks * p.in_blocks) * r + gate_offset;

  for (int64_t c0 = 0; c0 < r; c0 += kPassWidth) {
    float grad_gate[kLaneValues] = {}, grad_left[kLaneValues] = {}, grad_right[kLaneValues] = {};
    for (int64_t t = begin + warp; t < end; t += kGradWarps) {
      const T* gm = static_cast<const T*>(p.grad_mixed) + (t * p.out_blocks + i) * r;
      const T* z = static_cast<const T*>(p.hidden) + (t * p.in_blocks + j) * r;
      const float dot_right = kOuter ? gate_dot<T>(right, 0, 0, z, r) : 0.f;
      const float dot_left = kOuter ? gate_dot<T>(left, 0, 0, gm, r) : 0.f;
#pragma unroll
      for (int e = 0; e < kLaneValues; ++e) {
        const int64_t c = c0 + lane + 32 * e;
        if (c >= r) break;
        const float g = to_float(gm[c]), h = to_float(z[c]);
        grad_gate[e] += g * h;
        if (kOuter) {
          grad_left[e] += g * dot_right;
          grad_right[e] += dot_left * h;
        }
      }
    }
#pragma unroll
    for (int e = 0; e < kLaneValues; ++e) {
      partial[warp][0][lane + 32 * e] = grad_gate[e];
      partial[warp][1][lane + 32 * e] = grad_left[e];
      partial[warp][2][lane + 32 * e] = grad_right[e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kPassWidth; idx += kGradWarps * 32) {
      const int64_t c = c0 + idx;
      if (c >= r) break;
      float sums[3] = {};
      for (int w = 0; w < kGradWarps; ++w)
        for (int q = 0; q < 3; ++q) sums[q] += partial[w][q][idx];
      p.grad_gate[out_offset + c] = sums[0];
      if (kOuter) {
        p.grad_left[out_offset + c] = sums[1];
        p.grad_right[out_offset + c] = sums[2];
      }
    }
    __syncthreads();
  }
}

}  // namespace

void mix(const MixProblem& p, cudaStream_t stream) {
  if (p.tokens == 0) return;
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // enough to fill any device
  const unsigned blocks = unsigned(min64(kMaxBlocks, ceil_div(p.tokens * p.outs, kWarps)));
  with_storage_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.left.data) {
      mix_kernel<T, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      mix_kernel<T, false><<<blocks, kThreads, 0, stream>>>(p);
    }
  });
}

void gate_grad(const GateGradProblem& p, cudaStream_t stream) {
  if (p.tokens == 0) return;
  const dim3 grid(unsigned(p.out_blocks * p.in_blocks),
                  unsigned(ceil_div(p.tokens, p.chunk_tokens)));
  with_storage_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.left) {
      gate_grad_kernel<T, true><<<grid, kGradWarps * 32, 0, stream>>>(p);
    } else {
      gate_grad_kernel<T, false><<<grid, kGradWarps * 32, 0, stream>>>(p);
    }
  });
}

}  // namespace nanomoe::cuda
