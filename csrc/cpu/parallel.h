// How the CPU kernels split work across threads.
//
// Large batches are cut into token tiles that run in parallel; inside a tile, the block loops run
// sequentially, so one tile's activations stay in its core's cache from the down-projection to the
// up-projection. Batches too small to feed every thread (latency-bound calls, where the weights
// dominate) run as one tile whose block loops run in parallel instead.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>

namespace nanomoe::cpu {

// How a kernel cuts its tokens: tiles of at most max_tokens (a multiple of `multiple`), run in
// parallel unless the batch has at most sequential_tokens tokens.
struct Tiling {
  int64_t max_tokens, multiple, sequential_tokens;
};

// ATen's GEMMs: each tile makes 2 K GEMM calls through ATen, whose fixed cost dominates small
// tiles: measured at B=4096, in=out=1024, r=64, K=8 (float32, 2 threads), forward 11.6 ms with
// 256-token tiles and 8.8 ms with 1024. A tile's intermediates (tokens x K x r) still fit in L2.
// Batches up to 64 tokens run as one tile with parallel block loops.
constexpr Tiling kBlasTiling{1024, 8, 64};

// How for_each_token_tile splits [0, tokens): `shares` contiguous shares of `share` tokens (the
// last one shorter), each run by one thread, cut into tiles of at most max_tokens. One share, on
// the calling thread, for a batch of at most sequential_tokens or a single thread; else a multiple
// of `multiple` per thread, so the threads' work differs by at most one multiple, not by a whole
// tile. Scratch kept per share (not per thread number: the sequential share runs on whichever
// thread calls, possibly a worker of an outer parallel loop) is never used by two threads at once.
struct TokenShares {
  int64_t share, shares;
  // The most tokens one tile gets, and how many shares there are (at least one slot of scratch).
  int64_t largest_tile(const Tiling& tiling) const { return std::min(tiling.max_tokens, share); }
  int64_t slots() const { return std::max<int64_t>(shares, 1); }
  // The share of the tile starting at token `begin`.
  int64_t slot_of(int64_t begin) const { return begin / share; }
};

inline TokenShares token_shares(int64_t tokens, const Tiling& tiling) {
  const int64_t threads = at::get_num_threads();
  if (tokens <= tiling.sequential_tokens || threads == 1) return {tokens, tokens > 0 ? 1 : 0};
  const int64_t per_thread = (tokens + threads - 1) / threads;
  const int64_t share = (per_thread + tiling.multiple - 1) / tiling.multiple * tiling.multiple;
  return {share, (tokens + share - 1) / share};
}

// Runs fn(begin, end) over the token tiles of [0, tokens), as token_shares splits them.
template <typename F>
void for_each_token_tile(int64_t tokens, const Tiling& tiling, const F& fn) {
  const TokenShares split = token_shares(tokens, tiling);
  const auto tiles_of = [&](int64_t begin, int64_t end) {
    for (; begin < end; begin += tiling.max_tokens)
      fn(begin, std::min(end, begin + tiling.max_tokens));
  };
  if (split.shares <= 1) return tiles_of(0, tokens);
  at::parallel_for(0, split.shares, 1, [&](int64_t first, int64_t last) {
    // Worker threads do not inherit the caller's dispatch state: keep autograd out of the views
    // and GEMMs made here.
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t s = first; s < last; ++s) {
      tiles_of(s * split.share, std::min(tokens, (s + 1) * split.share));
    }
  });
}

// Runs fn(block) for every block; in parallel only when not already inside a parallel tile loop.
template <typename F>
void for_each_block(int64_t blocks, const F& fn) {
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t b = first; b < last; ++b) fn(b);
  });
}

}  // namespace nanomoe::cpu
