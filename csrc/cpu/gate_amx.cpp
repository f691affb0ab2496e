// The bfloat16 elementwise gates on AMX (see gate_amx.h).
//
// Scalar: a tile's activations are (tokens, K_src, r), so column t * r + c of the product is token
// t's rank position c, and its K_src entries, one per block, lie r apart. Each chunk of columns is
// first paired for the tile unit (blocks 2p and 2p + 1 side by side, per column), then every 32
// columns by 32 destination blocks are one amx::product with the gate's rows, and the float32 sums
// go back to (token, block, rank) order, rounded once.
//
// Diagonal: a (K_dst x K_src) gate per rank position c, so per c one product of that gate with the
// (K_src, tokens) activations at c. Per 32 tokens, each token's blocks are paired as above and the
// (token, rank) pairs transposed to (rank, token) 16 x 16 at a time, in one pass
// (pair_and_transpose), then one product per rank position and 32 destination blocks, and the
// (rank, token) sums rounded once, two rank positions at a time, and transposed back into (token,
// block, rank) rows.
//
// diagonal_outer: the diagonal part as above, plus the rank-one part dst[t, d] += left_ds
// <right_ds, src[t, s]> summed over s, in two kinds of product per 32 tokens. First the dot
// products dots[t, d, s] = <right_ds, src[t, s]>, per source block s a product of its (K_dst x r)
// right rows with the (r, tokens) activations (consecutive rank positions are a 32-bit pair of a
// token's row, transposed 16 x 16); rounded to bfloat16 and paired over s. Then per destination
// block d a product of its (r x K_src) left rows with the (K_src, tokens) dots, added to the
// diagonal part's float32 sums before their one rounding.
#include "gate_amx.h"

#include "amx.h"
#include "projection.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>
#include <cstring>
#include <vector>

#include "avx512.h"
#include "thread_buffer.h"

namespace nanomoe::cpu::gate_amx {
namespace {

// Blocks on both sides from which the gate runs here; at 8 blocks the AMX gates measured no faster
// than the float32 ones, mostly, with zero-padded steps and with tiles shaped to 8 deep (NOTES,
// "What is left" and version 50).
constexpr int64_t kMinBlocks = 16;
constexpr int64_t kGateRows = 16;  // the gate's rows come in the tile unit's 16-row tiles
// Gate rows per amx::product: its first operand's rows (amx.h's kTokens, tokens there).
constexpr int64_t kProductRows = amx::kTokens;

// Columns paired per chunk: each product reads a 32-column slice of the chunk's pairs (K_src x 64
// elements), which every 32 destination blocks read again.
constexpr int64_t kChunkColumns = 128;
constexpr int64_t kPairRow = 2 * kChunkColumns;

// n rounded up to a multiple of m.
int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// The rows of a product whose first operand has `remaining` rows left from here: 32, or 16 for
// the last 16 or fewer (padded rows filling a partial tile).
int64_t rows_of_product(int64_t remaining) {
  return remaining > kGateRows ? kProductRows : kGateRows;
}

// The gate's destination blocks rounded up to whole 16-row tiles.
int64_t padded_rows(const GateRows<float>& g) {
  return round_up(g.dst_blocks, kGateRows);
}

// Its source blocks likewise, where they are a product's rows (diagonal_outer's gradients).
int64_t padded_src(const GateRows<float>& g) {
  return round_up(g.src_blocks, kGateRows);
}

// diagonal_outer's rank positions rounded up to whole 16-row tiles: the rows of its left products.
int64_t padded_rank(const GateRows<float>& g) {
  return round_up(g.rank, kGateRows);
}

// The depth of diagonal_outer's products over the rank: whole 32-deep steps, the padding zeros in
// both operands. A partial step's tail, then copied per product, cost more than the padding (tiles
// shaped to a shallow depth came later, not tried here); and zeros multiplying another block's
// values would turn an Inf there into a NaN here.
int64_t rank_depth(int64_t r) {
  return round_up(r, amx::kCols);
}

// diagonal_outer's tensors in amx_gate, after the diagonal part: right's (s, d, b) entry at
// right_offset(g) + (s * padded_rows(g) + d) * rank_depth(r) + b; left's (d, a, s) entry at
// left_offset(g) + (d * padded_rank(g) + a) * K_src + s; left again, as the backward's products
// over the rank read it, its (d, s, a) entry at left_by_src_offset(g) + (d * padded_src(g) + s) *
// rank_depth(r) + a. Padded rows and columns are zeros.
int64_t diagonal_size(const GateRows<float>& g) {
  return g.steps() * padded_rows(g) * g.src_blocks;
}
int64_t right_offset(const GateRows<float>& g) {
  return diagonal_size(g);
}
int64_t left_offset(const GateRows<float>& g) {
  return right_offset(g) + g.src_blocks * padded_rows(g) * rank_depth(g.rank);
}
int64_t left_by_src_offset(const GateRows<float>& g) {
  return left_offset(g) + g.dst_blocks * padded_rank(g) * g.src_blocks;
}

// Columns [first, first + count) of the (K_src, tokens * r) activations, paired: row p holds
// (src[t, 2p, c], src[t, 2p + 1, c]) for column t * r + c at pairs + p * kPairRow + 2 * (column -
// first), an odd block count's last partner zero. Each token's (K_src, r) slice is a row-major
// matrix whose rows are paired as the backward pairs its operands.
void pair_columns(const GateRows<float>& g, const uint16_t* src, int64_t first, int64_t count,
                  uint16_t* pairs) {
  const int64_t r = g.rank;
  for (int64_t t = first / r; t * r < first + count; ++t) {
    const int64_t begin = std::max<int64_t>(first - t * r, 0);
    const int64_t end = std::min(r, first + count - t * r);
    projection::pair_steps(g.src_blocks, end - begin, src + t * g.src_blocks * r + begin, r,
                           pairs + 2 * (t * r + begin - first), kPairRow);
  }
}

// Rows [0, rows) of a block of sums (row d at sums + d * amx::kCols), its columns the product's
// [first, first + count), rounded into dst[t, d0 + d, c] for column t * r + c.
NANOMOE_AVX512 void store_sums(const float* sums, int64_t rows, int64_t d0, int64_t first,
                               int64_t count, int64_t r, int64_t dst_row, uint16_t* dst) {
  for (int64_t n = first; n < first + count;) {
    const int64_t t = n / r, c = n - t * r, run = std::min(r - c, first + count - n);
    uint16_t* out = dst + t * dst_row + d0 * r + c;
    const float* in = sums + (n - first);
    for (int64_t i = 0; i < run; i += 16) {
      const __mmask16 lanes = first_lanes(run - i);
      for (int64_t d = 0; d < rows; ++d) {
        store_lanes(out + d * r + i, lanes, _mm512_maskz_loadu_ps(lanes, in + d * amx::kCols + i));
      }
    }
    n += run;
  }
}

NANOMOE_AVX512 void mix_scalar(const GateRows<float>& g, const uint16_t* src, uint16_t* dst,
                               int64_t tokens) {
  const int64_t r = g.rank, columns = tokens * r, pairs = (g.src_blocks + 1) / 2;
  thread_local std::vector<uint16_t> buffer_storage;
  uint16_t* buffer = thread_buffer(buffer_storage, pairs * kPairRow);
  const amx::Tiles tiles;
  alignas(64) float sums[kProductRows * amx::kCols];
  for (int64_t first = 0; first < columns; first += kChunkColumns) {
    const int64_t count = std::min(kChunkColumns, columns - first);
    pair_columns(g, src, first, count, buffer);
    for (int64_t c = 0; c < count; c += amx::kCols) {
      for (int64_t d0 = 0; d0 < g.dst_blocks; d0 += kProductRows) {
        const int64_t rows = std::min(kProductRows, g.dst_blocks - d0);
        // 16 or 32 gate rows: the padded rows (zeros) fill a partial tile. Past count, the slice's
        // columns hold pairs of an earlier chunk or call: their sums are never stored, and no
        // column's sum reads another's.
        amx::product(rows_of_product(rows), g.amx_gate + d0 * g.src_blocks, g.src_blocks,
                     buffer + 2 * c, kPairRow, g.src_blocks, sums);
        store_sums(sums, rows, d0, first + c, std::min(amx::kCols, count - c), r, g.dst_blocks * r,
                   dst);
      }
    }
  }
}

// Diagonal, per 32 tokens: rank positions 16 at a time (the transposes in are 16 x 16 pairs).
constexpr int64_t kLanes = 16;
constexpr int64_t kTokenColumns = amx::kCols;  // tokens per product: its columns

// 32-bit elements (one cache line) added to the rows of the buffers below whose row length is a
// multiple of 4 KiB or near it: 16 such rows, read or written together by a transpose or a
// rounding, would share one set of the 12-way L1 (forward 0.93x to 0.96x its time at K = 64).
constexpr int64_t kSetPad = 16;

// Pairs of (tokens, K_src, r) rows with their rank positions paired: an even rank's pairs are the
// rows' own 32-bit elements; an odd rank's rows are copied with a zero after each block's last
// position, so no pair reaches into the next block. Row t of the result at rows + 2 * t *
// row_pairs.
struct RankPairs {
  const uint16_t* rows;
  int64_t row_pairs;
};

NANOMOE_AVX512 RankPairs pair_rank_positions(int64_t k_src, int64_t r, const uint16_t* src,
                                             int64_t count, uint16_t* padded) {
  if (r % 2 == 0) return {src, k_src * r / 2};
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t s = 0; s < k_src; ++s) {
      const uint16_t* in = src + (t * k_src + s) * r;
      uint16_t* out = padded + (t * k_src + s) * (r + 1);
      for (int64_t c = 0; c <= r; c += 32) {
        const __mmask32 written = first_lanes32(r + 1 - c), read = first_lanes32(r - c);
        _mm512_mask_storeu_epi16(out + c, written, _mm512_maskz_loadu_epi16(read, in + c));
      }
    }
  }
  return {padded, k_src * (r + 1) / 2};
}

// The (tokens, blocks, r) rows of up to 32 tokens with their rank positions paired and transposed,
// each block's the second operand of a product over the rank: block k's (rank pair, token) pairs
// at block(k), rank_depth(r) / 2 pair rows, those past the rank zero (set once per call: fill never
// writes them), the columns past the tokens left stale.
class RankPairsByBlock {
 public:
  RankPairsByBlock(int64_t blocks, int64_t r, std::vector<uint16_t>& storage,
                   std::vector<uint16_t>& padded)
      : blocks_(blocks), r_(r), padded_(padded) {
    const int64_t size = block_size(), written = (r + 1) / 2 * 2 * kTokenColumns;
    data_ = thread_buffer(storage, blocks * size);
    for (int64_t k = 0; k < blocks; ++k) {
      std::fill(data_ + k * size + written, data_ + (k + 1) * size, uint16_t(0));
    }
  }

  NANOMOE_AVX512 void fill(const uint16_t* rows, int64_t count) {
    const int64_t half_rank = (r_ + 1) / 2;
    uint16_t* scratch = r_ % 2 == 0 ? nullptr : thread_buffer(padded_, count * blocks_ * (r_ + 1));
    const RankPairs pairs = pair_rank_positions(blocks_, r_, rows, count, scratch);
    for (int64_t k = 0; k < blocks_; ++k) {
      projection::transpose_pairs(count, half_rank, pairs.rows + 2 * k * half_rank,
                                  2 * pairs.row_pairs, data_ + k * block_size(), 2 * kTokenColumns);
    }
  }

  const uint16_t* block(int64_t k) const { return data_ + k * block_size(); }

 private:
  int64_t block_size() const { return rank_depth(r_) * kTokenColumns; }
  int64_t blocks_, r_;
  std::vector<uint16_t>& padded_;
  uint16_t* data_;
};

// sums[d - d0][t] = <right_ds, src[t, s]> for destination blocks [d0, d0 + 32) (those past K_dst
// zero rows) and the 32 tokens of src_by_rank: one product of block s's right
// rows over the rank.
void right_dots(const GateRows<float>& g, const RankPairsByBlock& src_by_rank, int64_t s,
                int64_t d0, float* sums) {
  const int64_t depth = rank_depth(g.rank), dst_rows = padded_rows(g);
  amx::product(rows_of_product(g.dst_blocks - d0),
               g.amx_gate + right_offset(g) + (s * dst_rows + d0) * depth, depth,
               src_by_rank.block(s), 2 * kTokenColumns, depth, sums);
}

// bfloat16 pairs (even[i], odd[i]) of two rows of 16 float32 sums, rounded to nearest even.
NANOMOE_AVX512 __m512i round_in_pairs(const float* even, const float* odd) {
  return pair_rounded(_mm512_loadu_ps(even), _mm512_loadu_ps(odd));
}

// diagonal_outer's rank-one part of `count` (at most 32) tokens from src (tokens, K_src, r):
// rank_one[(d * padded_rank + a) * 32 + t] = sum_s left[d, s, a] dots[t, d, s], with dots[t, d,
// s] = <right[d, s], src[t, s]> rounded to bfloat16. Columns t >= count hold whatever stale
// pairs give; no other column reads them.
NANOMOE_AVX512 void rank_one_sums(const GateRows<float>& g, const uint16_t* src, int64_t count,
                                  RankPairsByBlock& src_by_rank, float* rank_one) {
  const int64_t k_src = g.src_blocks, k_dst = g.dst_blocks;
  const int64_t dst_rows = padded_rows(g), rank_rows = padded_rank(g);
  const int64_t source_pairs = (k_src + 1) / 2;
  const uint16_t* left = g.amx_gate + left_offset(g);
  // dots: (d, source pair, token) pairs, each left product's second operand (its rows per d
  // kSetPad longer); sums: one product's (d, token) float32 sums per source block of a pair.
  thread_local std::vector<uint16_t> dots_buffer;
  thread_local std::vector<float> sums_buffer;
  const int64_t dots_row = 2 * (source_pairs * kTokenColumns + kSetPad);
  uint16_t* dots = thread_buffer(dots_buffer, dst_rows * dots_row);
  float* sums = thread_buffer(sums_buffer, 2 * kProductRows * amx::kCols);
  src_by_rank.fill(src, count);
  for (int64_t d0 = 0; d0 < k_dst; d0 += kProductRows) {
    const int64_t rows = std::min(kProductRows, k_dst - d0);
    for (int64_t p = 0; p < source_pairs; ++p) {
      for (int64_t e = 0; e < 2; ++e) {
        float* block_sums = sums + e * kProductRows * amx::kCols;
        const int64_t s = 2 * p + e;
        if (s == k_src) {  // an odd K_src's last pair: its partner is zero
          std::fill(block_sums, block_sums + kProductRows * amx::kCols, 0.0f);
          continue;
        }
        right_dots(g, src_by_rank, s, d0, block_sums);
      }
      for (int64_t d = 0; d < rows; ++d) {
        for (int64_t half = 0; half < kTokenColumns; half += kLanes) {
          const float* even = sums + d * amx::kCols + half;
          _mm512_storeu_si512(dots + (d0 + d) * dots_row + 2 * (p * kTokenColumns + half),
                              round_in_pairs(even, even + kProductRows * amx::kCols));
        }
      }
    }
  }
  for (int64_t d = 0; d < k_dst; ++d) {
    for (int64_t a0 = 0; a0 < rank_rows; a0 += kProductRows) {
      amx::product(rows_of_product(rank_rows - a0), left + (d * rank_rows + a0) * k_src, k_src,
                   dots + d * dots_row, 2 * kTokenColumns, k_src,
                   rank_one + (d * rank_rows + a0) * kTokenColumns);
    }
  }
}

// A block of mix_diagonal's float32 sums, 16 rank positions by 16 tokens: position c's tokens at
// sums + c * stride, plus (kOuter) diagonal_outer's rank-one part at rank_one + c * kTokenColumns
// (its rows past the rank, to padded_rank, only reach lanes the store masks).
template <bool kOuter>
struct SumRows {
  const float* sums;
  int64_t stride;
  const float* rank_one;  // kOuter only
  NANOMOE_AVX512 __m512 operator()(int64_t c) const {
    const __m512 sum = _mm512_loadu_ps(sums + c * stride);
    if constexpr (!kOuter) return sum;
    return _mm512_add_ps(sum, _mm512_loadu_ps(rank_one + c * kTokenColumns));
  }
};

// Rounds the block to bfloat16 by token: position c of token t at out + t * out_row + c, for
// t < tokens and the positions in `lanes`. Each pair of positions is rounded by one instruction
// and interleaved into (even, odd) 32-bit elements, so the transpose moves 8 rows of 32 bits
// where transposing the float32 sums took 16: 40 shuffles for the block instead of 64.
template <bool kOuter>
NANOMOE_AVX512 void store_by_token(const SumRows<kOuter>& sum_at, int64_t tokens, __mmask16 lanes,
                                   uint16_t* out, int64_t out_row) {
  __m512i pairs[8];  // pairs[p], lane t: token t's positions 2p and 2p + 1
  for (int p = 0; p < 8; ++p) pairs[p] = pair_rounded(sum_at(2 * p), sum_at(2 * p + 1));
  // by_pairs[i], 128-bit lane L: tokens 4L + {0, 1} (even i) or {2, 3} (odd i) of pairs 2j, 2j + 1
  // interleaved, for i in {2j, 2j + 1}.
  __m512i by_pairs[8];
  for (int j = 0; j < 4; ++j) {
    by_pairs[2 * j] = _mm512_unpacklo_epi32(pairs[2 * j], pairs[2 * j + 1]);
    by_pairs[2 * j + 1] = _mm512_unpackhi_epi32(pairs[2 * j], pairs[2 * j + 1]);
  }
  // quads[g][k], 128-bit lane L: token 4L + k's pairs 4g to 4g + 3.
  __m512i quads[2][4];
  for (int g = 0; g < 2; ++g) {
    const __m512i* b = by_pairs + 4 * g;
    quads[g][0] = _mm512_unpacklo_epi64(b[0], b[2]);
    quads[g][1] = _mm512_unpackhi_epi64(b[0], b[2]);
    quads[g][2] = _mm512_unpacklo_epi64(b[1], b[3]);
    quads[g][3] = _mm512_unpackhi_epi64(b[1], b[3]);
  }
  // A token's row is its two quads' lanes L side by side: lanes 0 and 1 (tokens k and 4 + k) in
  // one vector's halves, lanes 2 and 3 (8 + k and 12 + k) in another's.
  const __m512i first_lanes_of = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i last_lanes_of = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int k = 0; k < 4; ++k) {
    const __m512i rows[2] = {_mm512_permutex2var_epi64(quads[0][k], first_lanes_of, quads[1][k]),
                             _mm512_permutex2var_epi64(quads[0][k], last_lanes_of, quads[1][k])};
    for (int half = 0; half < 4; ++half) {
      const int64_t t = 4 * half + k;
      if (t >= tokens) continue;
      const __m512i both = rows[half / 2];
      const __m256i row =
          half % 2 == 0 ? _mm512_castsi512_si256(both) : _mm512_extracti64x4_epi64(both, 1);
      _mm256_mask_storeu_epi16(out + t * out_row, lanes, row);
    }
  }
}

// `rows` (at most 16) rows of `lanes` (at most 16 kGroups) bfloat16 values at first + i *
// row_stride, each interleaved with its partner row at + partner (zeros for rows i >= partners) and
// transposed in registers, kLanes columns at a time: column c's 16 pairs (row i's in 32-bit lane i,
// zeros past `rows`) at out + c * out_stride. Pairing rows into a buffer and transposing the
// buffer after took a third more (NOTES, version 94). Two groups read 32 columns, a whole line of
// each row where rows lie 4 KiB apart (version 97).
template <int kGroups>
NANOMOE_AVX512 void pair_and_transpose(const uint16_t* first, int64_t row_stride, int64_t partner,
                                       int64_t rows, int64_t partners, int64_t lanes, uint16_t* out,
                                       int64_t out_stride) {
  static_assert(kGroups == 1 || kGroups == 2, "16 or 32 columns");
  // Element 2i: column i of the row (the vector's low half), 2i + 1: of its partner.
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __mmask32 in_lanes = first_lanes32(lanes);
  __m512i pairs[kGroups][kLanes];  // pairs[g][i]: row i's pairs of columns [16 g, 16 g + 16)
  for (int64_t i = 0; i < kLanes; ++i) {
    if (i >= rows) {
      for (int g = 0; g < kGroups; ++g) pairs[g][i] = _mm512_setzero_si512();
      continue;
    }
    const uint16_t* row = first + i * row_stride;
    const __m512i even = _mm512_maskz_loadu_epi16(in_lanes, row);
    const __m512i odd =
        i < partners ? _mm512_maskz_loadu_epi16(in_lanes, row + partner) : _mm512_setzero_si512();
    // Each group's 16 columns of the row, then of its partner, in one vector.
    pairs[0][i] = _mm512_permutexvar_epi16(interleave, _mm512_shuffle_i64x2(even, odd, 0x44));
    if constexpr (kGroups == 2) {
      pairs[1][i] = _mm512_permutexvar_epi16(interleave, _mm512_shuffle_i64x2(even, odd, 0xEE));
    }
  }
  for (int g = 0; g < kGroups; ++g) {
    transpose16(pairs[g]);
    for (int64_t c = 0; c < std::min(kLanes, lanes - kLanes * g); ++c) {
      _mm512_storeu_si512(out + (kLanes * g + c) * out_stride, pairs[g][c]);
    }
  }
}

template <bool kOuter>
NANOMOE_AVX512 void mix_diagonal(const GateRows<float>& g, const uint16_t* src, uint16_t* dst,
                                 int64_t tokens) {
  const int64_t r = g.rank, k_src = g.src_blocks, k_dst = g.dst_blocks;
  const int64_t pairs = (k_src + 1) / 2, dst_rows = padded_rows(g), rank_rows = padded_rank(g);
  // by_rank: (rank of the 16, pair, token), as each product's second operand; sums: (rank of the
  // 16, destination block, token), both kSetPad longer per rank position; rank_one:
  // diagonal_outer's rank-one part, (destination block, rank, token).
  thread_local std::vector<uint32_t> by_rank_buffer;
  thread_local std::vector<float> sums_buffer, rank_one_buffer;
  const int64_t rank_pairs = pairs * kTokenColumns + kSetPad;
  const int64_t sums_row = dst_rows * kTokenColumns + kSetPad;
  uint16_t* by_rank =
      reinterpret_cast<uint16_t*>(thread_buffer(by_rank_buffer, kLanes * rank_pairs));
  float* sums = thread_buffer(sums_buffer, kLanes * sums_row);
  float* rank_one =
      kOuter ? thread_buffer(rank_one_buffer, k_dst * rank_rows * kTokenColumns) : nullptr;
  thread_local std::vector<uint16_t> by_rank_storage, padded;
  RankPairsByBlock src_by_rank(kOuter ? k_src : 0, r, by_rank_storage, padded);
  const amx::Tiles tiles;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenColumns) {
    const int64_t count = std::min(kTokenColumns, tokens - t0);
    if constexpr (kOuter) rank_one_sums(g, src + t0 * k_src * r, count, src_by_rank, rank_one);
    for (int64_t c0 = 0; c0 < r; c0 += kLanes) {
      const int64_t lanes = std::min(kLanes, r - c0);
      // Blocks 2p and 2p + 1 paired per rank position, 16 tokens at a time (an odd K_src's last
      // partner zero). Past count the columns hold zeros or stale pairs, whose sums are never
      // stored.
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t partners = 2 * p + 1 < k_src ? kLanes : 0;
        for (int64_t half = 0; half < count; half += kLanes) {
          pair_and_transpose<1>(src + ((t0 + half) * k_src + 2 * p) * r + c0, k_src * r, r,
                                std::min(kLanes, count - half), partners, lanes,
                                by_rank + 2 * (p * kTokenColumns + half), 2 * rank_pairs);
        }
      }
      for (int64_t c = 0; c < lanes; ++c) {
        const uint16_t* gate = g.amx_gate + (c0 + c) * dst_rows * k_src;
        const uint16_t* pairs_at = by_rank + 2 * c * rank_pairs;
        for (int64_t d0 = 0; d0 < k_dst; d0 += kProductRows) {
          const int64_t rows = rows_of_product(k_dst - d0);
          amx::product(rows, gate + d0 * k_src, k_src, pairs_at, 2 * kTokenColumns, k_src,
                       sums + c * sums_row + d0 * kTokenColumns);
        }
      }
      const __mmask16 stored = first_lanes(lanes);
      for (int64_t d = 0; d < k_dst; ++d) {
        for (int64_t half = 0; half < count; half += kLanes) {
          const SumRows<kOuter> rows{
              sums + d * kTokenColumns + half, sums_row,
              kOuter ? rank_one + (d * rank_rows + c0) * kTokenColumns + half : nullptr};
          store_by_token(rows, std::min(kLanes, count - half), stored,
                         dst + ((t0 + half) * k_dst + d) * r + c0, k_dst * r);
        }
      }
    }
  }
}

// The scalar gate's weight gradient, per 32 tokens: grad_mix[d, s] += sum over the tokens' (token,
// rank) positions n of grad_dst[n, d] src[n, s], a product (K_dst x 32 r) by (32 r x K_src). Its
// first operand is grad_dst's rows regrouped by block (row d: every token's r entries of block d);
// its second pairs consecutive rank positions, which for an even rank are one 32-bit element of a
// token's row of block s: per token, its (K_src x r / 2) pairs transposed.
NANOMOE_AVX512 void accumulate_scalar_grads(const GateRows<float>& g, const uint16_t* src,
                                            const uint16_t* grad_dst, int64_t tokens,
                                            float* grad_mix) {
  constexpr int64_t kChunkTokens = 32;
  const int64_t r = g.rank, half_rank = r / 2, k_src = g.src_blocks, k_dst = g.dst_blocks;
  const int64_t depth_max = kChunkTokens * r, dst_rows = padded_rows(g);
  // Columns of the second operand: the source blocks rounded up to whole products of 32.
  const int64_t src_columns = round_up(k_src, amx::kCols);
  thread_local std::vector<uint16_t> by_block_buffer;
  thread_local std::vector<uint16_t> pairs_buffer;
  uint16_t* by_block = thread_buffer(by_block_buffer, dst_rows * depth_max);
  uint16_t* pairs = thread_buffer(pairs_buffer, 2 * kChunkTokens * half_rank * src_columns);
  alignas(64) float sums[kProductRows * amx::kCols];
  const amx::Tiles tiles;
  for (int64_t t0 = 0; t0 < tokens; t0 += kChunkTokens) {
    const int64_t count = std::min(kChunkTokens, tokens - t0), depth = count * r;
    for (int64_t t = 0; t < count; ++t) {
      const uint16_t* row = grad_dst + (t0 + t) * k_dst * r;
      for (int64_t d = 0; d < k_dst; ++d) {
        for (int64_t c = 0; c < r; c += 32) {
          const __mmask32 lanes = first_lanes32(r - c);
          _mm512_mask_storeu_epi16(by_block + d * depth_max + t * r + c, lanes,
                                   _mm512_maskz_loadu_epi16(lanes, row + d * r + c));
        }
      }
      // Token t's pairs: pair row t * half_rank + q holds (src[t, s, 2q], src[t, s, 2q + 1]).
      projection::transpose_pairs(k_src, half_rank, src + (t0 + t) * k_src * r, r,
                                  pairs + 2 * t * half_rank * src_columns, 2 * src_columns);
    }
    for (int64_t d0 = 0; d0 < k_dst; d0 += kProductRows) {
      const int64_t rows = std::min(kProductRows, k_dst - d0);
      for (int64_t s0 = 0; s0 < k_src; s0 += amx::kCols) {
        amx::product(rows_of_product(rows), by_block + d0 * depth_max, depth_max, pairs + 2 * s0,
                     2 * src_columns, depth, sums);
        for (int64_t d = 0; d < rows; ++d) {
          for (int64_t s = s0; s < std::min(k_src, s0 + amx::kCols); ++s) {
            grad_mix[(d0 + d) * g.dst_stride + s * g.src_stride] += sums[d * amx::kCols + s - s0];
          }
        }
      }
    }
  }
}

// The weight gradients of the diagonal and diagonal_outer gates, per 32 tokens, summed over the
// tokens on the tile unit into float32 tiles of their own (grad_tiles), added to across calls and
// put in mix's layout once at the end (tile_grads_to_mix):
// - grad_mix[d, s, a] = sum_t grad_dst[t, d, a] src[t, s, a]: per rank position a, the product of
//   grad_dst's (K_dst x tokens) rows with src's (tokens x K_src) columns at a;
// - diagonal_outer, with dots[t, d, s] = <right_ds, src[t, s]> and u[t, d, s] = <left_ds,
//   grad_dst[t, d]> (each rounded to bfloat16 for the tile unit: dots as the forward rounds them,
//   u at the same cost in precision):
//   grad_left[d, s, :] = sum_t dots[t, d, s] grad_dst[t, d, :], per d a product of dots' (K_src x
//   tokens) rows with grad_dst's (tokens x r) block d; grad_right[d, s, :] = sum_t u[t, d, s]
//   src[t, s, :], per s a product of u's (K_dst x tokens) rows with src's (tokens x r) block s.
// The tokens are each product's depth, paired: rows 2p and 2p + 1 of a tile side by side.
struct GradTiles {
  int64_t src_cols;   // K_src rounded up to a product's 32 columns
  int64_t src_rows;   // K_src rounded up to 16-row tiles
  int64_t rank_cols;  // r rounded up to whole 16-column tiles
  // grad_mix's (a, d, s) sum at (a * padded_rows + d) * src_cols + s; grad_left's (d, s, a) at
  // left_at + (d * src_rows + s) * rank_cols + a; grad_right's (s, d, b) at right_at + (s *
  // padded_rows + d) * rank_cols + b.
  int64_t left_at, right_at, size;
};

GradTiles grad_tiles(const GateRows<float>& g) {
  GradTiles at{};
  at.src_cols = round_up(g.src_blocks, amx::kCols);
  at.src_rows = padded_src(g);
  at.rank_cols = round_up(g.rank, kLanes);
  at.left_at = g.rank * padded_rows(g) * at.src_cols;
  at.right_at = at.left_at + (g.variant == 2 ? g.dst_blocks * at.src_rows * at.rank_cols : 0);
  at.size = at.right_at + (g.variant == 2 ? g.src_blocks * padded_rows(g) * at.rank_cols : 0);
  return at;
}

// The 32 float32 sums at row as one bfloat16 row, rounded to nearest even.
NANOMOE_AVX512 void store_rounded_row(const float* row, uint16_t* out) {
  const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + kLanes), _mm512_loadu_ps(row));
  _mm512_storeu_si512(out, (__m512i)both);
}

// A chunk of up to 32 tokens of the gradients' inputs; for diagonal_outer's rank-one gradients
// also with their rows paired over tokens (rows 2p and 2p + 1 side by side, an odd count's last
// partner zero) as the second operand of products that sum over the tokens, with a product's
// columns of slack after the last pair row, as the columns past a block (never summed) read on.
struct TokenChunk {
  const uint16_t* src;       // (count, K_src, r) rows
  const uint16_t* grad_dst;  // (count, K_dst, r) rows
  int64_t count;
  uint16_t* src_pairs;   // (token pair, s, r), pair rows 2 K_src r apart (diagonal_outer)
  uint16_t* grad_pairs;  // (token pair, d, r), pair rows 2 K_dst r apart (diagonal_outer)
};

// grad_mix's tiles += the chunk's sums: per rank position a, grad_dst's (K_dst x tokens) rows at a
// (grad_by_row: row (d, a), the tokens in pairs) by src's (tokens x K_src) columns at a
// (src_by_position: (token pair, a, s)), both paired and transposed from the chunk's rows.
void add_mix_grads(const GateRows<float>& g, const TokenChunk& chunk, uint16_t* grad_by_row,
                   uint16_t* src_by_position, float* sums) {
  const int64_t r = g.rank, k_src = g.src_blocks, k_dst = g.dst_blocks;
  const int64_t src_row = k_src * r, dst_row = k_dst * r;
  const int64_t dst_rows = padded_rows(g), src_cols = grad_tiles(g).src_cols;
  const int64_t token_pairs = (chunk.count + 1) / 2, partners = chunk.count / 2;
  for (int64_t j0 = 0; j0 < dst_row; j0 += 2 * kLanes) {
    pair_and_transpose<2>(chunk.grad_dst + j0, 2 * dst_row, dst_row, token_pairs, partners,
                          std::min(2 * kLanes, dst_row - j0), grad_by_row + j0 * kTokenColumns,
                          kTokenColumns);
  }
  for (int64_t p = 0; p < token_pairs; ++p) {
    for (int64_t s0 = 0; s0 < k_src; s0 += kLanes) {
      for (int64_t a0 = 0; a0 < r; a0 += kLanes) {
        pair_and_transpose<1>(chunk.src + 2 * p * src_row + s0 * r + a0, r, src_row,
                              std::min(kLanes, k_src - s0), p < partners ? kLanes : 0,
                              std::min(kLanes, r - a0),
                              src_by_position + 2 * ((p * r + a0) * src_cols + s0), 2 * src_cols);
      }
    }
  }
  for (int64_t a = 0; a < r; ++a) {
    for (int64_t d0 = 0; d0 < k_dst; d0 += kProductRows) {
      const int64_t rows = rows_of_product(k_dst - d0);
      for (int64_t s0 = 0; s0 < k_src; s0 += amx::kCols) {
        amx::add_product(rows, grad_by_row + (d0 * r + a) * kTokenColumns, r * kTokenColumns,
                         src_by_position + 2 * (a * src_cols + s0), 2 * r * src_cols, chunk.count,
                         sums + (a * dst_rows + d0) * src_cols + s0, src_cols);
      }
    }
  }
}

// grad_left's tiles += the chunk's sums: dots[t, d, s] = <right_ds, src[t, s]> (as the forward
// makes them, into dots' rows (d, s) of the tokens), then per d dots' (K_src x tokens) rows by
// grad_dst's (tokens x r) block d.
NANOMOE_AVX512 void add_left_grads(const GateRows<float>& g, const TokenChunk& chunk,
                                   RankPairsByBlock& src_by_rank, uint16_t* dots, float* sums) {
  const int64_t r = g.rank, k_src = g.src_blocks, k_dst = g.dst_blocks;
  const GradTiles at = grad_tiles(g);
  alignas(64) float block[kProductRows * amx::kCols];
  src_by_rank.fill(chunk.src, chunk.count);
  for (int64_t s = 0; s < k_src; ++s) {
    for (int64_t d0 = 0; d0 < k_dst; d0 += kProductRows) {
      right_dots(g, src_by_rank, s, d0, block);
      for (int64_t d = d0; d < std::min(k_dst, d0 + kProductRows); ++d) {
        store_rounded_row(block + (d - d0) * amx::kCols,
                          dots + (d * at.src_rows + s) * kTokenColumns);
      }
    }
  }
  for (int64_t d = 0; d < k_dst; ++d) {
    for (int64_t s0 = 0; s0 < k_src; s0 += kProductRows) {
      const int64_t rows = rows_of_product(k_src - s0);
      for (int64_t a0 = 0; a0 < r; a0 += amx::kCols) {
        amx::add_product(rows, dots + (d * at.src_rows + s0) * kTokenColumns, kTokenColumns,
                         chunk.grad_pairs + 2 * (d * r + a0), 2 * k_dst * r, chunk.count,
                         sums + at.left_at + (d * at.src_rows + s0) * at.rank_cols + a0,
                         at.rank_cols, std::min(amx::kCols, at.rank_cols - a0));
      }
    }
  }
}

// grad_right's tiles += the chunk's sums: u[t, d, s] = <left_ds, grad_dst[t, d]> (per d a product
// of left's (K_src x r) rows with grad_dst's block d, into u's rows (s, d) of the tokens), then
// per s u's (K_dst x tokens) rows by src's (tokens x r) block s.
NANOMOE_AVX512 void add_right_grads(const GateRows<float>& g, const TokenChunk& chunk,
                                    RankPairsByBlock& grad_by_rank, uint16_t* u, float* sums) {
  const int64_t r = g.rank, k_src = g.src_blocks, k_dst = g.dst_blocks;
  const int64_t dst_rows = padded_rows(g), depth = rank_depth(r);
  const GradTiles at = grad_tiles(g);
  const uint16_t* left = g.amx_gate + left_by_src_offset(g);
  alignas(64) float block[kProductRows * amx::kCols];
  grad_by_rank.fill(chunk.grad_dst, chunk.count);
  for (int64_t d = 0; d < k_dst; ++d) {
    for (int64_t s0 = 0; s0 < k_src; s0 += kProductRows) {
      amx::product(rows_of_product(k_src - s0), left + (d * at.src_rows + s0) * depth, depth,
                   grad_by_rank.block(d), 2 * kTokenColumns, depth, block);
      for (int64_t s = s0; s < std::min(k_src, s0 + kProductRows); ++s) {
        store_rounded_row(block + (s - s0) * amx::kCols, u + (s * dst_rows + d) * kTokenColumns);
      }
    }
  }
  for (int64_t s = 0; s < k_src; ++s) {
    for (int64_t d0 = 0; d0 < k_dst; d0 += kProductRows) {
      const int64_t rows = rows_of_product(k_dst - d0);
      for (int64_t b0 = 0; b0 < r; b0 += amx::kCols) {
        amx::add_product(rows, u + (s * dst_rows + d0) * kTokenColumns, kTokenColumns,
                         chunk.src_pairs + 2 * (s * r + b0), 2 * k_src * r, chunk.count,
                         sums + at.right_at + (s * dst_rows + d0) * at.rank_cols + b0, at.rank_cols,
                         std::min(amx::kCols, at.rank_cols - b0));
      }
    }
  }
}

template <bool kOuter>
NANOMOE_AVX512 void accumulate_diagonal_grads(const GateRows<float>& g, const uint16_t* src,
                                              const uint16_t* grad_dst, int64_t tokens,
                                              float* sums) {
  constexpr int64_t kChunkPairs = kTokenColumns / 2;
  const int64_t r = g.rank, k_src = g.src_blocks, k_dst = g.dst_blocks;
  const int64_t src_row = k_src * r, dst_row = k_dst * r;
  const GradTiles at = grad_tiles(g);
  // The chunk's pairs; add_mix_grads' grad_by_row and src_by_position; diagonal_outer's src and
  // grad_dst by rank pairs (padded: their scratch for an odd rank), dots' and u's rows.
  thread_local std::vector<uint16_t> src_pairs, grad_pairs, grad_by_row_buffer,
      src_by_position_buffer, padded, src_by_rank_storage, grad_by_rank_storage, dots_buffer,
      u_buffer;
  TokenChunk chunk{
      src, grad_dst, 0,
      kOuter ? thread_buffer(src_pairs, 2 * (kChunkPairs * src_row + amx::kCols)) : nullptr,
      kOuter ? thread_buffer(grad_pairs, 2 * (kChunkPairs * dst_row + amx::kCols)) : nullptr};
  uint16_t* grad_by_row = thread_buffer(grad_by_row_buffer, padded_rows(g) * r * kTokenColumns);
  uint16_t* src_by_position =
      thread_buffer(src_by_position_buffer, 2 * kChunkPairs * r * at.src_cols);
  RankPairsByBlock src_by_rank(kOuter ? k_src : 0, r, src_by_rank_storage, padded);
  RankPairsByBlock grad_by_rank(kOuter ? k_dst : 0, r, grad_by_rank_storage, padded);
  uint16_t* dots =
      kOuter ? thread_buffer(dots_buffer, k_dst * at.src_rows * kTokenColumns) : nullptr;
  uint16_t* u = kOuter ? thread_buffer(u_buffer, k_src * padded_rows(g) * kTokenColumns) : nullptr;
  const amx::Tiles tiles;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenColumns) {
    chunk.src = src + t0 * src_row;
    chunk.grad_dst = grad_dst + t0 * dst_row;
    chunk.count = std::min(kTokenColumns, tokens - t0);
    add_mix_grads(g, chunk, grad_by_row, src_by_position, sums);
    if constexpr (kOuter) {
      projection::pair_steps(chunk.count, src_row, chunk.src, src_row, chunk.src_pairs,
                             2 * src_row);
      projection::pair_steps(chunk.count, dst_row, chunk.grad_dst, dst_row, chunk.grad_pairs,
                             2 * dst_row);
      add_left_grads(g, chunk, src_by_rank, dots, sums);
      add_right_grads(g, chunk, grad_by_rank, u, sums);
    }
  }
}

}  // namespace

bool chosen(const GateRows<float>& g) {
  return g.dst_blocks >= kMinBlocks && g.src_blocks >= kMinBlocks && amx::available();
}

int64_t gate_size(const GateRows<float>& g) {
  if (g.variant != 2) return diagonal_size(g);
  return left_by_src_offset(g) + g.dst_blocks * padded_src(g) * rank_depth(g.rank);
}

// bfloat16 bits of a float32 copy of a bfloat16 value: its high half, exactly.
uint16_t bfloat16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return uint16_t(bits >> 16);
}

void lay_out(const GateRows<float>& g, const uint16_t* mix, uint16_t* gate) {
  std::fill(gate, gate + gate_size(g), uint16_t(0));
  const int64_t steps = g.steps();
  const int64_t rows = padded_rows(g);
  for (int64_t c = 0; c < steps; ++c) {
    for (int64_t d = 0; d < g.dst_blocks; ++d) {
      for (int64_t s = 0; s < g.src_blocks; ++s) {
        gate[(c * rows + d) * g.src_blocks + s] = mix[d * g.dst_stride + s * g.src_stride + c];
      }
    }
  }
  if (g.variant != 2) return;
  // left and right are float32 copies of bfloat16 weights, at mix's strides.
  const int64_t r = g.rank, rank_rows = padded_rank(g), src_rows = padded_src(g);
  const int64_t depth = rank_depth(r);
  for (int64_t d = 0; d < g.dst_blocks; ++d) {
    for (int64_t s = 0; s < g.src_blocks; ++s) {
      const int64_t at = d * g.dst_stride + s * g.src_stride;
      for (int64_t c = 0; c < r; ++c) {
        const uint16_t left = bfloat16_bits(g.left[at + c]);
        gate[right_offset(g) + (s * rows + d) * depth + c] = bfloat16_bits(g.right[at + c]);
        gate[left_offset(g) + (d * rank_rows + c) * g.src_blocks + s] = left;
        gate[left_by_src_offset(g) + (d * src_rows + s) * depth + c] = left;
      }
    }
  }
}

bool grads_chosen(const GateRows<float>& g) {
  return g.amx_gate && g.variant == 0 && g.rank % 2 == 0 && g.rank >= kLanes;
}

void accumulate_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                      int64_t tokens, float* grad_mix) {
  accumulate_scalar_grads(g, src, grad_dst, tokens, grad_mix);
}

bool tile_grads_chosen(const GateRows<float>& g) {
  return g.amx_gate && g.variant >= 1;
}

int64_t tile_grads_size(const GateRows<float>& g) {
  return grad_tiles(g).size;
}

void accumulate_tile_grads(const GateRows<float>& g, const uint16_t* src, const uint16_t* grad_dst,
                           int64_t tokens, float* sums) {
  if (g.variant == 1) {
    accumulate_diagonal_grads<false>(g, src, grad_dst, tokens, sums);
  } else {
    accumulate_diagonal_grads<true>(g, src, grad_dst, tokens, sums);
  }
}

void tile_grads_to_mix(const GateRows<float>& g, const float* sums, float* grad_mix,
                       float* grad_left, float* grad_right) {
  const GradTiles at = grad_tiles(g);
  const int64_t dst_rows = padded_rows(g);
  for (int64_t d = 0; d < g.dst_blocks; ++d) {
    for (int64_t s = 0; s < g.src_blocks; ++s) {
      const int64_t to = d * g.dst_stride + s * g.src_stride;
      for (int64_t a = 0; a < g.rank; ++a) {
        grad_mix[to + a] = sums[(a * dst_rows + d) * at.src_cols + s];
        if (g.variant != 2) continue;
        grad_left[to + a] = sums[at.left_at + (d * at.src_rows + s) * at.rank_cols + a];
        grad_right[to + a] = sums[at.right_at + (s * dst_rows + d) * at.rank_cols + a];
      }
    }
  }
}

void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens) {
  if (g.variant == 0) {
    mix_scalar(g, src, dst, tokens);
  } else if (g.variant == 1) {
    mix_diagonal<false>(g, src, dst, tokens);
  } else {
    mix_diagonal<true>(g, src, dst, tokens);
  }
}

}  // namespace nanomoe::cpu::gate_amx

#else  // not x86-64: never chosen, so never called

#include <cstdlib>

namespace nanomoe::cpu::gate_amx {
bool chosen(const GateRows<float>&) {
  return false;
}
int64_t gate_size(const GateRows<float>&) {
  return 0;
}
void lay_out(const GateRows<float>&, const uint16_t*, uint16_t*) {
  std::abort();
}
void mix(const GateRows<float>&, const uint16_t*, uint16_t*, int64_t) {
  std::abort();
}
bool grads_chosen(const GateRows<float>&) {
  return false;
}
void accumulate_grads(const GateRows<float>&, const uint16_t*, const uint16_t*, int64_t, float*) {
  std::abort();
}
bool tile_grads_chosen(const GateRows<float>&) {
  return false;
}
int64_t tile_grads_size(const GateRows<float>&) {
  return 0;
}
void accumulate_tile_grads(const GateRows<float>&, const uint16_t*, const uint16_t*, int64_t,
                           float*) {
  std::abort();
}
void tile_grads_to_mix(const GateRows<float>&, const float*, float*, float*, float*) {
  std::abort();
}
}  // namespace nanomoe::cpu::gate_amx

#endif
