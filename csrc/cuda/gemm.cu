// Batched strided products for the unfused steps: the backward's per-block products and weight
// gradients (split over tokens), and the forward when a tile's intermediates exceed shared memory.
// One 128 x 128 output tile per CTA, both operands streamed through a two-stage cp.async pipeline.
#include <algorithm>

#include "kernels.h"
#include "launch.cuh"
#include "tile.cuh"

namespace nanomoe::cuda {
namespace {

constexpr int kTileM = 128;

struct GemmFlags {
  bool a_vectorized, b_vectorized, c_vectorized;
};

template <typename T, bool kAKMajor, bool kBKMajor>
struct GemmTiles {
  static constexpr int kK = kTileK<T>;
  static constexpr int kALd = kAKMajor ? kK + kPad<T> : kTileM + kPad<T>;
  static constexpr int kASize = kAKMajor ? kTileM * kALd : kK * kALd;
  static constexpr int kBLd = kBKMajor ? kK + kPad<T> : kTileN + kPad<T>;
  static constexpr int kBSize = kBKMajor ? kTileN * kBLd : kK * kBLd;
  static constexpr size_t kSharedBytes =
      2 * (kASize + kBSize) * sizeof(T) + kWarps * 256 * sizeof(float);
};

template <typename T, bool kAKMajor, bool kBKMajor>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(const GemmProblem p, const GemmFlags flags) {
  using Tiles = GemmTiles<T, kAKMajor, kBKMajor>;
  using Grid = WarpGrid<kTileM>;
  extern __shared__ __align__(128) unsigned char shared[];
  T* a_stages = reinterpret_cast<T*>(shared);
  T* b_stages = a_stages + 2 * Tiles::kASize;
  float* scratch = reinterpret_cast<float*>(b_stages + 2 * Tiles::kBSize) + threadIdx.x / 32 * 256;

  const int64_t m0 = int64_t(blockIdx.x) * kTileM, n0 = int64_t(blockIdx.y) * kTileN;
  const int64_t batch = blockIdx.z / p.splits, split = blockIdx.z % p.splits;
  const int64_t k_per_split = round_up(ceil_div(p.k, p.splits), Tiles::kK);
  const int64_t k_begin = min64(p.k, split * k_per_split);
  const int64_t k_end = min64(p.k, k_begin + k_per_split);
  const T* a = static_cast<const T*>(p.a.data) + batch * p.a.batch_stride;
  const T* b = static_cast<const T*>(p.b.data) + batch * p.b.batch_stride;
  const int col_limit = int(min64(kTileN, p.n - n0));

  WarpAccumulator<T, Grid::kFragsM, Grid::kFragsN, kAKMajor, kBKMajor> acc;
  acc.zero();
  pipeline<T>(
      k_end - k_begin,
      [&](int stage, int64_t k) {
        const int64_t k0 = k_begin + k;
        T* a_tile = a_stages + stage * Tiles::kASize;
        T* b_tile = b_stages + stage * Tiles::kBSize;
        if constexpr (kAKMajor) {
          copy_tile<T, kTileM, Tiles::kK>(a_tile, Tiles::kALd, a + m0 * p.a.ld + k0, p.a.ld,
                                          p.m - m0, k_end - k0, flags.a_vectorized);
        } else {
          copy_tile<T, Tiles::kK, kTileM>(a_tile, Tiles::kALd, a + k0 * p.a.ld + m0, p.a.ld,
                                          k_end - k0, p.m - m0, flags.a_vectorized);
        }
        if constexpr (kBKMajor) {
          copy_tile<T, kTileN, Tiles::kK>(b_tile, Tiles::kBLd, b + n0 * p.b.ld + k0, p.b.ld,
                                          p.n - n0, k_end - k0, flags.b_vectorized);
        } else {
          copy_tile<T, Tiles::kK, kTileN>(b_tile, Tiles::kBLd, b + k0 * p.b.ld + n0, p.b.ld,
                                          k_end - k0, p.n - n0, flags.b_vectorized);
        }
      },
      [&](int stage, int64_t) {
        const T* a_tile = a_stages + stage * Tiles::kASize;
        const T* b_tile = b_stages + stage * Tiles::kBSize;
#pragma unroll
        for (int kk = 0; kk < Tiles::kK; kk += 16) {
          acc.step(kAKMajor ? a_tile + kk : a_tile + kk * Tiles::kALd, Tiles::kALd,
                   kBKMajor ? b_tile + kk : b_tile + kk * Tiles::kBLd, Tiles::kBLd, Grid::row0(),
                   Grid::col0(), col_limit);
        }
      });

  // With a split reduction, the bias joins the first split's partial sum only.
  const T* bias =
      p.bias && split == 0 ? static_cast<const T*>(p.bias) + batch * p.bias_batch_stride : nullptr;
  const int64_t c_offset = split * p.c_split_stride + batch * p.c_batch_stride;
  acc.visit(scratch, [&](int row, int col, const float (&values)[8]) {
    const int64_t i = m0 + Grid::row0() + row, q = n0 + Grid::col0() + col;
    if (i >= p.m || q >= p.n) return;
    float out[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      out[e] = values[e];
      if (bias && q + e < p.n) out[e] += to_float(bias[q + e]);
    }
    const int64_t at = c_offset + i * p.c_ld + q;
    if (p.c_is_float) {
      store_row8(static_cast<float*>(p.c) + at, out, p.n - q, flags.c_vectorized);
    } else {
      store_row8(static_cast<T*>(p.c) + at, out, p.n - q, flags.c_vectorized);
    }
  });
}

template <typename T, bool kAKMajor, bool kBKMajor>
void launch(const GemmProblem& p, cudaStream_t stream) {
  const size_t bytes = GemmTiles<T, kAKMajor, kBKMajor>::kSharedBytes;
  constexpr auto kernel = gemm_kernel<T, kAKMajor, kBKMajor>;
  allow_max_shared_memory<kernel>();
  const int c_vec = p.c_is_float ? kVec<float> : kVec<T>;
  const GemmFlags flags{
      vectorizable<T>(p.a.data, p.a.ld, p.a.batch_stride),
      vectorizable<T>(p.b.data, p.b.ld, p.b.batch_stride),
      aligned16(p.c) && p.c_ld % c_vec == 0 && p.c_batch_stride % c_vec == 0 &&
          p.c_split_stride % c_vec == 0,
  };
  // grid.z holds (batch, split) and is at most 65535: launch the batch in chunks that fit.
  const int64_t chunk = 65535 / p.splits;
  for (int64_t first = 0; first < p.batch; first += chunk) {
    GemmProblem part = p;
    part.batch = min64(chunk, p.batch - first);
    part.a.data = static_cast<const T*>(p.a.data) + first * p.a.batch_stride;
    part.b.data = static_cast<const T*>(p.b.data) + first * p.b.batch_stride;
    part.c = static_cast<char*>(p.c) +
             first * p.c_batch_stride * (p.c_is_float ? sizeof(float) : sizeof(T));
    if (p.bias) part.bias = static_cast<const T*>(p.bias) + first * p.bias_batch_stride;
    const dim3 grid(unsigned(ceil_div(p.m, kTileM)), unsigned(ceil_div(p.n, kTileN)),
                    unsigned(part.batch * p.splits));
    kernel<<<grid, kThreads, bytes, stream>>>(part, flags);
  }
}

}  // namespace

void gemm(const GemmProblem& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0 || p.batch == 0) return;
  with_storage_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.a.k_major && p.b.k_major) {
      launch<T, true, true>(p, stream);
    } else if (p.a.k_major) {
      launch<T, true, false>(p, stream);
    } else if (p.b.k_major) {
      launch<T, false, true>(p, stream);
    } else {
      launch<T, false, false>(p, stream);
    }
  });
}

int gemm_splits(int64_t m, int64_t n, int64_t k, int64_t batch) {
  constexpr int64_t kMinSplitK = 256;  // several pipeline stages per split
  constexpr int64_t kMaxSplits = 64;
  const int64_t tiles = ceil_div(m, kTileM) * ceil_div(n, kTileN) * batch;
  const int64_t wanted = ceil_div(2 * int64_t(device_limits().multiprocessors), tiles);
  const int64_t most = std::min({kMaxSplits, ceil_div(k, kMinSplitK), 65535 / batch});
  return int(std::max<int64_t>(1, std::min(wanted, most)));
}

}  // namespace nanomoe::cuda
