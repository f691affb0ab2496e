// Building blocks shared by the CUDA kernels: number conversions, global -> shared tile copies, and
// a warp's share of a CTA-level matrix product. CUDA headers only (see README.md).
//
// Every product here is C (rows x cols) = sum_k A(row, k) * B(k, col) on tiles staged in shared
// memory. Tiles are stored in the orientation they have in global memory, so each copy is a run of
// 16-byte vectors; the fragment layouts (row_major / col_major) absorb the orientation instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace nanomoe::cuda {

// float32 accumulation for every storage type.
template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Num<T>::load(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Num<T>::store(v);
}

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// Depth of one pipeline stage along the reduction dimension: 64 bytes of each row.
template <typename T>
constexpr int kTileK = 64 / sizeof(T);

// Shared-memory row padding: one 16-byte vector, which keeps rows 16-byte aligned for cp.async,
// keeps WMMA's leading dimension a multiple of 16 bytes, and staggers rows across banks.
template <typename T>
constexpr int kPad = kVec<T>;

constexpr int kThreads = 256;  // every tile kernel runs 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTileN = 128;  // output columns of one CTA-level product

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Copies a kRows x kCols tile whose columns are contiguous in global memory (element (r, c) at
// src[r * src_ld + c]) into shared memory (at dst[r * dst_ld + c]). Elements at r >= row_limit or
// c >= col_limit read as zero. With `vectorized` (src and src_ld 16-byte aligned), the copy is
// asynchronous (cp.async; the caller commits and waits); otherwise it is done element by element.
template <typename T, int kRows, int kCols>
__device__ __forceinline__ void copy_tile(T* dst, int dst_ld, const T* src, int64_t src_ld,
                                          int64_t row_limit, int64_t col_limit, bool vectorized) {
  constexpr int kVecs = kCols / kVec<T>;
  static_assert(kCols % kVec<T> == 0, "tile width must be whole vectors");
  for (int idx = threadIdx.x; idx < kRows * kVecs; idx += kThreads) {
    const int r = idx / kVecs;
    const int c = (idx % kVecs) * kVec<T>;
    T* to = dst + r * dst_ld + c;
    if (vectorized) {
      int64_t valid = r < row_limit ? col_limit - c : 0;
      valid = valid < 0 ? 0 : (valid > kVec<T> ? kVec<T> : valid);
      const T* from = valid > 0 ? src + r * src_ld + c : src;
      __pipeline_memcpy_async(to, from, 16, (kVec<T> - valid) * sizeof(T));
    } else {
#pragma unroll
      for (int e = 0; e < kVec<T>; ++e) {
        const bool inside = r < row_limit && c + e < col_limit;
        to[e] = inside ? src[r * src_ld + c + e] : from_float<T>(0.f);
      }
    }
  }
}

// How 8 warps share a kTileM x kTileN output tile: a grid of kWarpsM x kWarpsN warps, each owning
// kFragsM x kFragsN fragments of 16 x 16.
template <int kTileM>
struct WarpGrid {
  static_assert(kTileM % 16 == 0 && kTileM >= 16, "token tile must be whole fragments");
  static constexpr int kWarpsM = kTileM >= 32 ? 2 : 1;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kWarpRows = kTileM / kWarpsM;
  static constexpr int kWarpCols = kTileN / kWarpsN;
  static constexpr int kFragsM = kWarpRows / 16;
  static constexpr int kFragsN = kWarpCols / 16;
  static __device__ __forceinline__ int row0() { return (threadIdx.x / 32) / kWarpsN * kWarpRows; }
  static __device__ __forceinline__ int col0() { return (threadIdx.x / 32) % kWarpsN * kWarpCols; }
};

// Shared-memory operand views. A(row, k) and B(k, col); `k_major` says which index is contiguous.
template <typename T>
struct SmemA {
  const T* data;
  int ld;
  bool k_major;  // A(row, k) at data[row * ld + k]; else at data[k * ld + row]
};
template <typename T>
struct SmemB {
  const T* data;
  int ld;
  bool k_major;  // B(k, col) at data[col * ld + k]; else at data[k * ld + col]
};

// A warp's kFragsM x kFragsN fragments, accumulated in float32. The 16-bit types use tensor cores
// (WMMA); float32 uses FMA so that results keep full float32 accuracy (no TF32).
template <typename T, int kFragsM, int kFragsN, bool kAKMajor, bool kBKMajor>
struct WarpAccumulator {
  using ALayout = std::conditional_t<kAKMajor, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using BLayout = std::conditional_t<kBKMajor, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[kFragsM][kFragsN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm)
#pragma unroll
      for (int fn = 0; fn < kFragsN; ++fn) nvcuda::wmma::fill_fragment(acc[fm][fn], 0.f);
  }

  // acc += A[row0 : row0 + 16 kFragsM, 0 : 16] * B[0 : 16, col0 : col0 + 16 kFragsN], with a and b
  // pointing at the first k of this step. Fragments whose first column is at or past col_limit are
  // skipped (they would only add zeros).
  __device__ __forceinline__ void step(const T* a, int lda, const T* b, int ldb, int row0, int col0,
                                       int col_limit) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> fa[kFragsM];
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm) {
      const int row = row0 + fm * 16;
      nvcuda::wmma::load_matrix_sync(fa[fm], kAKMajor ? a + row * lda : a + row, lda);
    }
#pragma unroll
    for (int fn = 0; fn < kFragsN; ++fn) {
      const int col = col0 + fn * 16;
      if (col >= col_limit) continue;
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
      nvcuda::wmma::load_matrix_sync(fb, kBKMajor ? b + col * ldb : b + col, ldb);
#pragma unroll
      for (int fm = 0; fm < kFragsM; ++fm)
        nvcuda::wmma::mma_sync(acc[fm][fn], fa[fm], fb, acc[fm][fn]);
    }
  }

  // Calls fn(row, col, values[8]) for 8 consecutive columns of each fragment row this lane holds;
  // row and col are relative to the warp's tile. `scratch` is this warp's 16 x 16 floats.
  template <typename Fn>
  __device__ __forceinline__ void visit(float* scratch, Fn&& fn) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm)
#pragma unroll
      for (int fn_ = 0; fn_ < kFragsN; ++fn_) {
        nvcuda::wmma::store_matrix_sync(scratch, acc[fm][fn_], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
        float values[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) values[e] = scratch[(lane / 2) * 16 + (lane % 2) * 8 + e];
        __syncwarp();
        fn(fm * 16 + lane / 2, fn_ * 16 + (lane % 2) * 8, values);
      }
  }
};

template <int kFragsM, int kFragsN, bool kAKMajor, bool kBKMajor>
struct WarpAccumulator<float, kFragsM, kFragsN, kAKMajor, kBKMajor> {
  // Lane l holds row l / 2 and columns (l % 2) * 8 .. + 8 of every fragment.
  float acc[kFragsM][kFragsN][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm)
#pragma unroll
      for (int fn = 0; fn < kFragsN; ++fn)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[fm][fn][e] = 0.f;
  }

  __device__ __forceinline__ void step(const float* a, int lda, const float* b, int ldb, int row0,
                                       int col0, int col_limit) {
    const int lane = threadIdx.x % 32;
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      float av[kFragsM];
#pragma unroll
      for (int fm = 0; fm < kFragsM; ++fm) {
        const int row = row0 + fm * 16 + lane / 2;
        av[fm] = kAKMajor ? a[row * lda + k] : a[k * lda + row];
      }
#pragma unroll
      for (int fn = 0; fn < kFragsN; ++fn) {
        const int col = col0 + fn * 16 + (lane % 2) * 8;
        if (col0 + fn * 16 >= col_limit) continue;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float bv = kBKMajor ? b[(col + e) * ldb + k] : b[k * ldb + col + e];
#pragma unroll
          for (int fm = 0; fm < kFragsM; ++fm) acc[fm][fn][e] = fmaf(av[fm], bv, acc[fm][fn][e]);
        }
      }
    }
  }

  template <typename Fn>
  __device__ __forceinline__ void visit(float* /*scratch*/, Fn&& fn) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm)
#pragma unroll
      for (int fn_ = 0; fn_ < kFragsN; ++fn_)
        fn(fm * 16 + lane / 2, fn_ * 16 + (lane % 2) * 8, acc[fm][fn_]);
  }
};

// Writes 8 consecutive values of one row: one 16-byte store (two for float) when all 8 are inside
// and `aligned`, else element by element up to col_limit.
template <typename T>
__device__ __forceinline__ void store_row8(T* dst, const float (&values)[8], int64_t col_limit,
                                           bool aligned) {
  if (aligned && col_limit >= 8) {
    alignas(16) T packed[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) packed[e] = from_float<T>(values[e]);
    const uint4* from = reinterpret_cast<const uint4*>(packed);
    uint4* to = reinterpret_cast<uint4*>(dst);
#pragma unroll
    for (int v = 0; v < int(sizeof(packed) / sizeof(uint4)); ++v) to[v] = from[v];
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e)
    if (e < col_limit) dst[e] = from_float<T>(values[e]);
}

__host__ __device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Whether a strided operand can be copied in 16-byte vectors: aligned base, and every row (and
// every batch) starting on a vector boundary.
template <typename T>
__host__ __device__ inline bool vectorizable(const void* p, int64_t ld, int64_t batch_stride = 0) {
  return aligned16(p) && ld % kVec<T> == 0 && batch_stride % kVec<T> == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Two-stage software pipeline over a reduction of k_extent: load(stage, k0) issues the copies of
// the tile at k0 (cp.async where it can), compute(stage, k0) consumes a staged tile. Ends with a
// barrier, so the stages and anything computed from them may be reused at once.
template <typename T, typename Load, typename Compute>
__device__ __forceinline__ void pipeline(int64_t k_extent, Load&& load, Compute&& compute) {
  const int64_t tiles = k_extent > 0 ? ceil_div(k_extent, kTileK<T>) : 0;
  if (tiles > 0) load(0, int64_t{0});
  __pipeline_commit();
  for (int64_t t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load(int((t + 1) % 2), (t + 1) * kTileK<T>);
    __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();
    compute(int(t % 2), t * kTileK<T>);
    __syncthreads();
  }
  if (tiles == 0) __syncthreads();
}

}  // namespace nanomoe::cuda
