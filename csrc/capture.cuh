// Capture of one query row's attention probabilities over a key span, from q, K and the
// row's log-sum-exp:
//
//   probs[b, h, j] = exp(scale * q[b, h] . k[b, key_start[b] + j, h / G] - lse[b, h])
//
// for keys the row actually attends, 0 for the others (outside the causal limit, padded,
// or knocked out). Serves both `capture_from_lse` and the Capture of the attention
// kernel, which passes the merged lse of its own output.
//
// Torch-free: included by the binding (host C++) and by capture.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vg {

struct CaptureParams {
  // q: element (b, h, d) of the captured row is at q + b*q_sb + qi[b]*q_si + h*q_sh + d,
  // where qi = q_row ? q_row[b] : 0 (the row's index inside a (B, Sq, Hq, D) block).
  const void* q = nullptr;
  int64_t q_sb = 0, q_si = 0, q_sh = 0;
  const int64_t* q_row = nullptr;
  // k: (B, Sk, Hkv, D), last dim contiguous, 16-byte aligned rows.
  const void* k = nullptr;
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  // lse of the row, float32: lse + b*lse_sb + h*lse_sh + qi[b]*lse_si.
  const float* lse = nullptr;
  int64_t lse_sb = 0, lse_sh = 0, lse_si = 0;
  // Span: keys key_start[b] + j, 0 <= j < length.
  const int64_t* key_start = nullptr;
  int64_t length = 0;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0, Sk = 0;
  float scale = 1.0f;
  int dtype = 0;  // vg::DType of q and k
  // Optional masks. row_pos[b]: absolute position of the row (needed for causal and for
  // a row-restricted keep). causal: keys after row_pos get 0.
  const int64_t* row_pos = nullptr;
  bool causal = false;
  // key_padding_mask (B, Sk) bool, True = real key.
  const uint8_t* kpm = nullptr;
  int64_t kpm_sb = 0;
  // keep (B, keep_len) bool for keys keep_start[b] + j; applies to every batch item when
  // keep_q_lo is null, else only where keep_q_lo[b] <= row_pos[b] < keep_q_hi[b].
  const uint8_t* keep = nullptr;
  int64_t keep_sb = 0, keep_len = 0;
  const int64_t* keep_start = nullptr;
  const int64_t* keep_q_lo = nullptr;
  const int64_t* keep_q_hi = nullptr;
  // Output (B, Hq, length) float32, contiguous.
  float* probs = nullptr;
};

// Launches on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t launch_capture(const CaptureParams& p, cudaStream_t stream);

}  // namespace vg
