// The fused forward: one CTA takes a tile of tokens through the whole layer. The per-block
// down-projections land in shared memory (`hidden`, tile x K_in rank), never in device memory
// unless the backward asks for them; for each output block the mixing makes that block's `mixed`
// (tile x rank) in shared memory, and the up-projection writes the output. So x is read once and
// y written once; the weights are re-read per tile from L2.
#include "kernels.h"
#include "launch.cuh"
#include "tile.cuh"

namespace nanomoe::cuda {
namespace {

enum MixingKind { kScalar = 0, kDiagonal = 1, kDiagonalOuter = 2, kFull = 3 };

// Where each buffer lives in dynamic shared memory, for a token tile of kTileM.
template <typename T, int kTileM>
struct FusedLayout {
  static constexpr int kStageLd = kTileK<T> + kPad<T>;
  int64_t hidden_k, hidden_ld;  // hidden tile: columns padded with zeros to whole k steps
  int64_t mixed_k, mixed_ld;
  size_t hidden_at, mixed_at, a_at, b_at, scratch_at, dots_at, bytes;

  __host__ __device__ FusedLayout(int64_t in_blocks, int64_t rank) {
    hidden_k = round_up(in_blocks * rank, kTileK<T>);
    hidden_ld = hidden_k + kPad<T>;
    mixed_k = round_up(rank, kTileK<T>);
    mixed_ld = mixed_k + kPad<T>;
    size_t at = 0;
    hidden_at = take(at, kTileM * hidden_ld * sizeof(T));
    mixed_at = take(at, kTileM * mixed_ld * sizeof(T));
    a_at = take(at, 2 * kTileM * kStageLd * sizeof(T));
    b_at = take(at, 2 * kTileN * kStageLd * sizeof(T));
    scratch_at = take(at, kWarps * 256 * sizeof(float));
    dots_at = take(at, kTileM * in_blocks * sizeof(float));
    bytes = at;
  }

 private:
  static __host__ __device__ size_t take(size_t& at, size_t size) {
    const size_t start = at;
    at = size_t(round_up(int64_t(at + size), 128));
    return start;
  }
};

struct FusedFlags {  // which operands move in 16-byte vectors
  bool x, down, mix, up, out, hidden;
};

template <typename T, int kTileM>
__global__ void __launch_bounds__(kThreads)
    fused_forward_kernel(const FusedForwardProblem p, const FusedFlags flags) {
  using Grid = WarpGrid<kTileM>;
  using Acc = WarpAccumulator<T, Grid::kFragsM, Grid::kFragsN, true, true>;
  constexpr int kK = kTileK<T>;
  constexpr int kLd = FusedLayout<T, kTileM>::kStageLd;
  const FusedLayout<T, kTileM> layout(p.in_blocks, p.rank);
  extern __shared__ __align__(128) unsigned char shared[];
  T* hidden = reinterpret_cast<T*>(shared + layout.hidden_at);
  T* mixed = reinterpret_cast<T*>(shared + layout.mixed_at);
  T* a_stages = reinterpret_cast<T*>(shared + layout.a_at);
  T* b_stages = reinterpret_cast<T*>(shared + layout.b_at);
  float* scratch = reinterpret_cast<float*>(shared + layout.scratch_at) + threadIdx.x / 32 * 256;
  float* dots = reinterpret_cast<float*>(shared + layout.dots_at);

  const int64_t r = p.rank, n_b = p.in_block, m_b = p.out_block, k_in = p.in_blocks;
  const int64_t hidden_width = k_in * r;
  const int64_t token0 = int64_t(blockIdx.x) * kTileM;
  const int64_t rows = min64(kTileM, p.tokens - token0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Streams B (kTileN rows of a weight, k contiguous, row stride ld) against an A operand already
  // in shared memory (a_smem, row stride a_ld), over k_extent; the result stays in acc.
  auto product_with_resident_a = [&](Acc& acc, const T* a_smem, int64_t a_ld, int64_t k_extent,
                                     const T* b, int64_t b_ld, int64_t b_rows, int64_t b_k,
                                     bool b_vectorized) {
    acc.zero();
    const int col_limit = int(min64(kTileN, b_rows));
    pipeline<T>(
        k_extent,
        [&](int stage, int64_t k0) {
          copy_tile<T, kTileN, kK>(b_stages + stage * kTileN * kLd, kLd, b + k0, b_ld, b_rows,
                                   b_k - k0, b_vectorized);
        },
        [&](int stage, int64_t k0) {
#pragma unroll
          for (int kk = 0; kk < kK; kk += 16)
            acc.step(a_smem + k0 + kk, int(a_ld), b_stages + stage * kTileN * kLd + kk, kLd,
                     Grid::row0(), Grid::col0(), col_limit);
        });
  };

  // 1. hidden[t, j, :] = x[t, block j] @ down[j].T for every input block.
  const T* x = static_cast<const T*>(p.x) + token0 * p.x_row;
  for (int64_t j = 0; j < k_in; ++j) {
    for (int64_t c0 = 0; c0 < r; c0 += kTileN) {
      const T* x_block = x + j * n_b;
      const T* down = static_cast<const T*>(p.down) + (j * r + c0) * n_b;
      const int col_limit = int(min64(kTileN, r - c0));
      Acc acc;
      acc.zero();
      pipeline<T>(
          n_b,
          [&](int stage, int64_t k0) {
            copy_tile<T, kTileM, kK>(a_stages + stage * kTileM * kLd, kLd, x_block + k0, p.x_row,
                                     rows, n_b - k0, flags.x);
            copy_tile<T, kTileN, kK>(b_stages + stage * kTileN * kLd, kLd, down + k0, n_b, r - c0,
                                     n_b - k0, flags.down);
          },
          [&](int stage, int64_t) {
#pragma unroll
            for (int kk = 0; kk < kK; kk += 16)
              acc.step(a_stages + stage * kTileM * kLd + kk, kLd,
                       b_stages + stage * kTileN * kLd + kk, kLd, Grid::row0(), Grid::col0(),
                       col_limit);
          });
      acc.visit(scratch, [&](int row, int col, const float (&values)[8]) {
        const int t = Grid::row0() + row;
        const int64_t c = c0 + Grid::col0() + col;
        if (c >= r) return;
        T* dst = hidden + t * layout.hidden_ld + j * r + c;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (c + e < r) dst[e] = from_float<T>(values[e]);
        if (p.hidden && t < rows) {
          T* saved = static_cast<T*>(p.hidden) + (token0 + t) * hidden_width + j * r + c;
          store_row8(saved, values, r - c, flags.hidden);
        }
      });
    }
  }
  // Zero the padding columns: the full mixing's product reads them (times zero weights).
  const int64_t hidden_pad = layout.hidden_k - hidden_width;
  for (int64_t idx = threadIdx.x; idx < kTileM * hidden_pad; idx += kThreads)
    hidden[(idx / hidden_pad) * layout.hidden_ld + hidden_width + idx % hidden_pad] =
        from_float<T>(0.f);
  __syncthreads();

  const T* gate = static_cast<const T*>(p.mix);
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t i = 0; i < p.out_blocks; ++i) {
    // 2. mixed[t, :] = sum_j G_ij hidden[t, j, :] for output block i.
    if (p.mixing == kFull) {
      for (int64_t c0 = 0; c0 < r; c0 += kTileN) {
        Acc acc;
        product_with_resident_a(acc, hidden, layout.hidden_ld, layout.hidden_k,
                                gate + (i * r + c0) * hidden_width, hidden_width, r - c0,
                                hidden_width, flags.mix);
        acc.visit(scratch, [&](int row, int col, const float (&values)[8]) {
          const int64_t c = c0 + Grid::col0() + col;
          T* dst = mixed + (Grid::row0() + row) * layout.mixed_ld + c;
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (c + e < r) dst[e] = from_float<T>(values[e]);
        });
      }
    } else {
      const int64_t pair0 = i * k_in;  // gate index of (i, 0)
      if (p.mixing == kDiagonalOuter) {
        const T* right = static_cast<const T*>(p.right);
        for (int64_t item = warp; item < kTileM * k_in; item += kWarps) {
          const int64_t t = item / k_in, j = item % k_in;
          float dot = 0.f;
          for (int64_t c = lane; c < r; c += 32)
            dot += to_float(right[(pair0 + j) * r + c]) *
                   to_float(hidden[t * layout.hidden_ld + j * r + c]);
          dot = warp_sum(dot);
          if (lane == 0) dots[item] = dot;
        }
        __syncthreads();
      }
      const T* left = static_cast<const T*>(p.left);
      for (int64_t idx = threadIdx.x; idx < kTileM * r; idx += kThreads) {
        const int64_t t = idx / r, c = idx % r;
        float acc = 0.f;
        for (int64_t j = 0; j < k_in; ++j) {
          const float g =
              p.mixing == kScalar ? to_float(gate[pair0 + j]) : to_float(gate[(pair0 + j) * r + c]);
          acc += g * to_float(hidden[t * layout.hidden_ld + j * r + c]);
          if (p.mixing == kDiagonalOuter)
            acc += to_float(left[(pair0 + j) * r + c]) * dots[t * k_in + j];
        }
        mixed[t * layout.mixed_ld + c] = from_float<T>(acc);
      }
    }
    const int64_t mixed_pad = layout.mixed_k - r;
    for (int64_t idx = threadIdx.x; idx < kTileM * mixed_pad; idx += kThreads)
      mixed[(idx / mixed_pad) * layout.mixed_ld + r + idx % mixed_pad] = from_float<T>(0.f);
    __syncthreads();

    // 3. out[t, block i] = mixed[t, :] @ up[i].T (+ bias), kTileN columns at a time.
    for (int64_t q0 = 0; q0 < m_b; q0 += kTileN) {
      Acc acc;
      product_with_resident_a(acc, mixed, layout.mixed_ld, layout.mixed_k,
                              static_cast<const T*>(p.up) + (i * m_b + q0) * r, r, m_b - q0, r,
                              flags.up);
      acc.visit(scratch, [&](int row, int col, const float (&values)[8]) {
        const int64_t t = Grid::row0() + row, q = q0 + Grid::col0() + col;
        if (t >= rows || q >= m_b) return;
        float out[8];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          out[e] = values[e] + (bias && q + e < m_b ? to_float(bias[i * m_b + q + e]) : 0.f);
        T* dst = static_cast<T*>(p.out) + (token0 + t) * p.out_row + i * m_b + q;
        store_row8(dst, out, m_b - q, flags.out);
      });
    }
  }
}

template <typename T, int kTileM>
size_t shared_bytes(const FusedForwardProblem& p) {
  return FusedLayout<T, kTileM>(p.in_blocks, p.rank).bytes;
}

// The largest token tile whose buffers fit, smaller ones first for few tokens; 0 if none fits.
template <typename T>
int token_tile(const FusedForwardProblem& p) {
  const size_t limit = size_t(device_limits().max_shared_memory);
  if (p.tokens > 32 && shared_bytes<T, 64>(p) <= limit) return 64;
  if (p.tokens > 16 && shared_bytes<T, 32>(p) <= limit) return 32;
  if (shared_bytes<T, 16>(p) <= limit) return 16;
  return 0;
}

template <typename T, int kTileM>
void launch(const FusedForwardProblem& p, cudaStream_t stream) {
  constexpr int v = kVec<T>;
  const int64_t hidden_width = p.in_blocks * p.rank;
  const FusedFlags flags{
      vectorizable<T>(p.x, p.x_row, p.in_block),
      vectorizable<T>(p.down, p.in_block),
      p.mixing == kFull && vectorizable<T>(p.mix, hidden_width),
      vectorizable<T>(p.up, p.rank),
      vectorizable<T>(p.out, p.out_row, p.out_block),
      p.hidden && vectorizable<T>(p.hidden, hidden_width, p.rank),
  };
  static_assert(v > 0);
  const size_t bytes = shared_bytes<T, kTileM>(p);
  constexpr auto kernel = fused_forward_kernel<T, kTileM>;
  allow_max_shared_memory<kernel>();
  kernel<<<unsigned(ceil_div(p.tokens, kTileM)), kThreads, bytes, stream>>>(p, flags);
}

}  // namespace

bool fused_forward(const FusedForwardProblem& p, cudaStream_t stream) {
  bool launched = false;
  with_storage_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int tile = token_tile<T>(p);
    launched = tile != 0;
    if (p.tokens == 0) return;
    if (tile == 64) launch<T, 64>(p, stream);
    if (tile == 32) launch<T, 32>(p, stream);
    if (tile == 16) launch<T, 16>(p, stream);
  });
  return launched;
}

}  // namespace nanomoe::cuda
