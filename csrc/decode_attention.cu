// Short-query attention kernels (see decode_attention.cuh for the mathematics).
//
// Work split. The Sq * G query rows of one KV head are packed as r = i * G + g (query i,
// head g of the group), so the group reads K and V once. A block serves one
// (split, row block, KV head, batch item): each of its warps owns one 16-row MMA tile and
// keeps the tile's Q fragments in registers; the block streams the split's 64-key tiles
// of K and V through a two-stage cp.async pipeline in shared memory, shared by all warps.
// Scores and P.V use mma.sync m16n8k16 with fp32 accumulators; the online softmax runs
// in base 2 on the accumulator fragments. With several splits each writes a normalised
// partial output and its lse, and a merge kernel combines them:
//   lse = log Σ_s exp(lse_s),  out = Σ_s exp(lse_s - lse) out_s.
//
// Masking per score: padding and knockout flags of the tile's keys are staged in shared
// memory next to the tile (bit 0: real key, bit 1: knocked-out key of the image span);
// causality and whether the row is in the knockout band are per row.
#include "common.cuh"
#include "decode_attention.cuh"

namespace vg {
namespace {

// 16 bytes of padding per shared row: rows of 16-bit elements then start 4 banks apart,
// so the 8 row addresses of every ldmatrix hit distinct banks (D = 64, 80, 96, 128).
constexpr int kRowPad = 8;
constexpr int kMergeWarps = 4;
// 64 key flags per tile over at least one warp's 32 threads.
constexpr int kFlagsPerThread = kAttnTileKeys / 32;

template <int D>
struct Smem {
  static constexpr int kPitch = D + kRowPad;
  static constexpr int kTileElems = kAttnTileKeys * kPitch;  // one K or V tile
  static constexpr size_t kMaskOffset = size_t(2) * 2 * kTileElems * 2;  // [stage][K|V] of 16-bit
  static constexpr size_t kBytes = kMaskOffset + 2 * kAttnTileKeys;       // + [stage][key] flags
};

__device__ __forceinline__ uint32_t ld_u32(const void* p) { return *static_cast<const uint32_t*>(p); }

template <typename T, int D>
__global__ void __launch_bounds__(kAttnMaxWarps * 32) attn_kernel(const AttnParams p) {
  constexpr int KSTEPS = D / 16;               // k-steps of Q.K^T over the head dim
  constexpr int NT = kAttnTileKeys / 8;        // 8-key n-tiles of the scores
  constexpr int DT = D / 8;                    // 8-wide n-tiles of the output
  constexpr int PITCH = Smem<D>::kPitch;
  constexpr int TILE = Smem<D>::kTileElems;
  constexpr int CHUNKS = D / 8;                // 16-byte chunks of a key row
  static_assert(D % 16 == 0, "D must be a multiple of 16");
  static_assert(NT * 4 <= 32, "knocked-score bitmask must fit 32 bits");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* kv_s = reinterpret_cast<T*>(smem_raw);
  uint8_t* flag_s = smem_raw + Smem<D>::kMaskOffset;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nthreads = blockDim.x;
  const bool quad_leader = (lane & 3) == 0;  // one lane per accumulator row writes its lse

  const int64_t split = blockIdx.x;
  const int64_t G = p.Hq / p.Hkv;
  const RowPacking pack = attn_row_packing(p.Sq, G);
  const int64_t mb = blockIdx.y % pack.mblocks;
  const int64_t kvh = blockIdx.y / pack.mblocks;
  const int64_t b = blockIdx.z;
  const int64_t row_begin = attn_block_row_begin(pack, mb);
  const int64_t row_end = attn_block_row_end(pack, mb);
  if (row_end <= row_begin) return;  // whole block: no barrier is split

  const int64_t i_last = (row_end - 1) / G;
  const int64_t klim = key_limit(p.Sk, p.Sq, i_last, p.causal);
  SplitPlan plan;
  plan.total_tiles = p.total_tiles;
  plan.num_splits = p.num_splits;
  plan.tiles_per_split = p.tiles_per_split;
  int64_t t_lo, t_hi;
  attn_split_tiles(plan, split, klim, &t_lo, &t_hi);

  const bool has_ko = p.ko_mode != kKnockNone;
  const bool zero_mode = p.ko_mode == kKnockZero;
  const int64_t ko_ks = has_ko ? p.ko_key_start[b] : 0;
  const uint8_t* keep_row = has_ko ? p.ko_keep + b * p.ko_keep_sb : nullptr;

  // The two accumulator rows of this thread (accumulators c = 0, 1 and c = 2, 3), which
  // are also the rows of its A-fragment registers a = 0, 2 and a = 1, 3.
  bool valid[2], affected[2];
  int64_t qi[2], qh[2], pos[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t r = row_begin + int64_t(warp) * kAttnRowsPerWarp + acc_row(lane, 2 * rr);
    valid[rr] = r < row_end;
    qi[rr] = r / G;
    qh[rr] = kvh * G + (r - qi[rr] * G);
    pos[rr] = query_pos(p.Sk, p.Sq, qi[rr]);
    affected[rr] = has_ko && valid[rr] && row_affected(pos[rr], p.ko_q_start[b], p.ko_q_end[b]);
  }

  // Q fragments (A operand) straight from global memory, once per block; rows past the
  // end are zero so their scores stay finite.
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb;
  uint32_t qf[KSTEPS][4];
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int rr = a & 1;  // afrag_row(lane, a) is this thread's row rr
      const T* qrow = qb + qi[rr] * p.q_ss + qh[rr] * p.q_sh;
      qf[ks][a] = valid[rr] ? ld_u32(qrow + ks * 16 + afrag_col(lane, a, 0)) : 0u;
    }
  }

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  // K and V of tile t into `stage` with cp.async; rows past Sk are zero-filled.
  auto issue_kv = [&](int64_t t, int stage) {
    const int64_t key0 = t * kAttnTileKeys;
    T* k_dst = kv_s + (2 * stage) * TILE;
    T* v_dst = kv_s + (2 * stage + 1) * TILE;
    for (int c = tid; c < kAttnTileKeys * CHUNKS; c += nthreads) {
      const int row = c / CHUNKS;
      const int ch = c - row * CHUNKS;
      const int64_t key = key0 + row;
      const bool in = key < p.Sk;
      const int64_t src = in ? key : 0;  // any valid address; zero bytes are read
      cp_async16(smem_addr(k_dst + row * PITCH + ch * 8), kbase + src * p.k_ss + ch * 8, in ? 16 : 0);
      cp_async16(smem_addr(v_dst + row * PITCH + ch * 8), vbase + src * p.v_ss + ch * 8, in ? 16 : 0);
    }
  };
  // Key flags of tile t (bit 0: real key, bit 1: knocked-out image key), fetched into
  // registers one tile ahead and stored to shared memory only after the current tile's
  // maths, so the global reads of the padding mask and keep overlap the MMAs.
  auto fetch_flags = [&](int64_t t, uint8_t (&f)[kFlagsPerThread]) {
#pragma unroll
    for (int i = 0; i < kFlagsPerThread; ++i) {
      const int kk = tid + i * nthreads;
      const int64_t key = t * kAttnTileKeys + kk;
      f[i] = 0;
      if (kk < kAttnTileKeys && key < p.Sk) {
        const bool real = p.kpm == nullptr || p.kpm[b * p.kpm_sb + key] != 0;
        const bool knocked = has_ko && key_knocked(key, ko_ks, p.ko_len, keep_row);
        f[i] = uint8_t((real ? 1 : 0) | (knocked ? 2 : 0));
      }
    }
  };
  auto store_flags = [&](int stage, const uint8_t (&f)[kFlagsPerThread]) {
#pragma unroll
    for (int i = 0; i < kFlagsPerThread; ++i) {
      const int kk = tid + i * nthreads;
      if (kk < kAttnTileKeys) flag_s[stage * kAttnTileKeys + kk] = f[i];
    }
  };

  float o_acc[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o_acc[dt][0] = o_acc[dt][1] = o_acc[dt][2] = o_acc[dt][3] = 0.0f;
  float m_run[2] = {neg_inf(), neg_inf()};
  float l_run[2] = {0.0f, 0.0f};  // per-thread partial sums; the quad is summed at the end
  const float scale_log2 = p.scale * 1.4426950408889634f;

  uint8_t flags_next[kFlagsPerThread];
  if (t_lo < t_hi) {
    issue_kv(t_lo, 0);
    cp_async_commit();
    fetch_flags(t_lo, flags_next);
    store_flags(0, flags_next);
  }
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int stage = int((t - t_lo) & 1);
    const bool has_next = t + 1 < t_hi;
    if (has_next) {
      issue_kv(t + 1, stage ^ 1);
      fetch_flags(t + 1, flags_next);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group" = tile t
    cp_async_wait<1>();
    __syncthreads();

    const T* k_s = kv_s + (2 * stage) * TILE;
    const T* v_s = kv_s + (2 * stage + 1) * TILE;
    const uint8_t* f_s = flag_s + stage * kAttnTileKeys;

    // S = Q K^T for the warp's 16 rows x 64 keys. One ldmatrix.x4 yields the B fragments
    // of two 8-key n-tiles for one 16-wide k-step: matrices (keys +0..7, d +0..7),
    // (keys +0..7, d +8..15), (keys +8..15, d +0..7), (keys +8..15, d +8..15).
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      const int key_l = np * 16 + ldsm_k_key(lane);
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        const int d = ks * 16 + ldsm_k_dim(lane);
        uint32_t bf[4];
        ldmatrix_x4(bf, smem_addr(k_s + key_l * PITCH + d));
        mma16816<T>(s[2 * np], qf[ks], bf[0], bf[1]);
        mma16816<T>(s[2 * np + 1], qf[ks], bf[2], bf[3]);
      }
    }

    // Mask, scale to base 2, row maxima. s[nt][c]: row rr = c / 2, key nt*8 + acc_col(lane, c).
    const int64_t key0 = t * kAttnTileKeys;
    uint32_t knocked_bits = 0;
    float tmax[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int rr = c >> 1;
        const int kl = nt * 8 + acc_col(lane, c);
        const uint8_t f = f_s[kl];
        const bool allowed = (f & 1) && (!p.causal || key0 + kl <= pos[rr]);
        const bool knocked = (f & 2) && affected[rr];
        float x = s[nt][c] * scale_log2;
        if (!allowed || (knocked && !zero_mode)) x = neg_inf();
        // zero mode: the key stays in the denominator, its probability is dropped below.
        if (knocked && zero_mode && allowed) knocked_bits |= 1u << (nt * 4 + c);
        s[nt][c] = x;
        tmax[rr] = fmaxf(tmax[rr], x);
      }
    }
    OnlineStep st[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) st[rr] = online_softmax_step(m_run[rr], quad_max(tmax[rr]));

    float lsum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int rr = c >> 1;
        float e = exp2f(s[nt][c] - st[rr].m_use);
        lsum[rr] += e;
        if ((knocked_bits >> (nt * 4 + c)) & 1u) e = 0.0f;
        s[nt][c] = e;
      }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      l_run[rr] = l_run[rr] * st[rr].alpha + lsum[rr];
      m_run[rr] = st[rr].m_new;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o_acc[dt][0] *= st[0].alpha;
      o_acc[dt][1] *= st[0].alpha;
      o_acc[dt][2] *= st[1].alpha;
      o_acc[dt][3] *= st[1].alpha;
    }

    // O += P V. The score accumulators of n-tiles 2kk and 2kk+1 are exactly the A
    // fragment of the 16-key step kk; V's B fragments come from ldmatrix.trans, one x4
    // giving two 8-wide d-tiles: matrices (keys +0..7, d +0..7), (keys +8..15, d +0..7),
    // (keys +0..7, d +8..15), (keys +8..15, d +8..15).
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t pa[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        pa[a] = pack2<T>(s[p_ntile(kk, a)][p_elem(a, 0)], s[p_ntile(kk, a)][p_elem(a, 1)]);
      }
      const int key_l = kk * 16 + ldsm_v_key(lane);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        const int d = dp * 16 + ldsm_v_dim(lane);
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, smem_addr(v_s + key_l * PITCH + d));
        mma16816<T>(o_acc[2 * dp], pa, bf[0], bf[1]);
        mma16816<T>(o_acc[2 * dp + 1], pa, bf[2], bf[3]);
      }
    }
    if (has_next) store_flags(stage ^ 1, flags_next);  // that stage was last read before the previous barrier
    __syncthreads();  // the next iteration refills this stage, and reads the flags just stored
  }

  // Epilogue: normalise, write the output (one split) or the partial (several).
  const int64_t n_rows = p.B * p.Hq * p.Sq;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float l = quad_sum(l_run[rr]);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse = finish_lse(m_run[rr], l);
    if (!valid[rr]) continue;
    const int64_t row_lin = (b * p.Hq + qh[rr]) * p.Sq + qi[rr];  // index into (B, Hq, Sq)
    if (p.num_splits == 1) {
      T* orow = static_cast<T*>(p.out) + b * p.o_sb + qi[rr] * p.o_ss + qh[rr] * p.o_sh;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        *reinterpret_cast<uint32_t*>(orow + dt * 8 + acc_col(lane, 2 * rr)) =
            pack2<T>(o_acc[dt][2 * rr] * inv, o_acc[dt][2 * rr + 1] * inv);
      }
      if (quad_leader) p.lse[row_lin] = lse;
    } else {
      const int64_t part = split * n_rows + row_lin;
      float* po = p.part_o + part * D;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        *reinterpret_cast<float2*>(po + dt * 8 + acc_col(lane, 2 * rr)) =
            make_float2(o_acc[dt][2 * rr] * inv, o_acc[dt][2 * rr + 1] * inv);
      }
      if (quad_leader) p.part_lse[part] = lse;
    }
  }
}

// One warp per (b, h, i) row: lse = log Σ_s exp(lse_s), out = Σ_s exp(lse_s - lse) out_s.
template <typename T>
__global__ void __launch_bounds__(kMergeWarps * 32) merge_kernel(const AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t n_rows = p.B * p.Hq * p.Sq;
  const int64_t row = int64_t(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (row >= n_rows) return;
  const int64_t i = row % p.Sq;
  const int64_t bh = row / p.Sq;
  const int64_t h = bh % p.Hq;
  const int64_t b = bh / p.Hq;
  const float lse = merge_lse(p.part_lse + row, p.num_splits, n_rows);
  T* orow = static_cast<T*>(p.out) + b * p.o_sb + i * p.o_ss + h * p.o_sh;
  for (int64_t d = lane; d < p.D; d += 32) {
    float acc = 0.0f;
    for (int64_t s = 0; s < p.num_splits; ++s) {
      const float w = merge_weight(p.part_lse[s * n_rows + row], lse);
      if (w != 0.0f) acc += w * p.part_o[(s * n_rows + row) * p.D + d];
    }
    orow[d] = from_float<T>(acc);
  }
  if (lane == 0) p.lse[row] = lse;
}

using AttnFn = void (*)(const AttnParams);

template <typename T>
AttnFn pick_kernel(int64_t D, size_t* smem) {
  switch (D) {
    case 64:
      *smem = Smem<64>::kBytes;
      return attn_kernel<T, 64>;
    case 80:
      *smem = Smem<80>::kBytes;
      return attn_kernel<T, 80>;
    case 96:
      *smem = Smem<96>::kBytes;
      return attn_kernel<T, 96>;
    case 128:
      *smem = Smem<128>::kBytes;
      return attn_kernel<T, 128>;
    default:
      return nullptr;
  }
}

AttnFn pick(int dtype, int64_t D, size_t* smem) {
  if (dtype == kFloat16) return pick_kernel<__half>(D, smem);
  if (dtype == kBFloat16) return pick_kernel<__nv_bfloat16>(D, smem);
  return nullptr;
}

}  // namespace

cudaError_t plan_attention(AttnParams& p, int64_t requested_splits) {
  size_t smem = 0;
  AttnFn fn = pick(p.dtype, p.D, &smem);
  if (fn == nullptr) return cudaErrorInvalidValue;
  const RowPacking pack = attn_row_packing(p.Sq, p.Hkv > 0 ? p.Hq / p.Hkv : 0);
  const int threads = int(pack.warps) * 32;
  int dev = 0, sms = 1, per_sm = 1;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn),
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess && threads > 0) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, reinterpret_cast<const void*>(fn), threads, smem);
  }
  if (err != cudaSuccess) return err;
  const SplitPlan s = attn_split_plan(p.Sk, p.B * p.Hkv * pack.mblocks, int64_t(sms) * imax(per_sm, 1),
                                      requested_splits);
  p.num_splits = s.num_splits;
  p.tiles_per_split = s.tiles_per_split;
  p.total_tiles = s.total_tiles;
  return cudaSuccess;
}

cudaError_t launch_attention(const AttnParams& p, cudaStream_t stream) {
  size_t smem = 0;
  AttnFn fn = pick(p.dtype, p.D, &smem);
  if (fn == nullptr) return cudaErrorInvalidValue;
  if (p.B == 0 || p.Sq == 0 || p.Hq == 0) return cudaSuccess;
  const RowPacking pack = attn_row_packing(p.Sq, p.Hq / p.Hkv);
  cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  dim3 grid(unsigned(p.num_splits), unsigned(p.Hkv * pack.mblocks), unsigned(p.B));
  fn<<<grid, unsigned(pack.warps * 32), smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t n_rows = p.B * p.Hq * p.Sq;
  const unsigned mblocks = unsigned(ceil_div(n_rows, kMergeWarps));
  if (p.dtype == kFloat16) {
    merge_kernel<__half><<<mblocks, kMergeWarps * 32, 0, stream>>>(p);
  } else {
    merge_kernel<__nv_bfloat16><<<mblocks, kMergeWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace vg
