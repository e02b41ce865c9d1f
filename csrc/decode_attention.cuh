// Short-query attention with knockout and capture: a block of Sq <= 128 query rows
// against a long KV cache, split over the keys ("flash-decoding") and merged by
// log-sum-exp.
//
// Shapes (flash-attn layout): q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), Hq = G * Hkv,
// D in {64, 80, 96, 128}, float16 or bfloat16, last dim contiguous and every other stride
// a multiple of 8 elements (16-byte rows). Query row i sits at absolute position
// Sk - Sq + i; with `causal` it attends keys j <= Sk - Sq + i. For a row with allowed
// keys A (causal and key_padding_mask) and knocked keys K (keys key_start + j with
// keep[j] false, for rows in [query_start, query_end)), with s_j = scale q.k_j:
//
//   renorm: lse = log Σ_{A\K} exp(s_j),  out = Σ_{A\K} exp(s_j - lse) v_j
//   zero:   lse = log Σ_{A}   exp(s_j),  out = Σ_{A\K} exp(s_j - lse) v_j
//
// A row with no key gives out = 0 and lse = -inf.
//
// Torch-free: included by the binding (host C++) and by decode_attention.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vg {

enum KnockoutMode : int { kKnockNone = 0, kKnockRenorm = 1, kKnockZero = 2 };

struct AttnParams {
  const void* q = nullptr;
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;
  const void* k = nullptr;
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  const void* v = nullptr;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  int64_t B = 0, Sq = 0, Sk = 0, Hq = 0, Hkv = 0, D = 0;
  int dtype = 0;      // vg::DType: float16 or bfloat16
  float scale = 1.0f;  // softmax scale (natural units)
  bool causal = true;
  // key_padding_mask (B, Sk) bool, True = real key; may be null.
  const uint8_t* kpm = nullptr;
  int64_t kpm_sb = 0;
  // Knockout (all null / kKnockNone when absent): (B,) int64 vectors and keep (B, ko_len).
  int ko_mode = kKnockNone;
  const int64_t* ko_q_start = nullptr;
  const int64_t* ko_q_end = nullptr;
  const int64_t* ko_key_start = nullptr;
  const uint8_t* ko_keep = nullptr;
  int64_t ko_keep_sb = 0, ko_len = 0;
  // Final outputs: out (B, Sq, Hq, D) in q's dtype with strides o_*, lse (B, Hq, Sq)
  // float32 contiguous.
  void* out = nullptr;
  int64_t o_sb = 0, o_ss = 0, o_sh = 0;
  float* lse = nullptr;
  // Split-KV workspace, used when num_splits > 1: part_o (num_splits, B, Hq, Sq, D) and
  // part_lse (num_splits, B, Hq, Sq), float32 contiguous.
  float* part_o = nullptr;
  float* part_lse = nullptr;
  // Plan, filled by plan_attention().
  int64_t num_splits = 1;
  int64_t tiles_per_split = 0;
  int64_t total_tiles = 0;
};

// Chooses the split count (requested > 0 forces it, clamped to [1, tiles]) for the shape
// in p and the current device, and writes it into p. Returns the CUDA error of the device
// queries.
cudaError_t plan_attention(AttnParams& p, int64_t requested_splits);

// Launches the attention (and the merge when p.num_splits > 1) on `stream`. The caller
// has allocated part_o / part_lse for p.num_splits > 1.
cudaError_t launch_attention(const AttnParams& p, cudaStream_t stream);

}  // namespace vg
