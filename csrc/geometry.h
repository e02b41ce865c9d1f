// Launch geometry and small numerical helpers shared by the kernels and the host.
//
// Everything here is plain arithmetic usable from host C++ (g++, no CUDA headers) and
// from device code, so the host test program (csrc/host_tests/geometry_check.cpp) can
// check the exact functions the kernels run: split planning, row packing, causal limits,
// knockout tests and the log-sum-exp merge.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VG_HD __host__ __device__ __forceinline__
#else
#define VG_HD inline
#endif

namespace vg {

// ---------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------

// Short-query attention: a KV tile is 64 keys; each warp owns one 16-row MMA tile of the
// packed query rows; a block has at most 8 warps (128 rows).
constexpr int kAttnTileKeys = 64;
constexpr int kAttnRowsPerWarp = 16;
constexpr int kAttnMaxWarps = 8;
constexpr int kAttnMaxSq = 128;
constexpr int kAttnMaxSplits = 128;
// A split is never shorter than this many tiles when the split count is chosen
// automatically: below that the merge costs more than the parallelism gains.
constexpr int kAttnMinTilesPerSplit = 2;

// Capture: a block covers 64 keys of the span for up to 32 query heads of one KV group.
constexpr int kCaptureKeysPerBlock = 64;
constexpr int kCaptureMaxHeadsPerBlock = 32;
constexpr int kCaptureThreads = 128;
constexpr int kCaptureMaxD = 256;

VG_HD float neg_inf() { return -__builtin_huge_valf(); }

VG_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
VG_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
VG_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------
// Positions, causal limits, knockout
// ---------------------------------------------------------------------------------------

// Bottom-right alignment: query row i of a block of Sq rows sits at key position Sk - Sq + i.
VG_HD int64_t query_pos(int64_t Sk, int64_t Sq, int64_t i) { return Sk - Sq + i; }

// One past the last key that a block of query rows [.., i_last] may attend.
VG_HD int64_t key_limit(int64_t Sk, int64_t Sq, int64_t i_last, bool causal) {
  return causal ? imin(Sk, query_pos(Sk, Sq, i_last) + 1) : Sk;
}

// A row at position pos is affected by the knockout iff query_start <= pos < query_end.
VG_HD bool row_affected(int64_t pos, int64_t q_start, int64_t q_end) { return q_start <= pos && pos < q_end; }

// Key `key` is knocked out iff it lies in the span [span_start, span_start + span_len) and
// keep[key - span_start] is false. keep points at one batch row of the (B, N) bool mask.
VG_HD bool key_knocked(int64_t key, int64_t span_start, int64_t span_len, const uint8_t* keep_row) {
  const int64_t j = key - span_start;
  return j >= 0 && j < span_len && keep_row[j] == 0;
}

// Whether the half-open ranges [a0, a1) and [b0, b1) share a key.
VG_HD bool ranges_intersect(int64_t a0, int64_t a1, int64_t b0, int64_t b1) { return a0 < b1 && b0 < a1 && a0 < a1 && b0 < b1; }

// ---------------------------------------------------------------------------------------
// Short-query attention: packing of the query rows of one KV head
// ---------------------------------------------------------------------------------------
//
// The G = Hq / Hkv query heads of a KV head share its keys, so the Sq * G rows
// (query i, head g) are packed as r = i * G + g and processed together: K and V are read
// once per group, never copied per head. Rows are cut into 16-row MMA tiles; tiles are
// spread evenly over as few blocks of at most 8 warps as possible.
struct RowPacking {
  int64_t rows;     // Sq * G
  int64_t mtiles;   // ceil(rows / 16)
  int64_t mblocks;  // blocks along the rows
  int64_t warps;    // warps per block (one 16-row tile each)
};

VG_HD RowPacking attn_row_packing(int64_t Sq, int64_t G) {
  RowPacking p;
  p.rows = Sq * G;
  p.mtiles = ceil_div(p.rows, kAttnRowsPerWarp);
  p.mblocks = p.mtiles > 0 ? ceil_div(p.mtiles, kAttnMaxWarps) : 0;
  p.warps = p.mblocks > 0 ? ceil_div(p.mtiles, p.mblocks) : 0;
  return p;
}

// Packed rows [begin, end) of row-block mb (end <= rows; may be empty only if the packing
// is degenerate, which the host test rules out).
VG_HD int64_t attn_block_row_begin(const RowPacking& p, int64_t mb) { return mb * p.warps * kAttnRowsPerWarp; }
VG_HD int64_t attn_block_row_end(const RowPacking& p, int64_t mb) {
  return imin(p.rows, (mb + 1) * p.warps * kAttnRowsPerWarp);
}

// ---------------------------------------------------------------------------------------
// Short-query attention: split-KV plan
// ---------------------------------------------------------------------------------------
//
// The keys [0, Sk) are cut into 64-key tiles and the tiles into num_splits contiguous
// ranges of tiles_per_split tiles (the last may be shorter, none is empty). Each
// (batch, KV head, row block, split) is one block; splits are merged by their lse.
struct SplitPlan {
  int64_t total_tiles;
  int64_t num_splits;
  int64_t tiles_per_split;
};

// Fraction of the machine's block slots that `blocks` keep busy over the waves they need.
VG_HD double wave_efficiency(int64_t blocks, int64_t slots) {
  if (blocks <= 0 || slots <= 0) return 0.0;
  const int64_t waves = ceil_div(blocks, slots);
  return double(blocks) / double(waves * slots);
}

// Number of splits when the caller does not force one: the smallest count whose wave
// efficiency is within 85% of the best reachable, never below two tiles per split.
VG_HD int64_t attn_auto_splits(int64_t total_tiles, int64_t base_blocks, int64_t slots) {
  if (base_blocks <= 0 || slots <= 0 || total_tiles <= 0) return 1;
  // Already enough blocks to fill the machine: splitting only adds merge traffic.
  if (base_blocks * 5 >= slots * 4) return 1;
  int64_t max_n = imin(kAttnMaxSplits, imax(1, total_tiles / kAttnMinTilesPerSplit));
  double best = 0.0;
  for (int64_t n = 1; n <= max_n; ++n) {
    const double e = wave_efficiency(base_blocks * n, slots);
    if (e > best) best = e;
  }
  for (int64_t n = 1; n <= max_n; ++n) {
    if (wave_efficiency(base_blocks * n, slots) >= 0.85 * best) return n;
  }
  return 1;
}

// requested > 0 forces (up to clamping) the number of splits; 0 picks it automatically.
VG_HD SplitPlan attn_split_plan(int64_t Sk, int64_t base_blocks, int64_t slots, int64_t requested) {
  SplitPlan s;
  s.total_tiles = ceil_div(Sk, kAttnTileKeys);
  if (s.total_tiles <= 0) {
    s.total_tiles = 0;
    s.num_splits = 1;
    s.tiles_per_split = 0;
    return s;
  }
  int64_t n = requested > 0 ? requested : attn_auto_splits(s.total_tiles, base_blocks, slots);
  n = imax(1, imin(n, imin(s.total_tiles, kAttnMaxSplits)));
  s.tiles_per_split = ceil_div(s.total_tiles, n);
  // Re-derive the count so that no split is left without tiles.
  s.num_splits = ceil_div(s.total_tiles, s.tiles_per_split);
  return s;
}

// Tiles [lo, hi) that split `split` processes for a row block whose rows attend keys
// below key_lim; hi <= lo means the split has nothing to do for this block.
VG_HD void attn_split_tiles(const SplitPlan& s, int64_t split, int64_t key_lim, int64_t* lo, int64_t* hi) {
  *lo = split * s.tiles_per_split;
  int64_t h = imin(s.total_tiles, *lo + s.tiles_per_split);
  *hi = imin(h, ceil_div(key_lim, kAttnTileKeys));
}

// ---------------------------------------------------------------------------------------
// Softmax arithmetic
// ---------------------------------------------------------------------------------------

// One online-softmax step in base 2. Given the running max m_old and the max of the new
// tile's (already masked) scores, returns the new running max, the offset to subtract
// before exponentiating (0 instead of -inf, so that exp2(-inf - -inf) never makes a NaN
// in a row that has seen no key yet) and the factor that rescales the old sums.
struct OnlineStep {
  float m_new;
  float m_use;
  float alpha;
};

VG_HD OnlineStep online_softmax_step(float m_old, float tile_max) {
  OnlineStep s;
  s.m_new = m_old > tile_max ? m_old : tile_max;
  s.m_use = s.m_new == neg_inf() ? 0.0f : s.m_new;
  s.alpha = exp2f(m_old - s.m_use);  // m_old = -inf gives exactly 0
  return s;
}

// Final natural-log lse of a row from its base-2 running max and sum; -inf for a row
// that attended no key.
VG_HD float finish_lse(float m2, float l) {
  return l > 0.0f ? (m2 + log2f(l)) * 0.69314718055994530942f : neg_inf();
}

// log(sum_i exp(lse_i)) over n partial results lse[i * stride]; -inf when all are -inf.
VG_HD float merge_lse(const float* lse, int64_t n, int64_t stride) {
  float m = neg_inf();
  for (int64_t i = 0; i < n; ++i) m = fmaxf(m, lse[i * stride]);
  if (m == neg_inf()) return neg_inf();
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += expf(lse[i * stride] - m);
  return m + logf(s);
}

// Weight of a partial result (normalised by its own sum) in the merged output.
VG_HD float merge_weight(float lse_i, float lse_total) {
  return lse_total == neg_inf() ? 0.0f : expf(lse_i - lse_total);
}

// ---------------------------------------------------------------------------------------
// Tensor-core fragment addressing of the attention kernel
// ---------------------------------------------------------------------------------------
//
// mma.sync m16n8k16 (16-bit inputs, fp32 accumulators), lane = 4 g + t:
//   accumulator c (0..3):        row g + 8 (c / 2),            column 2t + c % 2
//   A register a (0..3), half e: row g + 8 (a % 2),            column 2t + e + 8 (a / 2)
// The kernel keeps these mappings here so that the host test can replay them.
VG_HD int acc_row(int lane, int c) { return (lane >> 2) + 8 * (c >> 1); }
VG_HD int acc_col(int lane, int c) { return 2 * (lane & 3) + (c & 1); }
VG_HD int afrag_row(int lane, int a) { return (lane >> 2) + 8 * (a & 1); }
VG_HD int afrag_col(int lane, int a, int e) { return 2 * (lane & 3) + e + 8 * (a >> 1); }

// ldmatrix.x4 row addresses (lane 8m + r gives row r of matrix m). For K (scores, B
// operand, no transpose) one x4 covers keys [16 np, 16 np + 16) x dims [16 ks, 16 ks + 16):
// matrices (keys +0..7, d +0..7), (keys +0..7, d +8..15), (keys +8..15, d +0..7),
// (keys +8..15, d +8..15) = b0, b1 of n-tile 2 np and b0, b1 of n-tile 2 np + 1.
VG_HD int ldsm_k_key(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
VG_HD int ldsm_k_dim(int lane) { return ((lane >> 3) & 1) * 8; }
// For V (P.V, B operand, transposed) one x4 covers keys [16 kk, 16 kk + 16) x dims
// [16 dp, 16 dp + 16): matrices (keys +0..7, d +0..7), (keys +8..15, d +0..7),
// (keys +0..7, d +8..15), (keys +8..15, d +8..15) = b0, b1 of d-tile 2 dp and of 2 dp + 1.
VG_HD int ldsm_v_key(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
VG_HD int ldsm_v_dim(int lane) { return (lane >> 4) * 8; }
// P as the A operand of key step kk: register a, half e is score accumulator
// s[p_ntile(kk, a)][p_elem(a, e)] (the C layout of two 8-key n-tiles is the A layout).
VG_HD int p_ntile(int kk, int a) { return 2 * kk + (a >> 1); }
VG_HD int p_elem(int a, int e) { return 2 * (a & 1) + e; }

// ---------------------------------------------------------------------------------------
// Capture and metrics geometry
// ---------------------------------------------------------------------------------------

// Query heads of one KV group that one capture block serves, and the number of head
// chunks a group is cut into (G > 32 only for extreme GQA ratios).
VG_HD int64_t capture_heads_per_block(int64_t G) { return imin(G, kCaptureMaxHeadsPerBlock); }
VG_HD int64_t capture_head_chunks(int64_t G) { return G > 0 ? ceil_div(G, capture_heads_per_block(G)) : 0; }
VG_HD int64_t capture_key_blocks(int64_t N) { return ceil_div(N, kCaptureKeysPerBlock); }

// Threads per metrics row: enough to keep each thread on a handful of elements.
VG_HD int metrics_block_threads(int64_t N) { return N <= 512 ? 64 : (N <= 2048 ? 128 : 256); }

}  // namespace vg
