// Capture kernel (see capture.cuh for the mathematics).
//
// Memory-bound: the span's keys are read once, with 16-byte loads that bypass L1, and
// each key serves all query heads of its KV group (GQA without copies). Layout: a block
// covers 64 keys x up to 32 heads of one (batch, KV head); four lanes share one key, each
// holding every fourth 16-byte chunk of it, so a key row is read as contiguous 64-byte
// runs; the query rows sit in shared memory as float32.
#include "capture.cuh"
#include "common.cuh"

namespace vg {
namespace {

constexpr int kLanesPerKey = 4;

template <typename T>
__global__ void __launch_bounds__(kCaptureThreads) capture_kernel(const CaptureParams p) {
  constexpr int VEC = Vec16<T>::kElems;
  constexpr int MAXU = kCaptureMaxD / VEC / kLanesPerKey;  // chunks per lane at D = 256
  extern __shared__ float smem[];

  const int64_t b = blockIdx.z;
  const int64_t G = p.Hq / p.Hkv;
  const int64_t hpb = capture_heads_per_block(G);
  const int64_t nhc = capture_head_chunks(G);
  const int64_t kvh = blockIdx.y / nhc;
  const int64_t g0 = (blockIdx.y % nhc) * hpb;
  const int nh = int(imin(hpb, G - g0));
  const int64_t h0 = kvh * G + g0;
  const int D = int(p.D);
  const int nchunks = D / VEC;

  float* q_s = smem;                  // [nh][D]
  float* lse_s = smem + hpb * p.D;    // [nh]
  const int64_t qi = p.q_row ? p.q_row[b] : 0;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + qi * p.q_si;
  for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
    const int g = idx / D, d = idx - g * D;
    q_s[idx] = to_float(q[(h0 + g) * p.q_sh + d]);
  }
  for (int g = threadIdx.x; g < nh; g += blockDim.x) {
    lse_s[g] = p.lse[b * p.lse_sb + (h0 + g) * p.lse_sh + qi * p.lse_si];
  }

  const int64_t ks = p.key_start[b];
  const int64_t pos = p.row_pos ? p.row_pos[b] : 0;
  const bool causal = p.causal && p.row_pos != nullptr;
  const bool knock = p.keep != nullptr &&
                     (p.keep_q_lo == nullptr || row_affected(pos, p.keep_q_lo[b], p.keep_q_hi[b]));
  const uint8_t* keep_row = p.keep ? p.keep + b * p.keep_sb : nullptr;
  const int64_t keep_start = knock ? p.keep_start[b] : 0;
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane & (kLanesPerKey - 1);
  const int keys_per_pass = (blockDim.x >> 5) * (32 / kLanesPerKey);
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  float* out = p.probs + (b * p.Hq + h0) * p.length;

  // Every lane of a warp runs the same number of passes (64 is a multiple of
  // keys_per_pass), so the quad shuffles below always see full warps.
  for (int kk = warp * (32 / kLanesPerKey) + lane / kLanesPerKey; kk < kCaptureKeysPerBlock; kk += keys_per_pass) {
    const int64_t j = int64_t(blockIdx.x) * kCaptureKeysPerBlock + kk;
    const bool in_span = j < p.length;
    const int64_t key = ks + j;
    bool allowed = in_span;
    if (allowed && causal) allowed = key <= pos;
    if (allowed && p.kpm) allowed = p.kpm[b * p.kpm_sb + key] != 0;
    if (allowed && knock) allowed = !key_knocked(key, keep_start, p.keep_len, keep_row);

    // Keys that get 0 are never read: no traffic for padding or knocked-out tokens.
    float kf[MAXU][VEC];
#pragma unroll
    for (int u = 0; u < MAXU; ++u) {
      const int c = sub + kLanesPerKey * u;
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (allowed && c < nchunks) raw = ld_stream16(kbase + key * p.k_ss + c * VEC);
      unpack16(raw, kf[u], static_cast<const T*>(nullptr));
    }
    for (int g = 0; g < nh; ++g) {
      const float* qg = q_s + g * D;
      float acc = 0.0f;
#pragma unroll
      for (int u = 0; u < MAXU; ++u) {
        const int c = sub + kLanesPerKey * u;
        if (c < nchunks) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc = fmaf(qg[c * VEC + e], kf[u][e], acc);
        }
      }
      acc = quad_sum(acc);
      // The four lanes of a key take turns writing, spreading the stores over the quad.
      if (in_span && sub == (g & (kLanesPerKey - 1))) {
        out[g * p.length + j] = allowed ? expf(acc * p.scale - lse_s[g]) : 0.0f;
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(const CaptureParams& p, cudaStream_t stream) {
  const int64_t G = p.Hq / p.Hkv;
  const int64_t hpb = capture_heads_per_block(G);
  dim3 grid(unsigned(capture_key_blocks(p.length)), unsigned(p.Hkv * capture_head_chunks(G)), unsigned(p.B));
  const size_t smem = size_t(hpb * p.D + hpb) * sizeof(float);
  capture_kernel<T><<<grid, kCaptureThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_capture(const CaptureParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Hq == 0 || p.length == 0) return cudaSuccess;
  switch (p.dtype) {
    case kFloat16:
      return launch_typed<__half>(p, stream);
    case kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
    case kFloat32:
      return launch_typed<float>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace vg
