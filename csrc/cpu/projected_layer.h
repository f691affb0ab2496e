// What the forward and backward on the kernels of projection.h share: the element type they see,
// the layer's weights as weight rows, and weights packed once per call.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "../checks.h"
#include "amx.h"
#include "dense_gate.h"
#include "gate.h"
#include "gate_tile.h"
#include "operands.h"
#include "projection.h"

namespace nanomoe::cpu {

// The projections' token tiles start at multiples of this, a multiple of the register tile's 12
// rows and of AMX's 16: a token's products then go to AMX or to the register tile (which sum in
// different orders) whatever the thread count, so results stay bitwise the same for any count.
constexpr int64_t kShareTokens = 48;

// A token tile's products pass through every block a chunk of tokens at a time (off AMX, the
// narrow register tile's 24; on AMX, one block of 32), so that each token's rows of the activations
// are read and written front to back. Block by block over the whole tile, each block touched one
// cache line of every token's row, each row in another 4 KiB page, where the prefetchers do not
// follow, and each output line was a store miss of its own: NOTES, version 29 (the register tile)
// and version 82 (AMX: at 2048 features, the backward 0.78x and the forward 0.85x its time with
// whole tiles of 96 and 192 tokens; at 1024 features, 2 KiB rows, no change). Chunks are whole AMX
// blocks, so the same tokens go to AMX as with whole tiles, and the results keep their bits.
template <typename T>
int64_t chunk_tokens() {
  constexpr int64_t kChunkTokens = 24;
  return std::is_same_v<T, uint16_t> && amx::available() ? amx::kTokens : kChunkTokens;
}

// bfloat16 on AMX: the tile unit held for a token tile, so that its products keep one configuration
// from block to block instead of configuring and releasing it per block.
template <typename T>
void hold_tile_unit(std::optional<amx::Tiles>& unit) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (amx::available()) unit.emplace();
  }
}

// fn(first, count) over tokens [begin, end), chunk tokens at a time.
template <typename F>
void for_each_chunk(int64_t begin, int64_t end, int64_t chunk, const F& fn) {
  for (int64_t first = begin; first < end; first += chunk) fn(first, std::min(chunk, end - first));
}

// bfloat16 on AMX, a rank dividing 32 (the AMX block's columns, and one 32-deep step): 32 / r
// consecutive blocks' products with the rank on one side (the down-projections and grad_mixed: r
// columns; the up-projections: r deep) may run as one product with their block-diagonal weight
// (block_diagonal), where the callers' measurements say. The products are as many (the zeros are
// multiplied too) and the zeros add exact zeros, but for an Inf or NaN in the input: 0 * Inf would
// put NaN in the group's other blocks, so a token with one where the group's product reads or
// writes its rank-side rows is projected again block by block (for_each_non_finite_row). Where the
// check reads the product's output, a non-finite weight makes every token's row non-finite, and
// every token is then projected again, one at a time: slower, still right. Returns 1 where not
// grouped.
inline int64_t block_group(int64_t rank, int64_t blocks, at::ScalarType dtype) {
  constexpr int64_t kColumns = 32;
  const int64_t group = kColumns / rank;
  const bool groups = dtype == at::kBFloat16 && rank < kColumns && kColumns % rank == 0 &&
                      blocks % group == 0 && amx::available();
  return groups ? group : 1;
}

// Groups of `group` consecutive blocks of a (blocks, rows, cols) weight as (blocks / group, group
// rows, group cols) block-diagonal matrices: block g * group + k at rows and columns k, zeros
// elsewhere.
inline at::Tensor block_diagonal(const at::Tensor& weight, int64_t group) {
  const int64_t rows = weight.size(1), cols = weight.size(2), groups = weight.size(0) / group;
  const at::Tensor diagonal = at::zeros({groups, group * rows, group * cols}, weight.options());
  const at::Tensor by_group = weight.view({groups, group, rows, cols});
  for (int64_t k = 0; k < group; ++k) {
    diagonal.narrow(1, k * rows, rows).narrow(2, k * cols, cols).copy_(by_group.select(1, k));
  }
  return diagonal;
}

// fn(t) for each of `rows` contiguous rows of `row` bfloat16 values at data that holds an Inf or a
// NaN: the rows checked at once first (row by row, the checks took 3% of the forward at K = 64,
// r = 16), then, only where one is not finite, row by row, so that which tokens are redone does
// not depend on the tiling.
template <typename Fn>
void for_each_non_finite_row(int64_t rows, int64_t row, const uint16_t* data, const Fn& fn) {
  if (projection::all_finite(rows * row, data)) return;
  for (int64_t t = 0; t < rows; ++t) {
    if (!projection::all_finite(row, data + t * row)) fn(t);
  }
}

// The layer's weights as the projections read them, and its intermediates' row lengths.
template <typename scalar_t>
struct Layer {
  using T = typename Element<scalar_t>::type;
  const LinearDims& d;
  const T* down;
  const T* mix;
  const T* up;
  bool dense_gate;  // the gate runs as one dense matrix (dense_gate.h), for many tokens

  Layer(const LinearDims& dims, const Weights& w)
      : d(dims),
        down(data(w.down)),
        mix(data(w.mix)),
        up(data(w.up)),
        dense_gate(mixes_densely(dims, w.mix.scalar_type())) {}

  static const T* data(const at::Tensor& t) { return elements<scalar_t>(t); }
  static T* data(at::Tensor& t) { return mutable_elements<scalar_t>(t); }

  int64_t hidden_row() const { return d.in_blocks * d.rank; }
  int64_t mixed_row() const { return d.out_blocks * d.rank; }

  // down[j]: r rows of n_b.
  projection::WeightRows<T> down_rows(int64_t j) const {
    return {down + j * d.rank * d.in_block, d.rank, 1, d.in_block, d.in_block, 0};
  }
  // up[i]: m_b rows of r.
  projection::WeightRows<T> up_rows(int64_t i) const {
    return {up + i * d.out_block * d.rank, d.out_block, 1, d.rank, d.rank, 0};
  }
  // The full gate into output block i: row a is mix[i, j, a, :] for every j, one segment per j.
  projection::WeightRows<T> full_rows(int64_t i) const {
    const int64_t r = d.rank;
    return {mix + i * d.in_blocks * r * r, r, d.in_blocks, r, r, r * r};
  }
};

// Every block's weight rows packed, one after another.
template <typename T>
struct Packed {
  at::Tensor storage;
  int64_t per_block = 0;
  const T* block(int64_t b) const {
    return reinterpret_cast<const T*>(storage.const_data_ptr()) + b * per_block;
  }
};

template <typename T, typename RowsOf>
Packed<T> pack_blocks(int64_t blocks, const RowsOf& rows_of, at::ScalarType dtype) {
  Packed<T> packed;
  packed.per_block = projection::packed_size(rows_of(0));
  packed.storage = at::empty({blocks * packed.per_block}, at::TensorOptions().dtype(dtype));
  T* data = reinterpret_cast<T*>(packed.storage.mutable_data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      projection::pack(rows_of(b), data + b * packed.per_block);
    }
  });
  return packed;
}

// The forward gate for many tokens: the elementwise gates by gate_tile (AVX-512, or AMX), or a
// dense gate as one register-tiled projection of the whole (K_out r, K_in r) matrix, packed once
// per call (per output block, a small rank would leave most of each 32-column panel empty).
template <typename scalar_t>
struct PackedMixing {
  using T = typename Layer<scalar_t>::T;
  const Layer<scalar_t>& layer;
  std::optional<Gate<scalar_t>> gate;  // the elementwise gates
  Packed<T> dense_matrix;              // a dense gate's matrix

  // made: a dense gate's matrix (dense_gate_matrix, contiguous) where the caller has it already.
  PackedMixing(const Layer<scalar_t>& layer_in, const Weights& w, at::ScalarType dtype,
               const at::Tensor& made = {})
      : layer(layer_in) {
    if (!layer.dense_gate) {
      gate = Gate<scalar_t>::make(layer.d, w, /*transposed=*/false, /*for_kernels=*/true);
    } else {
      const at::Tensor matrix = made.defined() ? made : dense_gate_matrix(layer.d, w).contiguous();
      const projection::WeightRows<T> rows{Layer<scalar_t>::data(matrix),
                                           layer.mixed_row(),
                                           1,
                                           layer.hidden_row(),
                                           layer.hidden_row(),
                                           0};
      dense_matrix = pack_blocks<T>(1, [&](int64_t) { return rows; }, dtype);
    }
  }

  // mixed = G hidden for `tokens` contiguous rows of each.
  void operator()(const T* hidden, T* mixed, int64_t tokens) const {
    if (gate) {
      gate_tile::mix(gate->rows, hidden, mixed, tokens);
      return;
    }
    projection::project_packed(tokens, hidden, layer.hidden_row(), dense_matrix.block(0),
                               layer.mixed_row(), layer.hidden_row(), nullptr, mixed,
                               layer.mixed_row());
  }
};

}  // namespace nanomoe::cpu
