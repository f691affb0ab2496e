// The mixing step on the CPU: dst_d = sum_s G_ds src_s for every token, where src and dst are
// (tokens, blocks, rank) activations. The forward mixes hidden into mixed (d = output block i,
// s = input block j); the backward applies the transposed gate, G_ij^T, to push grad_mixed back
// to grad_hidden (d = j, s = i). Storage is scalar_t; every sum is taken in acc_t (bfloat16 tiles
// are converted to float at the edges, so the loops in gate_rows.cpp see only float / double).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "gate_amx.h"
#include "gate_by_block.h"
#include "gate_rows.h"
#include "gate_tile.h"
#include "matmul.h"
#include "operands.h"
#include "parallel.h"
#include "projection.h"

namespace nanomoe::cpu {

// Full mixing as one dense (K_out * r, K_in * r) matrix acting on a token's concatenated blocks:
// row (i, a), column (j, b) holds mix[i, j, a, b].
inline at::Tensor full_mix_matrix(const at::Tensor& mix) {
  const int64_t k_out = mix.size(0), k_in = mix.size(1), r = mix.size(2);
  return mix.permute({0, 2, 1, 3}).reshape({k_out * r, k_in * r});
}

// t (float32 copies of bfloat16 values) in pairs of bfloat16 along dimension `along`, exactly: its
// entries 2p and 2p + 1 there side by side as the innermost dimension, the first low (an odd
// count's last partner zero), so that each pair reads as one 32-bit element.
inline at::Tensor paired_along(const at::Tensor& t, int64_t along) {
  const int64_t count = t.size(along), after = t.dim() - 1 - along;
  std::vector<int64_t> pad(2 * (after + 1),
                           0);  // constant_pad_nd's order: the last dimension first
  pad.back() = count % 2;
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[along] = (count + 1) / 2;
  sizes.insert(sizes.begin() + along + 1, 2);
  return at::constant_pad_nd(t, pad)
      .reshape(sizes)
      .movedim(along + 1, -1)
      .to(at::kBFloat16)
      .contiguous();
}

// The gate seen from one direction. For diagonal_outer, G_ds = diag(mix_ds) + left_ds right_ds^T;
// transposing swaps the roles of mix_left and mix_right.
template <typename scalar_t>
struct Gate {
  using acc_t = at::opmath_type<scalar_t>;
  Mixing mixing;
  at::Tensor mix, left, right;  // acc_t copies (the weights themselves when scalar_t is acc_t)
  at::Tensor mix_by_block, left_by_block, right_by_block;               // see GateRows, when used
  at::Tensor mix_pairs, left_pairs, right_pairs, left_rank_pairs;       // likewise (in pairs)
  at::Tensor amx_gate, dot_pairs, mix_source_pairs, left_source_pairs;  // likewise
  GateRows<acc_t> rows;  // scalar, diagonal, diagonal_outer
  // full: one (K_dst r, K_src r) matrix, permuted once per call; or, for fewer tokens than the
  // rank (where that copy of K^2 r^2 would cost more than the products), mix read in place.
  at::Tensor matrix;
  bool transposed = false;

  // for_kernels: also lay the gate out as the AVX-512 and AMX kernels read it: by block where
  // mixes_by_block says so (gate_by_block.h), and bfloat16's gates for the tile unit where
  // gate_amx::chosen says so (gate_amx.h).
  static Gate make(const LinearDims& dims, const Weights& w, bool transposed, bool for_kernels) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    Gate g{};
    g.mixing = dims.mixing;
    if (dims.mixing == Mixing::kFull) {
      if (dims.tokens < dims.rank) {
        g.mix = w.mix;
        g.transposed = transposed;
      } else {
        const at::Tensor forward = full_mix_matrix(w.mix);
        g.matrix = transposed ? forward.t() : forward;
      }
      return g;
    }
    g.mix = w.mix.to(acc);
    const bool outer = dims.mixing == Mixing::kDiagonalOuter;
    if (outer) {
      g.left = (transposed ? w.mix_right : w.mix_left).to(acc);
      g.right = (transposed ? w.mix_left : w.mix_right).to(acc);
    }
    g.rows.variant = dims.mixing == Mixing::kScalar ? 0 : outer ? 2 : 1;
    g.rows.rank = dims.rank;
    g.rows.dst_blocks = transposed ? dims.in_blocks : dims.out_blocks;
    g.rows.src_blocks = transposed ? dims.out_blocks : dims.in_blocks;
    g.rows.dst_stride = transposed ? w.mix.stride(1) : w.mix.stride(0);
    g.rows.src_stride = transposed ? w.mix.stride(0) : w.mix.stride(1);
    g.rows.mix = g.mix.template const_data_ptr<acc_t>();
    g.rows.left = outer ? g.left.template const_data_ptr<acc_t>() : nullptr;
    g.rows.right = outer ? g.right.template const_data_ptr<acc_t>() : nullptr;
    if constexpr (std::is_same_v<acc_t, float>) {
      const bool in_pairs =
          std::is_same_v<scalar_t, c10::BFloat16> && for_kernels && !gate_amx::chosen(g.rows);
      if (for_kernels &&
          mixes_by_block(g.rows.variant, dims.rank, g.rows.dst_blocks, dims.tokens, in_pairs)) {
        g.lay_out_by_block(transposed);
      }
    }
    // On AMX, mix takes bfloat16's gates from there, and so do the gradients that gate_amx sums
    // (the rest keep the layouts above).
    // Else a gate laid out by block mixes in pairs where gate_by_block::mixes_in_pairs says, and
    // diagonal_outer's dot products may come from bfloat16 pairs (gate_tile::dots_from_pairs).
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (for_kernels && gate_amx::chosen(g.rows)) {
        g.lay_out_for_amx(w.mix);
      } else if (g.rows.mix_by_block && gate_by_block::mixes_in_pairs(g.rows)) {
        g.lay_out_pairs_by_block(transposed);
      } else if (for_kernels && gate_tile::dots_from_pairs(g.rows, dims.tokens)) {
        const bool with_left = !transposed;  // for the weight gradients
        g.dot_pairs = at::empty({gate_tile::dot_pairs_size(g.rows, with_left)}, w.mix.options());
        gate_tile::lay_out_dot_pairs(g.rows, with_left,
                                     reinterpret_cast<uint16_t*>(g.dot_pairs.mutable_data_ptr()));
        g.lay_out_source_pairs(transposed);
      }
    }
    return g;
  }

  // The bfloat16 gate as gate_amx.h reads it, from the weight mix itself (rows.dst_stride and
  // src_stride are its strides).
  void lay_out_for_amx(const at::Tensor& mix_weight) {
    amx_gate = at::empty({gate_amx::gate_size(rows)}, mix_weight.options());
    uint16_t* gate = reinterpret_cast<uint16_t*>(amx_gate.mutable_data_ptr());
    gate_amx::lay_out(rows, reinterpret_cast<const uint16_t*>(mix_weight.const_data_ptr()), gate);
    rows.amx_gate = gate;
  }

  // The layouts by block again in pairs of bfloat16 (GateRows::mix_pairs_by_block), exactly: the
  // float32 copies hold bfloat16 values. left by rank positions only for the forward gate, whose
  // weight gradients are summed.
  void lay_out_pairs_by_block(bool transposed) {
    const int64_t sources = rows.src_blocks, steps = rows.steps(), lanes = rows.dst_lanes;
    // (s, c, d) -> (s / 2, c, d, s % 2).
    const auto over_sources = [&](const at::Tensor& by_block) {
      return paired_along(by_block.view({sources, steps, lanes}), 0);
    };
    mix_pairs = over_sources(mix_by_block);
    rows.mix_pairs_by_block = bits_of(mix_pairs);
    if (left_by_block.defined()) {
      left_pairs = over_sources(left_by_block);
      // (s, c, d) -> (s, c / 2, d, c % 2); mixes_in_pairs holds the rank even.
      const auto over_ranks = [&](const at::Tensor& by_block) {
        return paired_along(by_block.view({sources, rows.rank, lanes}), 1);
      };
      right_pairs = over_ranks(right_by_block);
      rows.left_pairs_by_block = bits_of(left_pairs);
      rows.right_pairs_by_block = bits_of(right_pairs);
      if (!transposed) {
        left_rank_pairs = over_ranks(left_by_block);
        rows.left_rank_pairs_by_block = bits_of(left_rank_pairs);
      }
    }
  }

  // mix and left in pairs over source blocks (GateRows::mix_source_pairs): (dst, src, c) ->
  // (dst, src / 2, c, src % 2). Forward, the tensors are (dst = i, src = j, c); transposed,
  // (src = i, dst = j, c).
  void lay_out_source_pairs(bool transposed) {
    const auto over_sources = [&](const at::Tensor& t) {
      return paired_along(transposed ? t.transpose(0, 1) : t, 1);
    };
    mix_source_pairs = over_sources(mix);
    rows.mix_source_pairs = bits_of(mix_source_pairs);
    left_source_pairs = over_sources(left);
    rows.left_source_pairs = bits_of(left_source_pairs);
  }

  static const uint32_t* bits_of(const at::Tensor& pairs) {
    return reinterpret_cast<const uint32_t*>(pairs.const_data_ptr());
  }

  // mix, left and right again with the destination block innermost (GateRows::mix_by_block).
  void lay_out_by_block(bool transposed) {
    const int64_t dst = rows.dst_blocks;
    rows.dst_lanes = (dst + kGateLanes - 1) / kGateLanes * kGateLanes;
    // Forward, a tensor is (dst = i, src = j[, c]); transposed, (src = i, dst = j[, c]).
    const auto by_block = [&](const at::Tensor& t) {
      const at::Tensor moved = t.dim() == 2 ? (transposed ? t : t.t())
                               : transposed ? t.permute({0, 2, 1})
                                            : t.permute({1, 2, 0});
      return at::constant_pad_nd(moved, {0, rows.dst_lanes - dst}).contiguous();
    };
    mix_by_block = by_block(mix);
    rows.mix_by_block = mix_by_block.template const_data_ptr<acc_t>();
    if (left.defined()) {
      left_by_block = by_block(left);
      right_by_block = by_block(right);
      rows.left_by_block = left_by_block.template const_data_ptr<acc_t>();
      rows.right_by_block = right_by_block.template const_data_ptr<acc_t>();
    }
  }
};

// Whether gate_tile's AVX-512 kernels take this dtype's elementwise gates here (else gate_rows'
// portable loops, which at 16 tokens, K = 8, r = 256 took as long as the AMX projections).
template <typename scalar_t>
bool tile_gate_runs() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return projection::runs_float();
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return projection::runs_bfloat16();
  } else {
    return false;
  }
}

// t in acc_t: itself when it already is, else a converted copy.
template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// dst = G src for contiguous rows of an elementwise gate: gate_tile's AVX-512 kernels where they
// take this dtype, else gate_rows' portable loops.
template <typename scalar_t>
void mix_rows(const Gate<scalar_t>& g, const at::Tensor& src, const at::Tensor& dst,
              int64_t tokens) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (tile_gate_runs<scalar_t>()) {
      gate_tile::mix(g.rows, elements<scalar_t>(src), mutable_elements<scalar_t>(dst), tokens);
      return;
    }
  }
  gate_rows(g.rows, src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), tokens);
}

// dst = G src for a tile. src: (tokens, src_blocks, r), dst: (tokens, dst_blocks, r), both
// contiguous.
template <typename scalar_t>
void apply_gate(const Gate<scalar_t>& g, const at::Tensor& src, const at::Tensor& dst) {
  const int64_t tokens = src.size(0);
  if (g.mixing == Mixing::kFull) {
    if (g.matrix.defined()) {
      matmul_into(dst.view({tokens, dst.size(1) * dst.size(2)}),
                  src.view({tokens, src.size(1) * src.size(2)}), g.matrix.t());
      return;
    }
    // In place: per destination block d, one batched product over the source blocks, src_s
    // G_ds^T with G_ds = mix[d, s] (forward) or mix[s, d]^T, then their sum. Products and sum in
    // acc_t (bfloat16's gate converted a block row at a time), so the sum is rounded once.
    const auto acc = c10::CppTypeToScalarType<typename Gate<scalar_t>::acc_t>::value;
    const at::Tensor by_block = src.transpose(0, 1).to(acc);  // (src_blocks, tokens, r)
    for (int64_t d = 0; d < dst.size(1); ++d) {
      const at::Tensor gates = g.transposed ? g.mix.select(1, d) : g.mix[d].transpose(1, 2);
      dst.select(1, d).copy_(at::bmm(by_block, gates.to(acc)).sum(0));
    }
    return;
  }
  // Rows are read and written in place; bfloat16 is converted to float32 inside the kernels.
  const at::Tensor src_rows = src.contiguous();
  const bool in_place = dst.is_contiguous();
  const at::Tensor dst_rows = in_place ? dst : at::empty(dst.sizes(), dst.options());
  mix_rows(g, src_rows, dst_rows, tokens);
  if (!in_place) dst.copy_(dst_rows);
}

// Gradients of the gate's weights (left and right: diagonal_outer's, else undefined), in float32
// but for float64's.
struct GateGrads {
  at::Tensor mix, left, right;
};

// An elementwise gate's GateGrads in mix's layout (mix_sizes), from gate_tile's float32 sums.
inline GateGrads tile_grads_as_mix(const GateRows<float>& rows, const float* sums,
                                   at::IntArrayRef mix_sizes) {
  const auto like_mix = [&] { return at::empty(mix_sizes, at::TensorOptions(at::kFloat)); };
  const bool outer = rows.variant == 2;
  GateGrads grads{like_mix(), outer ? like_mix() : at::Tensor(), outer ? like_mix() : at::Tensor()};
  const auto data = [](const at::Tensor& t) {
    return t.defined() ? t.mutable_data_ptr<float>() : nullptr;
  };
  gate_tile::grads_to_mix(rows, sums, data(grads.mix), data(grads.left), data(grads.right));
  return grads;
}

// Gradients of the forward gate's tensors, summed over every token, given the forward's input
// hidden (tokens, K_in, r) and grad_mixed (tokens, K_out, r). Fills those of grad_mix, grad_left,
// grad_right that are defined (contiguous, shaped like mix). Summed by gate_tile's kernels where
// they take the dtype (as the projected backward sums them), else by gate_rows_backward.
template <typename scalar_t>
void gate_backward(const Gate<scalar_t>& g, const at::Tensor& hidden, const at::Tensor& grad_mixed,
                   const at::Tensor& grad_mix, const at::Tensor& grad_left,
                   const at::Tensor& grad_right) {
  using acc_t = typename Gate<scalar_t>::acc_t;
  const int64_t tokens = hidden.size(0);
  if (g.mixing == Mixing::kFull) {
    const int64_t k_out = grad_mixed.size(1), k_in = hidden.size(1), r = hidden.size(2);
    if (g.matrix.defined()) {
      const at::Tensor matrix =
          at::mm(grad_mixed.view({tokens, k_out * r}).t(), hidden.view({tokens, k_in * r}));
      grad_mix.copy_(matrix.view({k_out, r, k_in, r}).permute({0, 2, 1, 3}));
      return;
    }
    // In place: grad_mix[i, j] = grad_mixed_i^T hidden_j, one batched product per i (each a
    // sum over tokens only, rounded once).
    const at::Tensor hidden_by_block = hidden.transpose(0, 1);  // (K_in, tokens, r)
    for (int64_t i = 0; i < k_out; ++i) {
      const at::Tensor grad_i = grad_mixed.select(1, i).t().expand({k_in, r, tokens});
      at::Tensor grad_mix_i = grad_mix[i];
      at::bmm_out(grad_mix_i, grad_i, hidden_by_block);
    }
    return;
  }
  const auto copy_out = [&](const GateGrads& acc) {
    if (grad_mix.defined()) grad_mix.copy_(acc.mix);
    if (grad_left.defined()) grad_left.copy_(acc.left);
    if (grad_right.defined()) grad_right.copy_(acc.right);
  };
  if constexpr (std::is_same_v<acc_t, float>) {
    if (tile_gate_runs<scalar_t>()) {  // float32 sums in gate_tile's layout, then mix's
      const at::Tensor sums = at::zeros({gate_tile::grads_size(g.rows)}, g.mix.options());
      const at::Tensor src = hidden.contiguous(), grad_dst = grad_mixed.contiguous();
      gate_tile::accumulate_grads(g.rows, elements<scalar_t>(src), elements<scalar_t>(grad_dst),
                                  tokens, sums.mutable_data_ptr<float>());
      return copy_out(tile_grads_as_mix(g.rows, sums.const_data_ptr<float>(), g.mix.sizes()));
    }
  }
  const bool outer = g.rows.variant == 2;
  const auto like_mix = [&] { return at::empty(g.mix.sizes(), g.mix.options()); };
  const GateGrads acc{like_mix(), outer ? like_mix() : at::Tensor(),
                      outer ? like_mix() : at::Tensor()};
  const at::Tensor src = as_acc<acc_t>(hidden), grad_dst = as_acc<acc_t>(grad_mixed);
  for_each_block(g.rows.dst_blocks, [&](int64_t d) {
    // For the forward gate, block d's pairs are contiguous in mix at d * dst_stride.
    const int64_t offset = d * g.rows.dst_stride;
    gate_rows_backward(g.rows, src.const_data_ptr<acc_t>(), grad_dst.const_data_ptr<acc_t>(),
                       tokens, d, acc.mix.mutable_data_ptr<acc_t>() + offset,
                       outer ? acc.left.mutable_data_ptr<acc_t>() + offset : nullptr,
                       outer ? acc.right.mutable_data_ptr<acc_t>() + offset : nullptr);
  });
  copy_out(acc);
}

}  // namespace nanomoe::cpu
