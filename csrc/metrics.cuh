// Grounding metrics of attention rows against ground-truth masks (SPEC §3).
//
// For each row r of R rows of N values, with a = attn / reference (or attn) and m = mask:
//   Â = a / Σa,  M̂ = m / Σm
//   AR = (Σ a·m / Σm) / (Σa / N)
//   KL = Σ_{M̂>0} M̂ (log M̂ − log max(Â, eps))
//   JS = ½ Σ_{Â>0} Â log(Â/R) + ½ Σ_{M̂>0} M̂ log(M̂/R),   R = (Â + M̂) / 2
// A row with Σm = 0 or Σa = 0 (or a NaN sum) gives NaN for all three.
//
// Torch-free: included by the binding (host C++) and by metrics.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vg {

struct MetricsParams {
  // attn: R x N float32, row-major contiguous.
  const float* attn = nullptr;
  int64_t R = 0, N = 0;
  // mask and reference (float32) are broadcast: row r, element j at
  // base + row_off[r] + j * n_stride. reference may be null.
  const float* mask = nullptr;
  const int64_t* mask_row_off = nullptr;
  int64_t mask_n_stride = 1;
  const float* ref = nullptr;
  const int64_t* ref_row_off = nullptr;
  int64_t ref_n_stride = 1;
  float eps = 1e-12f;
  // Outputs: R float32 each.
  float* ar = nullptr;
  float* kl = nullptr;
  float* js = nullptr;
};

cudaError_t launch_metrics(const MetricsParams& p, cudaStream_t stream);

}  // namespace vg
