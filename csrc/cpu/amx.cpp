// The AMX block product of amx.h. Tiles 0-3 hold the sums (two rows of 16 tokens by two halves of
// 16 columns), 4-5 the input's two 16-token rows, 6-7 the weights' two 16-column halves. Every tile
// is 16 rows of 64 bytes (32-deep steps), except for a product shallower than one step: its input
// and weight tiles are configured to its depth, so nothing is copied to pad it.
#include "amx.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <cassert>
#include <cstdlib>
#include <cstring>

// GCC 12's masked-load intrinsics start from an undefined vector (see avx512.h).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define NANOMOE_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))

namespace nanomoe::cpu::amx {
namespace {

constexpr int kTileRows = 16;
constexpr int kTileBytes = 64;
constexpr int64_t kDepth = 32;  // the reduction one TDPBF16PS covers: 16 pairs per tile row

// The layout LDTILECFG reads (palette 1).
struct alignas(64) Config {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t row_bytes[16];
  uint8_t rows[16];
};

bool cpu_has_amx_bf16() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
  return tile && bf16;
}

// Linux hands the 8 KiB tile state to a process only on request; without it the first tile
// instruction faults.
bool os_grants_tiles() {
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

bool switched_off() {
  const char* value = std::getenv("NANOMOE_AMX");
  return value != nullptr && std::strcmp(value, "0") == 0;
}

// GCC's tile loads are asm statements that do not say they read memory, so the stores that fill a
// buffer only they read could be dropped; this says the memory at p is read here.
inline void tiles_read(const void* p) {
  asm volatile("" : : "r"(p) : "memory");
}

// The tiles' shapes for products `depth` deep: the sums 16 x 16 float32; the input 16 rows of depth
// elements and the weights depth / 2 rows of pairs, full (kDepth) or one shallow step.
constexpr Config tiles_for(int64_t depth) {
  Config config{};
  config.palette = 1;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = kTileRows;
    config.row_bytes[tile] = kTileBytes;
  }
  for (int tile : {4, 5}) config.row_bytes[tile] = static_cast<uint16_t>(2 * depth);
  for (int tile : {6, 7}) config.rows[tile] = static_cast<uint8_t>(depth / 2);
  return config;
}

// A product shallower than one step, of whole pairs, runs on tiles shaped to its depth (measured
// against the padded copy: forward 0.87x, forward+backward 0.95x at K = 64, r = 16, where the
// up-projection, grad_mixed and grad_x are 16 deep; NOTES, version 44).
constexpr bool is_shallow(int64_t depth) {
  return depth > 0 && depth < kDepth && depth % 2 == 0;
}

// Every shape, indexed by depth / 2 (shallow) or kDepth / 2 (full). In static memory: GCC 12 drops
// the stores that fill a configuration on the stack, as if LDTILECFG did not read it (seen: only
// the palette byte was written).
constexpr int kShapes = kDepth / 2 + 1;
constexpr std::array<Config, kShapes> every_shape() {
  std::array<Config, kShapes> shapes{};
  for (int i = 1; i < kShapes; ++i) shapes[i] = tiles_for(2 * i);
  return shapes;
}
constexpr std::array<Config, kShapes> kShapesByDepth = every_shape();

// Tiles alive on this thread (only the outermost releases, so a caller may hold the tile unit
// across many products that each hold their own), and the depth they are shaped for. A product
// shapes them only when its depth needs another shape (LDTILECFG zeroes the tiles, and no product
// keeps anything in them between calls).
thread_local int live_tiles = 0;
thread_local int64_t shaped_for = 0;  // 0: none loaded (no product is shaped for depth 0)

NANOMOE_AMX void configure_for(int64_t depth) {
  assert(live_tiles > 0 && "a product needs a live amx::Tiles on its thread");
  if (shaped_for == depth) return;
  _tile_loadconfig(&kShapesByDepth[depth / 2]);
  shaped_for = depth;
}

NANOMOE_AMX void release() {
  _tile_release();
  shaped_for = 0;
}

// One step (32 deep, or a shallow product's depth): the input tiles 4 (and 5, the second 16 rows)
// by the weight tiles 6 (and 7, the second 16 columns), into the sums in tiles 0 to 3.
template <int kRowTiles, int kColTiles>
NANOMOE_AMX inline void step(const uint16_t* first_in, const uint16_t* second_in,
                             int64_t in_row_bytes, const uint16_t* pairs, int64_t pair_row_bytes) {
  _tile_loadd(6, pairs, pair_row_bytes);
  if constexpr (kColTiles == 2) _tile_loadd(7, pairs + kCols, pair_row_bytes);
  _tile_loadd(4, first_in, in_row_bytes);
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (kColTiles == 2) _tile_dpbf16ps(1, 4, 7);
  if constexpr (kRowTiles == 2) {
    _tile_loadd(5, second_in, in_row_bytes);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (kColTiles == 2) _tile_dpbf16ps(3, 5, 7);
  }
}

// kRowTiles rows of 16 tokens by kColTiles columns of 16, the sums' rows sums_stride apart, added
// to (kAdd) or fresh. A product shallower than one step takes tiles shaped to its depth; a deeper
// one's last partial step (and an odd depth's lone element) is copied into zero-padded tiles, so
// nothing past the operands' ends is read.
template <int kRowTiles, int kColTiles, bool kAdd>
NANOMOE_AMX void product_rows(const uint16_t* in, int64_t in_stride, const uint16_t* weights,
                              int64_t pair_stride, int64_t depth, float* sums,
                              int64_t sums_stride) {
  constexpr bool kTwoRows = kRowTiles == 2, kTwoCols = kColTiles == 2;
  const bool shallow = is_shallow(depth);
  configure_for(shallow ? depth : kDepth);
  const int64_t in_bytes = in_stride * 2, weight_bytes = pair_stride * 2;
  const int64_t sums_bytes = sums_stride * int64_t(sizeof(float));
  const uint16_t* second_row = in + kTileRows * in_stride;
  float* second_sums = sums + kTileRows * sums_stride;
  if constexpr (kAdd) {
    tiles_read(sums);
    _tile_loadd(0, sums, sums_bytes);
    if constexpr (kTwoCols) _tile_loadd(1, sums + kTileRows, sums_bytes);
    if constexpr (kTwoRows) _tile_loadd(2, second_sums, sums_bytes);
    if constexpr (kTwoRows && kTwoCols) _tile_loadd(3, second_sums + kTileRows, sums_bytes);
  } else {
    _tile_zero(0);
    if constexpr (kTwoCols) _tile_zero(1);
    if constexpr (kTwoRows) _tile_zero(2);
    if constexpr (kTwoRows && kTwoCols) _tile_zero(3);
  }
  const int64_t whole = shallow ? 0 : depth / kDepth * kDepth;
  for (int64_t k = 0; k < whole; k += kDepth) {
    step<kRowTiles, kColTiles>(in + k, second_row + k, in_bytes, weights + k / 2 * pair_stride,
                               weight_bytes);
  }
  if (shallow) {  // one step, as deep as the tiles are shaped
    step<kRowTiles, kColTiles>(in, second_row, in_bytes, weights, weight_bytes);
  } else if (whole < depth) {
    // Masked vector copies: zeros past the depth in every row, and in every pair row past it.
    const int64_t rest = depth - whole, rest_pairs = (rest + 1) / 2;
    const __mmask32 in_lanes = (__mmask32(1) << rest) - 1;
    alignas(64) uint16_t in_tail[kRowTiles * kTileRows][kDepth];
    alignas(64) uint16_t weight_tail[kTileRows][2 * kCols];
    for (int t = 0; t < kRowTiles * kTileRows; ++t) {
      _mm512_store_si512(in_tail[t],
                         _mm512_maskz_loadu_epi16(in_lanes, in + t * in_stride + whole));
    }
    for (int64_t p = 0; p < kTileRows; ++p) {
      __m512i first_half = _mm512_setzero_si512(), second_half = _mm512_setzero_si512();
      if (p < rest_pairs) {
        // An odd depth's last pair row: its partners (the odd halves) lie past the depth, so they
        // are read as zeros (the input's zeros against an Inf there would make a NaN).
        const __mmask32 lanes = rest % 2 == 1 && p == rest_pairs - 1 ? 0x55555555u : ~0u;
        const uint16_t* pair_row = weights + (whole / 2 + p) * pair_stride;
        first_half = _mm512_maskz_loadu_epi16(lanes, pair_row);
        if constexpr (kTwoCols) second_half = _mm512_maskz_loadu_epi16(lanes, pair_row + kCols);
      }
      _mm512_store_si512(weight_tail[p], first_half);
      _mm512_store_si512(&weight_tail[p][kCols], second_half);
    }
    tiles_read(in_tail);
    tiles_read(weight_tail);
    step<kRowTiles, kColTiles>(in_tail[0], in_tail[kTwoRows ? kTileRows : 0], kTileBytes,
                               weight_tail[0], kTileBytes * 2);
  }
  _tile_stored(0, sums, sums_bytes);
  if constexpr (kTwoCols) _tile_stored(1, sums + kTileRows, sums_bytes);
  if constexpr (kTwoRows) _tile_stored(2, second_sums, sums_bytes);
  if constexpr (kTwoRows && kTwoCols) _tile_stored(3, second_sums + kTileRows, sums_bytes);
}

// The product_rows for a block of `tokens` (16 or 32) by `cols` (16 or kCols).
template <bool kAdd>
void product_block(int64_t tokens, int64_t cols, const uint16_t* in, int64_t in_stride,
                   const uint16_t* weights, int64_t pair_stride, int64_t depth, float* sums,
                   int64_t sums_stride) {
  const bool two_rows = tokens == kTokens;
  if (cols == kCols) {
    if (two_rows) {
      product_rows<2, 2, kAdd>(in, in_stride, weights, pair_stride, depth, sums, sums_stride);
    } else {
      product_rows<1, 2, kAdd>(in, in_stride, weights, pair_stride, depth, sums, sums_stride);
    }
  } else if (two_rows) {
    product_rows<2, 1, kAdd>(in, in_stride, weights, pair_stride, depth, sums, sums_stride);
  } else {
    product_rows<1, 1, kAdd>(in, in_stride, weights, pair_stride, depth, sums, sums_stride);
  }
}

}  // namespace

bool available() {
  static const bool runs = !switched_off() && cpu_has_amx_bf16() && os_grants_tiles();
  return runs;
}

Tiles::Tiles() {
  ++live_tiles;
}

Tiles::~Tiles() {
  if (--live_tiles == 0 && shaped_for != 0) release();
}

void product(int64_t tokens, const uint16_t* in, int64_t in_stride, const uint16_t* weights,
             int64_t pair_stride, int64_t depth, float* sums, int64_t cols) {
  product_block<false>(tokens, cols, in, in_stride, weights, pair_stride, depth, sums, kCols);
}

void add_product(int64_t tokens, const uint16_t* in, int64_t in_stride, const uint16_t* weights,
                 int64_t pair_stride, int64_t depth, float* sums, int64_t sums_stride,
                 int64_t cols) {
  product_block<true>(tokens, cols, in, in_stride, weights, pair_stride, depth, sums, sums_stride);
}

}  // namespace nanomoe::cpu::amx

#else  // not x86-64: never available, so never called

#include <cstdlib>

namespace nanomoe::cpu::amx {
bool available() {
  return false;
}
Tiles::Tiles() {
  std::abort();
}
Tiles::~Tiles() {}
void product(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*,
             int64_t) {
  std::abort();
}
void add_product(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*,
                 int64_t, int64_t) {
  std::abort();
}
}  // namespace nanomoe::cpu::amx

#endif
