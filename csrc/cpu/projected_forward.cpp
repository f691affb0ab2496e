// Down-projections, mixing and up-projections of a token tile back to back on one core, the tile's
// intermediates in L2. Many tokens: the weights are packed once per call and every tile runs the
// register-tiled product (but a down-projection to a small rank from a wide block takes the dot
// products below: see kDotsMaxRank). A few tokens: the weights
// dominate, so they are read once, as they lie, by dot products, and the work is split across
// threads by weight rows instead of tokens.
#include "projected_forward.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "gate.h"
#include "gate_tile.h"
#include "parallel.h"
#include "projected_layer.h"
#include "projection.h"

namespace nanomoe::cpu {
namespace {

using at::Tensor;
using projection::WeightRows;

// Up to this many tokens the weights are read in place (project_rows), beyond it packed.
constexpr int64_t kRowsTokens = 16;
// Packed path: tiles of at most 96 tokens (8 register tiles of 12), so a tile's hidden and mixed
// (tokens x K x r each) stay in L2; batches up to 12 tokens per thread run as one tile. Threads'
// shares are multiples of kShareTokens, so the same tokens fall to AMX for any thread count.
constexpr Tiling kPackedTiling{96, kShareTokens, 24};
// project_rows tasks: this many weight rows each (a multiple of its 4-row step).
constexpr int64_t kRowsPerTask = 16;
// Down-projections to at most this rank, from blocks of at least this many features, take dot
// products along the weight rows even for many tokens: the register tile's 32 columns would be at
// most a quarter full, and each dot product's lane reduction is paid back over 64 elements (from
// 16- or 32-feature blocks, measured slower).
constexpr int64_t kDotsMaxRank = 8;
constexpr int64_t kDotsMinDepth = 64;

template <typename T>
WeightRows<T> row_range(const WeightRows<T>& w, int64_t first, int64_t last) {
  WeightRows<T> part = w;
  part.data += first * w.row_stride;
  part.rows = last - first;
  return part;
}

// fn(block, first_row, last_row) over every block's rows, in tasks of kRowsPerTask rows.
template <typename F>
void for_each_row_task(int64_t blocks, int64_t rows, const F& fn) {
  const int64_t per_block = (rows + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, blocks * per_block, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t block = task / per_block, row = task % per_block * kRowsPerTask;
      fn(block, row, std::min(rows, row + kRowsPerTask));
    }
  });
}

template <typename scalar_t>
void few_tokens(const Layer<scalar_t>& layer, const std::optional<Gate<scalar_t>>& gate,
                const Tensor& x_rows, const float* bias, Tensor& hidden, Tensor& mixed,
                Tensor& out) {
  using T = typename Layer<scalar_t>::T;
  const LinearDims& d = layer.d;
  const int64_t tokens = d.tokens, r = d.rank, x_stride = x_rows.stride(0);
  const T* x = Layer<scalar_t>::data(x_rows);
  T* hid = Layer<scalar_t>::data(hidden);
  T* mid = Layer<scalar_t>::data(mixed);
  T* y = Layer<scalar_t>::data(out);
  for_each_row_task(d.in_blocks, r, [&](int64_t j, int64_t first, int64_t last) {
    projection::project_rows(tokens, x + j * d.in_block, x_stride,
                             row_range(layer.down_rows(j), first, last), nullptr,
                             hid + j * r + first, layer.hidden_row());
  });
  if (gate) {
    gate_tile::mix(gate->rows, hid, mid, tokens);
  } else {
    for_each_row_task(d.out_blocks, r, [&](int64_t i, int64_t first, int64_t last) {
      projection::project_rows(tokens, hid, layer.hidden_row(),
                               row_range(layer.full_rows(i), first, last), nullptr,
                               mid + i * r + first, layer.mixed_row());
    });
  }
  for_each_row_task(d.out_blocks, d.out_block, [&](int64_t i, int64_t first, int64_t last) {
    projection::project_rows(tokens, mid + i * r, layer.mixed_row(),
                             row_range(layer.up_rows(i), first, last),
                             bias ? bias + i * d.out_block + first : nullptr,
                             y + i * d.out_block + first, d.out_features);
  });
}

template <typename scalar_t>
void many_tokens(const Layer<scalar_t>& layer, const Weights& w, const Tensor& x_rows,
                 const float* bias, const Tensor& hidden_all, Tensor& out) {
  using T = typename Layer<scalar_t>::T;
  const LinearDims& d = layer.d;
  const int64_t r = d.rank, x_stride = x_rows.stride(0);
  const at::ScalarType dtype = x_rows.scalar_type();
  const bool down_by_dots = r <= kDotsMaxRank && d.in_block >= kDotsMinDepth;
  const auto down =
      down_by_dots
          ? Packed<T>{}
          : pack_blocks<T>(d.in_blocks, [&](int64_t j) { return layer.down_rows(j); }, dtype);
  const auto up = pack_blocks<T>(d.out_blocks, [&](int64_t i) { return layer.up_rows(i); }, dtype);
  const PackedMixing<scalar_t> mix(layer, w, dtype);
  const T* x = Layer<scalar_t>::data(x_rows);
  T* y = Layer<scalar_t>::data(out);
  // Each thread's tile intermediates, allocated once: allocations inside the loop (each above
  // malloc's mmap threshold) made the threads queue on the kernel's memory map, and measured no
  // faster with 2 threads than with 1.
  const int64_t tile = kPackedTiling.max_tokens;
  const int64_t hidden_size = tile * layer.hidden_row();
  const Tensor scratch =
      at::empty({at::get_num_threads(), hidden_size + tile * layer.mixed_row()}, x_rows.options());
  for_each_token_tile(d.tokens, kPackedTiling, [&](int64_t begin, int64_t end) {
    const int64_t rows = end - begin;
    const Tensor own = scratch[at::get_thread_num()];
    Tensor hidden = hidden_all.defined()
                        ? hidden_all.narrow(0, begin, rows)
                        : own.narrow(0, 0, rows * layer.hidden_row()).view({rows, d.in_blocks, r});
    Tensor mixed =
        own.narrow(0, hidden_size, rows * layer.mixed_row()).view({rows, d.out_blocks, r});
    T* hid = Layer<scalar_t>::data(hidden);
    T* mid = Layer<scalar_t>::data(mixed);
    for (int64_t j = 0; j < d.in_blocks; ++j) {
      const T* x_block = x + begin * x_stride + j * d.in_block;
      if (down_by_dots) {
        projection::project_rows(rows, x_block, x_stride, layer.down_rows(j), nullptr, hid + j * r,
                                 layer.hidden_row());
      } else {
        projection::project_packed(rows, x_block, x_stride, down.block(j), r, d.in_block, nullptr,
                                   hid + j * r, layer.hidden_row());
      }
    }
    mix(hid, mid, rows);
    for (int64_t i = 0; i < d.out_blocks; ++i) {
      projection::project_packed(rows, mid + i * r, layer.mixed_row(), up.block(i), d.out_block, r,
                                 bias ? bias + i * d.out_block : nullptr,
                                 y + begin * d.out_features + i * d.out_block, d.out_features);
    }
  });
}

template <typename scalar_t>
void forward_as(const LinearDims& dims, const Tensor& x_rows, const Weights& w, const Tensor& bias,
                Tensor out, const Tensor& hidden_all) {
  const Layer<scalar_t> layer(dims, w);
  const float* bias_data = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  if (dims.tokens > kRowsTokens) {
    many_tokens(layer, w, x_rows, bias_data, hidden_all, out);
    return;
  }
  std::optional<Gate<scalar_t>> gate;
  if (!layer.full()) gate = Gate<scalar_t>::make(dims, w, /*transposed=*/false, /*by_block=*/true);
  Tensor hidden = hidden_all.defined()
                      ? hidden_all
                      : at::empty({dims.tokens, dims.in_blocks, dims.rank}, x_rows.options());
  Tensor mixed = at::empty({dims.tokens, dims.out_blocks, dims.rank}, x_rows.options());
  few_tokens(layer, gate, x_rows, bias_data, hidden, mixed, out);
}

}  // namespace

bool runs_projected(at::ScalarType dtype) {
  if (dtype == at::kFloat) return projection::runs_float();
  if (dtype == at::kBFloat16) return projection::runs_bfloat16();
  return false;
}

void projected_forward(const LinearDims& dims, const Tensor& x_rows, const Weights& w,
                       const Tensor& bias, const Tensor& out, const Tensor& hidden) {
  if (x_rows.scalar_type() == at::kFloat) {
    forward_as<float>(dims, x_rows, w, bias, out, hidden);
  } else {
    forward_as<c10::BFloat16>(dims, x_rows, w, bias, out, hidden);
  }
}

}  // namespace nanomoe::cpu
