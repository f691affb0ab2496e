// The backward of a token tile on one core, like the forward (projected_forward.cpp): grad_mixed
// = grad_out blocks x up, the forward's mixed recomputed from the saved hidden, grad_hidden =
// G^T grad_mixed and grad_x = grad_hidden blocks x down, the products on the register tile (or AMX)
// with the weights read by steps (in place in float32, paired once per call in bfloat16), the
// elementwise gates by gate_tile, a dense gate (dense_gate.h) as one more product. Between them,
// the tile's share of every weight gradient is added into its thread's float32 sums, reduced once
// at the end; so nothing of tokens x features is allocated besides grad_x, and every product is
// summed in float32 before its one rounding.
#include "projected_backward.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "dense_gate.h"
#include "gate.h"
#include "gate_tile.h"
#include "parallel.h"
#include "projected_layer.h"
#include "projection.h"

namespace nanomoe::cpu {
namespace {

using at::Tensor;
using projection::Steps;

// Token tiles: each adds its share of every weight gradient (a product as deep as the tile) into
// its thread's float32 sums, read and written once per tile. Tiles of 96 tokens keep a tile's x,
// grad_out, their paired copies and its intermediates in L2 from one product to the next (with
// 192, x's and grad_out's alone filled it); where the sums take more bytes than those copies of x
// and grad_out, tiles of 192 halve the sums' traffic instead (NOTES, version 60). The tiles set
// the order of the weight gradients' sums, so their bits follow what sets the sums' size too: the
// shape, which gradients are asked for, and the gate's layout (on AMX or not).
constexpr Tiling kBackwardTiling{96, kShareTokens, 24};
constexpr Tiling kLargeSumsTiling{192, kShareTokens, 24};
template <typename T>
const Tiling& backward_tiling(const LinearDims& d, int64_t sums_floats) {
  const int64_t copies_bytes =
      2 * kBackwardTiling.max_tokens * (d.in_features + d.out_features) * int64_t(sizeof(T));
  return sums_floats * int64_t(sizeof(float)) > copies_bytes ? kLargeSumsTiling : kBackwardTiling;
}

// Elements a (rows, cols) matrix needs as Steps: none in float32, read in place.
template <typename T>
int64_t steps_size(int64_t rows, int64_t cols) {
  return projection::kElementsPerStep<T> == 1 ? 0 : projection::paired_size(rows, cols);
}

// A (rows, cols) row-major matrix as Steps: float32 in place, bfloat16 paired into buffer.
template <typename T>
Steps<T> as_steps(int64_t rows, int64_t cols, const T* data, int64_t stride, T* buffer) {
  if constexpr (projection::kElementsPerStep<T> == 1) {
    return {data, stride};
  } else {
    projection::pair_steps(rows, cols, data, stride, buffer, 2 * cols);
    return {buffer, cols};
  }
}

// The token tiles of x and grad_out, a weight-gradient product's wide operand, read a row (a pair
// row in bfloat16) per step. Rows a multiple of 2 KiB apart all fall in the same few L1 sets, so
// a panel of them left L1 before the next column tile read it again (half of float32's product
// samples waited on those loads; in bfloat16 each AMX tile load took 16 pair rows 4 KiB apart):
// float32's are copied at a padded stride (NOTES, version 43), bfloat16's paired at one.
constexpr int64_t kSpread = 16;  // elements (bfloat16: pairs) past each such row
template <typename T>
int64_t spread_cols(int64_t cols) {
  const int64_t row_bytes = projection::kElementsPerStep<T> * cols * int64_t(sizeof(T));
  return row_bytes % 2048 == 0 ? cols + kSpread : cols;
}
template <typename T>
int64_t token_tile_size(int64_t rows, int64_t cols) {
  return projection::kElementsPerStep<T> == 1 ? rows * spread_cols<T>(cols)
                                              : projection::paired_size(rows, spread_cols<T>(cols));
}
// column_sums, when given, gets each column's sum over the rows added: the bias gradient (in
// bfloat16 summed while grad_out is paired anyway).
template <typename T>
Steps<T> token_tile(int64_t rows, int64_t cols, const T* data, int64_t stride, T* buffer,
                    float* column_sums = nullptr) {
  const int64_t spread = spread_cols<T>(cols);
  if constexpr (projection::kElementsPerStep<T> == 1) {
    if (column_sums) projection::accumulate_columns(rows, cols, data, stride, column_sums);
    if (stride * static_cast<int64_t>(sizeof(T)) % 2048 != 0) return {data, stride};
    for (int64_t t = 0; t < rows; ++t) std::copy_n(data + t * stride, cols, buffer + t * spread);
  } else if (column_sums) {
    projection::pair_steps_summing(rows, cols, data, stride, buffer, 2 * spread, column_sums);
  } else {
    projection::pair_steps(rows, cols, data, stride, buffer, 2 * spread);
  }
  return {buffer, spread};
}

// Columns c onward.
template <typename T>
Steps<T> from_column(Steps<T> s, int64_t c) {
  return {s.data + c * projection::kElementsPerStep<T>, s.stride};
}

// Per-thread memory carved into 64-byte aligned pieces.
struct Carve {
  char* at;
  template <typename U>
  U* take(int64_t count) {
    U* piece = reinterpret_cast<U*>(at);
    at += (count * static_cast<int64_t>(sizeof(U)) + 63) / 64 * 64;
    return piece;
  }
  template <typename U>
  static int64_t bytes(int64_t count) {
    return (count * static_cast<int64_t>(sizeof(U)) + 63) / 64 * 64;
  }
};

// Where each gradient's float32 sums sit in a thread's row of sums. gate: the size of the gate's
// sums (a dense gate's in (i, a) x (j, b) order, the elementwise gates' as gate_tile lays them
// out).
struct SumsLayout {
  int64_t down, up, mix, bias, size;
  SumsLayout(const LinearDims& d, int64_t gate) {
    down = 0;
    up = down + d.in_blocks * d.rank * d.in_block;
    mix = up + d.out_blocks * d.out_block * d.rank;
    bias = mix + gate;
    size = bias + d.out_features;
  }
};

// bfloat16 on AMX, a rank of 8 or less (block_group): grad_mixed's products of 32 / r blocks of
// grad_out as one, with their block-diagonal up, where each block's product filled r of 32 columns.
// Measured (the backward's time, two threads, alternating in one process, medians): 0.85x at
// r = 8, K = 32 and 0.88x at r = 4, K = 64 (4096 tokens, 1024 features), 0.85x and 0.87x at 4096
// features (1024 tokens); at r = 16 0.98x with 16 features a block but 1.09x with 128. grad_x's
// products grouped likewise (r deep, 16 features a block or fewer, as the forward's up-projections)
// measured 0.98x to 1.05x: not grouped.
constexpr int64_t kGradMixedGroupMaxRank = 8;
int64_t grad_mixed_group(const LinearDims& d, at::ScalarType dtype) {
  return d.rank <= kGradMixedGroupMaxRank ? block_group(d.rank, d.out_blocks, dtype) : 1;
}

template <typename scalar_t>
Grads backward_as(const LinearDims& d, const Tensor& grad_rows, const Tensor& x_rows,
                  const Weights& w, const Tensor& hidden,
                  const std::array<bool, kNumInputs>& needs) {
  using T = typename Layer<scalar_t>::T;
  const Layer<scalar_t> layer(d, w);
  const at::ScalarType dtype = x_rows.scalar_type();
  const int64_t r = d.rank, n_b = d.in_block, m_b = d.out_block;
  const int64_t hidden_row = layer.hidden_row(), mixed_row = layer.mixed_row();
  const bool need_gate = needs[kMix] || needs[kMixLeft] || needs[kMixRight];
  const bool need_grad_hidden = needs[kX] || needs[kDown];
  const bool need_grad_mixed = need_grad_hidden || need_gate;

  // The forward gate (for mixed and the gate's gradients) and the transposed one (grad_hidden);
  // a dense gate's matrix made once for both.
  const Tensor dense_matrix = layer.dense_gate ? dense_gate_matrix(d, w).contiguous() : Tensor();
  const PackedMixing<scalar_t> mix(layer, w, dtype, dense_matrix);
  std::optional<Gate<scalar_t>> gate_t;
  if (!layer.dense_gate && need_grad_hidden)
    gate_t = Gate<scalar_t>::make(d, w, /*transposed=*/true, /*for_kernels=*/true);

  // The weights by steps: up[i] (m_b steps of r), down[j] (r steps of n_b), and a dense gate as
  // one matrix (K_out r steps (i, a) of K_in r columns (j, b)), so grad_hidden is one product with
  // every column in the lanes, however small the rank.
  // And up in groups of blocks where grad_mixed's products run so (grad_mixed_group).
  const int64_t up_per_group = need_grad_mixed ? grad_mixed_group(d, dtype) : 1;
  const Tensor up_groups = up_per_group > 1 ? block_diagonal(w.up, up_per_group) : Tensor();
  const bool dense_t_needed = layer.dense_gate && need_grad_hidden;
  const int64_t up_size = steps_size<T>(m_b, r), down_size = steps_size<T>(r, n_b);
  const int64_t up_group_size =
      up_per_group > 1 ? steps_size<T>(up_per_group * m_b, up_per_group * r) : 0;
  const int64_t dense_size = dense_t_needed ? steps_size<T>(mixed_row, hidden_row) : 0;
  const int64_t groups_size = d.out_blocks / up_per_group * up_group_size;
  Tensor paired =
      at::empty({d.out_blocks * up_size + d.in_blocks * down_size + groups_size + dense_size},
                x_rows.options());
  T* paired_at = Layer<scalar_t>::data(paired);
  std::vector<Steps<T>> up_steps, down_steps, up_group_steps;
  Steps<T> dense_steps{};
  for (int64_t i = 0; i < d.out_blocks; ++i) {
    up_steps.push_back(as_steps(m_b, r, layer.up + i * m_b * r, r, paired_at + i * up_size));
  }
  paired_at += d.out_blocks * up_size;
  for (int64_t j = 0; j < d.in_blocks; ++j) {
    down_steps.push_back(
        as_steps(r, n_b, layer.down + j * r * n_b, n_b, paired_at + j * down_size));
  }
  paired_at += d.in_blocks * down_size;
  // Each group's block-diagonal matrix as Steps: (group m_b) steps of (group r).
  for (int64_t g = 0; up_groups.defined() && g < up_groups.size(0); ++g) {
    const int64_t rows = up_groups.size(1), cols = up_groups.size(2);
    const T* data = reinterpret_cast<const T*>(up_groups.const_data_ptr()) + g * rows * cols;
    up_group_steps.push_back(as_steps(rows, cols, data, cols, paired_at));
    paired_at += up_group_size;
  }
  if (dense_t_needed) {
    dense_steps =
        as_steps(mixed_row, hidden_row, Layer<scalar_t>::data(dense_matrix), hidden_row, paired_at);
  }

  // Each share's scratch for one tile, and its float32 sums of the weight gradients: sized for
  // the tiles and shares this call has (a few tokens take one small tile, in one share).
  const int64_t gate_sums_size = !need_gate         ? 0
                                 : layer.dense_gate ? mixed_row * hidden_row
                                                    : gate_tile::grads_size(mix.gate->rows);
  const SumsLayout at_sums(d, gate_sums_size);
  const Tiling& tiling = backward_tiling<T>(d, at_sums.size);
  const TokenShares split = token_shares(d.tokens, tiling);
  const int64_t tile = split.largest_tile(tiling), slots = split.slots();
  const int64_t chunk = chunk_tokens<T>();
  const bool elementwise_gate = need_gate && !layer.dense_gate;
  const int64_t scratch_bytes =
      2 * Carve::bytes<T>(tile * mixed_row) + Carve::bytes<T>(tile * hidden_row) +
      Carve::bytes<T>(token_tile_size<T>(tile, d.in_features)) +
      Carve::bytes<T>(token_tile_size<T>(tile, d.out_features)) +
      2 * Carve::bytes<T>(steps_size<T>(tile, std::max(hidden_row, mixed_row)));
  const Tensor scratch = at::empty({slots, scratch_bytes}, at::TensorOptions().dtype(at::kByte));
  // One tensor per share, so that the gradients returned as views of the first (float32) keep
  // only it alive.
  std::vector<Tensor> sums;
  for (int64_t slot = 0; slot < slots; ++slot) {
    sums.push_back(at::zeros({at_sums.size}, at::TensorOptions().dtype(at::kFloat)));
  }

  const T* x = Layer<scalar_t>::data(x_rows);
  const T* grad = Layer<scalar_t>::data(grad_rows);
  const T* hid = Layer<scalar_t>::data(hidden);
  const int64_t x_stride = x_rows.stride(0), grad_stride = grad_rows.stride(0);
  Tensor grad_x = needs[kX] ? at::empty({d.tokens, d.in_features}, x_rows.options()) : Tensor();
  T* gx = needs[kX] ? Layer<scalar_t>::data(grad_x) : nullptr;

  for_each_token_tile(d.tokens, tiling, [&](int64_t begin, int64_t end) {
    const int64_t rows = end - begin, slot = split.slot_of(begin);
    Carve carve{reinterpret_cast<char*>(scratch[slot].mutable_data_ptr())};
    float* own_sums = sums[slot].mutable_data_ptr<float>();
    const T* go = grad + begin * grad_stride;
    const T* h = hid + begin * hidden_row;
    std::optional<amx::Tiles> tile_unit;  // nothing below configures the tile unit otherwise
    hold_tile_unit<T>(tile_unit);

    T* gm = carve.take<T>(tile * mixed_row);
    // Tokens [first, first + count) of the tile, chunk by chunk, per_group blocks at a time (1 or
    // up_per_group).
    const auto grad_mixed_by = [&](int64_t per_group, int64_t first, int64_t count) {
      const std::vector<Steps<T>>& steps = per_group > 1 ? up_group_steps : up_steps;
      for_each_chunk(first, first + count, chunk, [&](int64_t c0, int64_t n) {
        for (int64_t i = 0; i < d.out_blocks; i += per_group) {
          projection::project_steps(n, go + c0 * grad_stride + i * m_b, grad_stride,
                                    steps[i / per_group], per_group * r, per_group * m_b,
                                    gm + c0 * mixed_row + i * r, mixed_row);
        }
      });
    };
    if (need_grad_mixed) {
      grad_mixed_by(up_per_group, 0, rows);
      if constexpr (std::is_same_v<T, uint16_t>) {
        if (up_per_group > 1) {
          for_each_non_finite_row(rows, mixed_row, gm, [&](int64_t t) { grad_mixed_by(1, t, 1); });
        }
      }
    }
    T* mid = carve.take<T>(tile * mixed_row);
    T* gh = carve.take<T>(tile * hidden_row);
    T* x_buffer = carve.take<T>(token_tile_size<T>(tile, d.in_features));
    T* grad_buffer = carve.take<T>(token_tile_size<T>(tile, d.out_features));
    T* first_buffer = carve.take<T>(steps_size<T>(tile, std::max(hidden_row, mixed_row)));
    T* second_buffer = carve.take<T>(steps_size<T>(tile, std::max(hidden_row, mixed_row)));
    // The weight gradients (sums over the tile's tokens, the steps of each product) each taken
    // while its inputs are still in L2: up's soon after grad_mixed read the tile's grad_out (taken
    // last, it came back from memory: NOTES, version 60), down's after grad_hidden and grad_x.
    // up's sums are up[i] transposed: the narrow mixed is the side AMX transposes.
    // bfloat16's elementwise gates, where all three of their passes run, run them at once first
    // (gate_tile::backward_passes): mixed for up's weight gradient, the gate's, grad_hidden.
    bool together = false;
    if constexpr (std::is_same_v<T, uint16_t>) {
      together = elementwise_gate && gate_t && needs[kUp] &&
                 gate_tile::passes_together(mix.gate->rows, gate_t->rows);
      if (together) {
        gate_tile::backward_passes(mix.gate->rows, gate_t->rows, h, gm, rows,
                                   own_sums + at_sums.mix, mid, gh);
      }
    }
    if (needs[kUp]) {
      if (!together) mix(h, mid, rows);  // the forward's mixed, again
      float* bias_sums = needs[kBias] ? own_sums + at_sums.bias : nullptr;
      const auto grad_tile =
          token_tile(rows, d.out_features, go, grad_stride, grad_buffer, bias_sums);
      const auto mixed =
          as_steps(rows, mixed_row, static_cast<const T*>(mid), mixed_row, second_buffer);
      for (int64_t i = 0; i < d.out_blocks; ++i) {
        projection::accumulate_products(rows, from_column(mixed, i * r), r,
                                        from_column(grad_tile, i * m_b), m_b,
                                        own_sums + at_sums.up + i * r * m_b, m_b);
      }
    } else if (needs[kBias]) {  // else summed with up's, by token_tile
      projection::accumulate_columns(rows, d.out_features, go, grad_stride,
                                     own_sums + at_sums.bias);
    }
    if (elementwise_gate && !together) {
      gate_tile::accumulate_grads(mix.gate->rows, h, gm, rows, own_sums + at_sums.mix);
    }
    if (need_gate && layer.dense_gate) {  // (i, a) x (j, b) sums, in mix's layout at the end
      const auto grad_mixed =
          as_steps(rows, mixed_row, static_cast<const T*>(gm), mixed_row, first_buffer);
      const auto hidden_tile = as_steps(rows, hidden_row, h, hidden_row, second_buffer);
      projection::accumulate_products(rows, grad_mixed, mixed_row, hidden_tile, hidden_row,
                                      own_sums + at_sums.mix, hidden_row);
    }
    if (need_grad_hidden) {
      if (gate_t) {
        if (!together) gate_tile::mix(gate_t->rows, gm, gh, rows);
      } else {
        projection::project_steps(rows, gm, mixed_row, dense_steps, hidden_row, mixed_row, gh,
                                  hidden_row);
      }
    }
    if (needs[kX]) {
      for_each_chunk(0, rows, chunk, [&](int64_t c0, int64_t n) {
        for (int64_t j = 0; j < d.in_blocks; ++j) {
          projection::project_steps(n, gh + c0 * hidden_row + j * r, hidden_row, down_steps[j], n_b,
                                    r, gx + (begin + c0) * d.in_features + j * n_b, d.in_features);
        }
      });
    }
    if (needs[kDown]) {
      const auto grad_hidden = as_steps(rows, hidden_row, gh, hidden_row, first_buffer);
      const auto x_tile = token_tile(rows, d.in_features, x + begin * x_stride, x_stride, x_buffer);
      for (int64_t j = 0; j < d.in_blocks; ++j) {
        projection::accumulate_products(rows, from_column(grad_hidden, j * r), r,
                                        from_column(x_tile, j * n_b), n_b,
                                        own_sums + at_sums.down + j * r * n_b, n_b);
      }
    }
  });

  // Every share's sums, added in order into the first's (a fresh total would be one more set of
  // float32 weight gradients at the backward's peak), rounded once to the weights' dtype.
  const Tensor total = sums[0];
  for (int64_t slot = 1; slot < slots; ++slot) total.add_(sums[slot]);
  sums.clear();
  // The gate's gradients in float32: mix's, then diagonal_outer's left's and right's.
  GateGrads gate_grads;
  if (need_gate && layer.dense_gate) {
    gate_grads = dense_gate_grads(d, w, total.narrow(0, at_sums.mix, mixed_row * hidden_row));
  } else if (elementwise_gate) {
    gate_grads = tile_grads_as_mix(mix.gate->rows, total.const_data_ptr<float>() + at_sums.mix,
                                   w.mix.sizes());
  }
  const auto rounded = [&](bool needed, const Tensor& sums) {
    // One copy, rounded and laid out contiguously at once (a view of sums already so: none).
    return needed ? sums.to(dtype, false, false, at::MemoryFormat::Contiguous) : Tensor();
  };
  // up's sums are up[i] transposed.
  const Tensor up_sums =
      total.narrow(0, at_sums.up, w.up.numel()).view({d.out_blocks, r, m_b}).transpose(1, 2);
  return {grad_x,
          rounded(needs[kDown], total.narrow(0, at_sums.down, w.down.numel()).view(w.down.sizes())),
          rounded(needs[kMix], gate_grads.mix),
          rounded(needs[kUp], up_sums),
          rounded(needs[kBias], total.narrow(0, at_sums.bias, d.out_features)),
          rounded(needs[kMixLeft], gate_grads.left),
          rounded(needs[kMixRight], gate_grads.right)};
}

}  // namespace

Grads projected_backward(const LinearDims& dims, const Tensor& grad_rows, const Tensor& x_rows,
                         const Weights& w, const Tensor& hidden,
                         const std::array<bool, kNumInputs>& needs) {
  if (x_rows.scalar_type() == at::kFloat) {
    return backward_as<float>(dims, grad_rows, x_rows, w, hidden, needs);
  }
  return backward_as<c10::BFloat16>(dims, grad_rows, x_rows, w, hidden, needs);
}

}  // namespace nanomoe::cpu
