// The scalar gate on AMX (see gate_amx.h). A tile's activations are (tokens, K_src, r): column
// t * r + c of the product is token t's rank position c, and its K_src entries, one per block, lie
// r apart. So each chunk of columns is first paired for the tile unit (blocks 2p and 2p + 1 side by
// side, per column), then every 32 columns by 32 destination blocks are one amx::product with the
// gate's rows, and the float32 sums go back to (token, block, rank) order, rounded once.
#include "gate_amx.h"

#include "amx.h"
#include "projection.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>
#include <vector>

#include "avx512.h"

namespace nanomoe::cpu::gate_amx {
namespace {

// Blocks on both sides from which the gate runs here; below, most of each 32-deep step of the
// tile unit would multiply padding.
constexpr int64_t kMinBlocks = 16;
constexpr int64_t kGateRows = 16;  // the gate's rows come in the tile unit's 16-row tiles

// Columns paired per chunk: each product reads a 32-column slice of the chunk's pairs (K_src x 64
// elements), which every 32 destination blocks read again.
constexpr int64_t kChunkColumns = 128;
constexpr int64_t kPairRow = 2 * kChunkColumns;

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

NANOMOE_AVX512 void mix_on_amx(const GateRows<float>& g, const uint16_t* src, uint16_t* dst,
                               int64_t tokens) {
  const int64_t r = g.rank, columns = tokens * r, pairs = (g.src_blocks + 1) / 2;
  thread_local std::vector<uint16_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < pairs * kPairRow) buffer.resize(pairs * kPairRow);
  const amx::Tiles tiles;
  alignas(64) float sums[amx::kTokens * amx::kCols];
  for (int64_t first = 0; first < columns; first += kChunkColumns) {
    const int64_t count = std::min(kChunkColumns, columns - first);
    pair_columns(g, src, first, count, buffer.data());
    for (int64_t c = 0; c < count; c += amx::kCols) {
      for (int64_t d0 = 0; d0 < g.dst_blocks; d0 += amx::kTokens) {
        const int64_t rows = std::min(amx::kTokens, g.dst_blocks - d0);
        // 16 or 32 gate rows: the padded rows (zeros) fill a partial tile. Past count, the slice's
        // columns hold pairs of an earlier chunk or call: their sums are never stored, and no
        // column's sum reads another's.
        amx::product(rows > kGateRows ? amx::kTokens : kGateRows, g.amx_gate + d0 * g.src_blocks,
                     g.src_blocks, buffer.data() + 2 * c, kPairRow, g.src_blocks, sums);
        store_sums(sums, rows, d0, first + c, std::min(amx::kCols, count - c), r, g.dst_blocks * r,
                   dst);
      }
    }
  }
}

}  // namespace

bool chosen(int64_t dst_blocks, int64_t src_blocks) {
  return dst_blocks >= kMinBlocks && src_blocks >= kMinBlocks && amx::available();
}

int64_t gate_size(int64_t dst_blocks, int64_t src_blocks) {
  return (dst_blocks + kGateRows - 1) / kGateRows * kGateRows * src_blocks;
}

void lay_out(const uint16_t* mix, int64_t dst_stride, int64_t src_stride, int64_t dst_blocks,
             int64_t src_blocks, uint16_t* gate) {
  std::fill(gate, gate + gate_size(dst_blocks, src_blocks), uint16_t(0));
  for (int64_t d = 0; d < dst_blocks; ++d) {
    for (int64_t s = 0; s < src_blocks; ++s) {
      gate[d * src_blocks + s] = mix[d * dst_stride + s * src_stride];
    }
  }
}

void mix(const GateRows<float>& g, const uint16_t* src, uint16_t* dst, int64_t tokens) {
  mix_on_amx(g, src, dst, tokens);
}

}  // namespace nanomoe::cpu::gate_amx

#else  // not x86-64: never chosen, so never called

#include <cstdlib>

namespace nanomoe::cpu::gate_amx {
bool chosen(int64_t, int64_t) {
  return false;
}
int64_t gate_size(int64_t, int64_t) {
  return 0;
}
void lay_out(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*) {
  std::abort();
}
void mix(const GateRows<float>&, const uint16_t*, uint16_t*, int64_t) {
  std::abort();
}
}  // namespace nanomoe::cpu::gate_amx

#endif
