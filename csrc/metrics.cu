// Metrics kernel (see metrics.cuh for the mathematics).
//
// One block per row, two passes: the first sums Σa, Σm and Σa·m, the second — with the
// normalisers known — sums the KL and JS terms. A row is at most a few tens of KB, so the
// second pass re-reads it from L2 rather than holding it in shared memory, which keeps
// any N legal. Per-element arithmetic is float32; the sums are float64, so a 16K-token
// row loses nothing to the accumulation order.
#include "common.cuh"
#include "metrics.cuh"

namespace vg {
namespace {

__global__ void __launch_bounds__(256) metrics_kernel(const MetricsParams p) {
  __shared__ double scratch[32 * 3];
  const float nan = __int_as_float(0x7fc00000);
  for (int64_t r = blockIdx.x; r < p.R; r += gridDim.x) {
    const float* a_row = p.attn + r * p.N;
    const float* m_row = p.mask + p.mask_row_off[r];
    const float* ref_row = p.ref ? p.ref + p.ref_row_off[r] : nullptr;

    double s1[3] = {0.0, 0.0, 0.0};  // Σa, Σm, Σa·m
    for (int64_t j = threadIdx.x; j < p.N; j += blockDim.x) {
      float a = a_row[j];
      if (ref_row) a = a / ref_row[j * p.ref_n_stride];
      const float m = m_row[j * p.mask_n_stride];
      s1[0] += a;
      s1[1] += m;
      s1[2] += double(a) * double(m);
    }
    block_sum<3>(s1, scratch);
    const double sa = s1[0], sm = s1[1], sam = s1[2];
    // NaN-safe: a NaN sum fails both comparisons.
    const bool bad = !(sa != 0.0 && sa == sa) || !(sm != 0.0 && sm == sm);
    if (bad) {
      if (threadIdx.x == 0) {
        p.ar[r] = nan;
        p.kl[r] = nan;
        p.js[r] = nan;
      }
      continue;  // uniform across the block: no barrier is skipped by only some threads
    }

    const float inv_sa = float(1.0 / sa);
    const float inv_sm = float(1.0 / sm);
    double s2[3] = {0.0, 0.0, 0.0};  // KL, Σ Â log(Â/R), Σ M̂ log(M̂/R)
    for (int64_t j = threadIdx.x; j < p.N; j += blockDim.x) {
      float a = a_row[j];
      if (ref_row) a = a / ref_row[j * p.ref_n_stride];
      const float m = m_row[j * p.mask_n_stride];
      const float ah = a * inv_sa;
      const float mh = m * inv_sm;
      const float rr = 0.5f * (ah + mh);
      if (mh > 0.0f) {
        s2[0] += mh * (logf(mh) - logf(fmaxf(ah, p.eps)));
        s2[2] += mh * logf(mh / rr);
      }
      if (ah > 0.0f) s2[1] += ah * logf(ah / rr);
    }
    block_sum<3>(s2, scratch);
    if (threadIdx.x == 0) {
      p.ar[r] = float((sam / sm) / (sa / double(p.N)));
      p.kl[r] = float(s2[0]);
      p.js[r] = float(0.5 * (s2[1] + s2[2]));
    }
  }
}

}  // namespace

cudaError_t launch_metrics(const MetricsParams& p, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  const int threads = metrics_block_threads(p.N);
  const unsigned blocks = unsigned(imin(p.R, int64_t(1) << 30));
  metrics_kernel<<<blocks, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vg
