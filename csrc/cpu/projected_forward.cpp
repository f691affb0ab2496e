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
#include <type_traits>

#include "amx.h"
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
// Packed path: tiles of at most 96 tokens (8 register tiles of 12, or 4 narrow ones of 24), so a
// tile's hidden and mixed (tokens x K x r each) stay in L2; batches up to 12 tokens per thread run
// as one tile. Threads' shares are multiples of kShareTokens, so the same tokens fall to AMX for
// any thread count.
constexpr Tiling kPackedTiling{96, kShareTokens, 24};
// project_rows tasks: this many weight rows each (a multiple of its 4-row step).
constexpr int64_t kRowsPerTask = 16;
// Down-projections to at most this rank, from blocks of at least this many features, take dot
// products along the weight rows even for many tokens: the register tile's 32 columns would be at
// most a quarter full, and each dot product's lane reduction is paid back over 64 elements (from
// 16- or 32-feature blocks, measured slower).
constexpr int64_t kDotsMaxRank = 8;
constexpr int64_t kDotsMinDepth = 64;

// bfloat16 on AMX (block_group): the down-projections of 32 / r consecutive blocks as one product.
// Block by block, r columns of each 32 were filled and each block's sums stored and rounded apart.
// Measured at 4096 tokens, in = out = 1024, the two alternating in one process (minimum times): the
// forward 8% faster at r = 8, K = 32 (one thread or two), 17% at r = 4, K = 64, 2% at r = 16.
int64_t down_group(const LinearDims& d, at::ScalarType dtype, bool by_dots) {
  return by_dots ? 1 : block_group(d.rank, d.in_blocks, dtype);
}

// Likewise the up-projections, where a block has at most kUpGroupMaxOutputs outputs: block by
// block, each product was one 16-column tile (r deep) and each row of mixed gave it 2 r bytes.
// Measured (4096 tokens, 1024 features, two threads, alternating in one process, medians): the
// forward 0.74x its time at r = 4, K = 128, 0.87x at r = 4, K = 64, 0.88x at r = 8, K = 64, 0.89x
// to 0.96x at r = 16, K = 64; with 32 outputs a block or more 1.04x to 1.09x slower (the weight
// tiles' zero halves are loaded too).
constexpr int64_t kUpGroupMaxOutputs = 16;
int64_t up_group(const LinearDims& d, at::ScalarType dtype) {
  return d.out_block <= kUpGroupMaxOutputs ? block_group(d.rank, d.out_blocks, dtype) : 1;
}

// The packed weights of block_diagonal(weight, group)'s groups.
template <typename T>
Packed<T> pack_groups(const at::Tensor& weight, int64_t group) {
  const at::Tensor diagonal = block_diagonal(weight, group);
  const int64_t rows = diagonal.size(1), depth = diagonal.size(2);
  const T* data = reinterpret_cast<const T*>(diagonal.const_data_ptr());
  return pack_blocks<T>(
      diagonal.size(0),
      [&](int64_t g) {
        return projection::WeightRows<T>{data + g * rows * depth, rows, 1, depth, depth, 0};
      },
      weight.scalar_type());
}

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

// A few tokens' rows: block b's input at in.data + b * in_block (every block's the same when 0),
// its output at out.data + b * out_block, row c of block b adding bias[b * rows + c].
template <typename T>
struct BlockRows {
  T* data;
  int64_t block, stride;
};

// out_b = in_b W_b^T for every block b (W_b = rows_of(b)), in tasks of kRowsPerTask weight rows.
// bfloat16 on AMX: each distinct block input is packed once, before the tasks.
template <typename T, typename RowsOf>
void project_blocks(int64_t tokens, int64_t blocks, BlockRows<const T> in, const RowsOf& rows_of,
                    const float* bias, BlockRows<T> out) {
  const int64_t rows = rows_of(0).rows;
  Tensor packed;
  int64_t packed_block = 0;
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (projection::rows_on_amx(tokens, rows_of(0))) {
      const int64_t inputs = in.block == 0 ? 1 : blocks, depth = rows_of(0).depth();
      packed_block = projection::rows_input_size(rows_of(0));
      packed = at::empty({inputs * packed_block}, at::TensorOptions().dtype(at::kBFloat16));
      for (int64_t b = 0; b < inputs; ++b) {
        projection::pack_rows_input(tokens, in.data + b * in.block, in.stride, depth,
                                    Layer<c10::BFloat16>::data(packed) + b * packed_block);
      }
    }
  }
  for_each_row_task(blocks, rows, [&](int64_t b, int64_t first, int64_t last) {
    const T* in_b = in.data + b * in.block;
    const auto w = row_range(rows_of(b), first, last);
    const float* bias_b = bias ? bias + b * rows + first : nullptr;
    T* out_b = out.data + b * out.block + first;
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (packed.defined()) {
        const T* packed_b = Layer<c10::BFloat16>::data(packed) + (in.block ? b : 0) * packed_block;
        projection::project_rows(tokens, packed_b, in_b, in.stride, w, bias_b, out_b, out.stride);
        return;
      }
    }
    projection::project_rows(tokens, in_b, in.stride, w, bias_b, out_b, out.stride);
  });
}

template <typename scalar_t>
void few_tokens(const Layer<scalar_t>& layer, const std::optional<Gate<scalar_t>>& gate,
                const Tensor& x_rows, const float* bias, Tensor& hidden, Tensor& mixed,
                Tensor& out) {
  using T = typename Layer<scalar_t>::T;
  const LinearDims& d = layer.d;
  const int64_t tokens = d.tokens, r = d.rank;
  const T* x = Layer<scalar_t>::data(x_rows);
  T* hid = Layer<scalar_t>::data(hidden);
  T* mid = Layer<scalar_t>::data(mixed);
  T* y = Layer<scalar_t>::data(out);
  const auto down_rows = [&](int64_t j) { return layer.down_rows(j); };
  project_blocks<T>(tokens, d.in_blocks, {x, d.in_block, x_rows.stride(0)}, down_rows, nullptr,
                    {hid, r, layer.hidden_row()});
  if (gate) {
    gate_tile::mix(gate->rows, hid, mid, tokens);
  } else {  // every output block reads the whole hidden row
    const auto full_rows = [&](int64_t i) { return layer.full_rows(i); };
    project_blocks<T>(tokens, d.out_blocks, {hid, 0, layer.hidden_row()}, full_rows, nullptr,
                      {mid, r, layer.mixed_row()});
  }
  const auto up_rows = [&](int64_t i) { return layer.up_rows(i); };
  project_blocks<T>(tokens, d.out_blocks, {mid, r, layer.mixed_row()}, up_rows, bias,
                    {y, d.out_block, d.out_features});
}

// bfloat16: `rows` tokens through every group of per_group blocks, `chunk` tokens at a time: group
// g's product (weights groups.block(g), per_group blocks deep and wide) reads in's columns from
// g * per_group * in_block and writes out's from g * per_group * out_block (bias likewise).
inline void project_groups(int64_t rows, int64_t chunk, int64_t per_group, int64_t groups_count,
                           const Packed<uint16_t>& groups, const uint16_t* in, int64_t in_stride,
                           int64_t in_block, const float* bias, uint16_t* out, int64_t out_stride,
                           int64_t out_block) {
  for_each_chunk(0, rows, chunk, [&](int64_t c0, int64_t n) {
    for (int64_t g = 0; g < groups_count; ++g) {
      const int64_t first = g * per_group;
      projection::project_packed(n, in + c0 * in_stride + first * in_block, in_stride,
                                 groups.block(g), per_group * out_block, per_group * in_block,
                                 bias ? bias + first * out_block : nullptr,
                                 out + c0 * out_stride + first * out_block, out_stride);
    }
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
  const int64_t down_per_group = down_group(d, dtype, down_by_dots),
                up_per_group = up_group(d, dtype);
  // Grouped, a side's blocks are projected one by one only for a token with an Inf or NaN (by
  // project_rows, their weights in place).
  const auto down =
      down_by_dots || down_per_group > 1
          ? Packed<T>{}
          : pack_blocks<T>(d.in_blocks, [&](int64_t j) { return layer.down_rows(j); }, dtype);
  const auto down_groups =
      down_per_group > 1 ? pack_groups<T>(w.down, down_per_group) : Packed<T>{};
  const auto up =
      up_per_group > 1
          ? Packed<T>{}
          : pack_blocks<T>(d.out_blocks, [&](int64_t i) { return layer.up_rows(i); }, dtype);
  const auto up_groups = up_per_group > 1 ? pack_groups<T>(w.up, up_per_group) : Packed<T>{};
  const PackedMixing<scalar_t> mix(layer, w, dtype);
  const T* x = Layer<scalar_t>::data(x_rows);
  T* y = Layer<scalar_t>::data(out);
  // Each thread's tile intermediates, allocated once: allocations inside the loop (each above
  // malloc's mmap threshold) made the threads queue on the kernel's memory map, and measured no
  // faster with 2 threads than with 1.
  const TokenShares split = token_shares(d.tokens, kPackedTiling);
  const int64_t tile = split.largest_tile(kPackedTiling);
  const int64_t chunk = chunk_tokens<T>();
  const int64_t hidden_size = tile * layer.hidden_row();
  const Tensor scratch =
      at::empty({split.slots(), hidden_size + tile * layer.mixed_row()}, x_rows.options());
  for_each_token_tile(d.tokens, kPackedTiling, [&](int64_t begin, int64_t end) {
    const int64_t rows = end - begin;
    const Tensor own = scratch[split.slot_of(begin)];
    Tensor hidden = hidden_all.defined()
                        ? hidden_all.narrow(0, begin, rows)
                        : own.narrow(0, 0, rows * layer.hidden_row()).view({rows, d.in_blocks, r});
    Tensor mixed =
        own.narrow(0, hidden_size, rows * layer.mixed_row()).view({rows, d.out_blocks, r});
    T* hid = Layer<scalar_t>::data(hidden);
    T* mid = Layer<scalar_t>::data(mixed);
    std::optional<amx::Tiles> tile_unit;  // nothing below configures the tile unit otherwise
    hold_tile_unit<T>(tile_unit);
    // By dots, a few tokens go through every block before the next ones: each block reads two
    // cache lines of every token's row, and a chunk of 24 rows (8 KiB apart at 4096 features) left
    // the dots waiting on those loads (NOTES, version 109: at K = 64, r = 4 the forward 0.68x its
    // time in bfloat16, 0.82x in float32).
    const int64_t down_chunk = down_by_dots ? projection::kDotTokens : chunk;
    // Tokens [first, first + count) of the tile, chunk by chunk, block by block.
    const auto down_by_blocks = [&](int64_t first, int64_t count) {
      for_each_chunk(first, first + count, down_chunk, [&](int64_t c0, int64_t n) {
        const T* x_first = x + (begin + c0) * x_stride;
        T* hid_first = hid + c0 * layer.hidden_row();
        for (int64_t j = 0; j < d.in_blocks; ++j) {
          if (down_by_dots || down_per_group > 1) {
            projection::project_rows(n, x_first + j * d.in_block, x_stride, layer.down_rows(j),
                                     nullptr, hid_first + j * r, layer.hidden_row());
          } else {
            projection::project_packed(n, x_first + j * d.in_block, x_stride, down.block(j), r,
                                       d.in_block, nullptr, hid_first + j * r, layer.hidden_row());
          }
        }
      });
    };
    const auto up_by_blocks = [&](int64_t first, int64_t count) {
      for_each_chunk(first, first + count, chunk, [&](int64_t c0, int64_t n) {
        const T* mid_first = mid + c0 * layer.mixed_row();
        T* y_first = y + (begin + c0) * d.out_features;
        for (int64_t i = 0; i < d.out_blocks; ++i) {
          const float* bias_i = bias ? bias + i * d.out_block : nullptr;
          if (up_per_group > 1) {
            projection::project_rows(n, mid_first + i * r, layer.mixed_row(), layer.up_rows(i),
                                     bias_i, y_first + i * d.out_block, d.out_features);
          } else {
            projection::project_packed(n, mid_first + i * r, layer.mixed_row(), up.block(i),
                                       d.out_block, r, bias_i, y_first + i * d.out_block,
                                       d.out_features);
          }
        }
      });
    };
    if (down_per_group == 1) {
      down_by_blocks(0, rows);
    } else if constexpr (std::is_same_v<T, uint16_t>) {
      project_groups(rows, chunk, down_per_group, d.in_blocks / down_per_group, down_groups,
                     x + begin * x_stride, x_stride, d.in_block, nullptr, hid, layer.hidden_row(),
                     r);
      for_each_non_finite_row(rows, layer.hidden_row(), hid,
                              [&](int64_t t) { down_by_blocks(t, 1); });
    }
    mix(hid, mid, rows);
    if (up_per_group == 1) {
      up_by_blocks(0, rows);
    } else if constexpr (std::is_same_v<T, uint16_t>) {
      project_groups(rows, chunk, up_per_group, d.out_blocks / up_per_group, up_groups, mid,
                     layer.mixed_row(), r, bias, y + begin * d.out_features, d.out_features,
                     d.out_block);
      for_each_non_finite_row(rows, layer.mixed_row(), mid, [&](int64_t t) { up_by_blocks(t, 1); });
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
  // The few-token path reads only the full gate as a matrix (mix in place): the elementwise gates
  // run their own kernels there, dense or not for many tokens.
  if (dims.mixing != Mixing::kFull)
    gate = Gate<scalar_t>::make(dims, w, /*transposed=*/false, /*for_kernels=*/true);
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
