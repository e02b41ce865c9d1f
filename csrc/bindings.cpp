// The one torch-facing file: registers the CUDA operators of vgkernels._C under
// torch.ops.vgkernels and checks their inputs before handing raw pointers to the
// torch-free launchers in capture.cuh, metrics.cuh and decode_attention.cuh.
//
// The operators take arguments already normalised by vgkernels._validate (index vectors
// int64 on the device, spans inside [0, Sk)); range checks that would need a device ->
// host copy are left to that layer. Shape, dtype, device and layout are checked here.
//
//   vgkernels::capture_rows(q_row, k, lse_row, key_start, length, scale, keep?) -> probs
//   vgkernels::metrics_rows(attn, mask, reference?, eps) -> (ar, kl, js)
//   vgkernels::decode_attention(q, k, v, causal, scale, key_padding_mask?,
//       ko_query_start?, ko_query_end?, ko_key_start?, ko_keep?, ko_mode,
//       cap_row?, cap_key_start?, cap_length, num_splits) -> (out, lse, probs)
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "capture.cuh"
#include "decode_attention.cuh"
#include "geometry.h"
#include "metrics.cuh"

// Importing vgkernels._C loads this library, whose static initialisers register the
// operators; the module object itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "vgkernels._C",
                            "CUDA kernels of vgkernels, exposed as torch.ops.vgkernels.*", -1, nullptr};
  return PyModule_Create(&def);
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int kCodeF16 = 0, kCodeBF16 = 1, kCodeF32 = 2;  // vg::DType

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return kCodeF16;
    case at::kBFloat16:
      return kCodeBF16;
    case at::kFloat:
      return kCodeF32;
    default:
      return -1;
  }
}

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
}

void check_dim(const Tensor& t, const char* name, int64_t ndim, const char* expected) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, ": expected shape ", expected, ", got ", t.sizes());
}

// Last dim contiguous, data pointer and every stride of a non-trivial dim on 16 bytes:
// what the 16-byte vector loads and cp.async copies need.
bool rows_aligned16(const Tensor& t) {
  if (t.numel() == 0) return true;
  if (t.stride(-1) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  const int64_t es = t.element_size();
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * es) % 16 != 0) return false;
  }
  return true;
}

void check_aligned(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(rows_aligned16(t), name, ": expected a contiguous last dim and 16-byte aligned rows (data "
                    "pointer and strides multiples of 16 bytes), got strides ", t.strides(),
                    "; call .contiguous() on it");
}

Tensor index_vector(const Tensor& t, const char* name, int64_t B, const Tensor& ref) {
  check_cuda(t, name, ref);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, ": expected int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, ": expected shape (", B, ",), got ", t.sizes());
  return t.contiguous();
}

Tensor bool_matrix(const Tensor& t, const char* name, int64_t B, int64_t N, const Tensor& ref) {
  check_cuda(t, name, ref);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, name, ": expected dtype bool, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && (N < 0 || t.size(1) == N), name, ": expected shape (", B,
                    ", ", (N < 0 ? std::string("N") : std::to_string(N)), "), got ", t.sizes());
  return t.contiguous();
}

const uint8_t* bytes(const Tensor& t) { return reinterpret_cast<const uint8_t*>(t.data_ptr()); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vgkernels._C: ", what, " failed: ", cudaGetErrorString(err));
}

// The fields every capture launch shares: q's row addressing (q + b*q_sb + qi*q_si +
// h*q_sh), K, the key span, the shapes (from k and probs (B, Hq, length)) and the output.
vg::CaptureParams capture_params(const Tensor& q, int64_t q_si, int64_t q_sh, const Tensor& k,
                                 const Tensor& key_start, double scale, int code, Tensor& probs) {
  vg::CaptureParams c;
  c.q = q.data_ptr();
  c.q_sb = q.stride(0);
  c.q_si = q_si;
  c.q_sh = q_sh;
  c.k = k.data_ptr();
  c.k_sb = k.stride(0);
  c.k_ss = k.stride(1);
  c.k_sh = k.stride(2);
  c.key_start = key_start.data_ptr<int64_t>();
  c.length = probs.size(2);
  c.B = k.size(0);
  c.Hq = probs.size(1);
  c.Hkv = k.size(2);
  c.D = k.size(3);
  c.Sk = k.size(1);
  c.scale = float(scale);
  c.dtype = code;
  c.probs = probs.data_ptr<float>();
  return c;
}

// ---------------------------------------------------------------------------------------
// capture_rows
// ---------------------------------------------------------------------------------------

Tensor capture_rows(const Tensor& q_row, const Tensor& k, const Tensor& lse_row, const Tensor& key_start,
                    int64_t length, double scale, const OptTensor& keep) {
  check_dim(q_row, "q_row", 3, "(B, Hq, D)");
  check_dim(k, "k", 4, "(B, Sk, Hkv, D)");
  check_dim(lse_row, "lse_row", 2, "(B, Hq)");
  check_cuda(k, "k", q_row);
  check_cuda(q_row, "q_row", q_row);
  check_cuda(lse_row, "lse_row", q_row);
  const int code = dtype_code(q_row);
  TORCH_CHECK_TYPE(code >= 0, "q_row: expected float16, bfloat16 or float32, got ", q_row.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q_row.scalar_type(), "k: expected dtype ", q_row.scalar_type(),
                   " as q_row, got ", k.scalar_type());
  const int64_t B = q_row.size(0), Hq = q_row.size(1), D = q_row.size(2);
  const int64_t Sk = k.size(1), Hkv = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, "k: expected (", B, ", Sk, Hkv, ", D,
                    ") to match q_row ", q_row.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "k: Hq=", Hq, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK_VALUE(lse_row.size(0) == B && lse_row.size(1) == Hq, "lse_row: expected shape (", B, ", ", Hq,
                    "), got ", lse_row.sizes());
  TORCH_CHECK_VALUE(length >= 0, "length: expected a non-negative int, got ", length);
  const int64_t vec = 16 / q_row.element_size();
  TORCH_CHECK_NOT_IMPLEMENTED(D % vec == 0 && D <= vg::kCaptureMaxD, "capture_rows: head dim D=", D,
                              " is not supported; expected a multiple of ", vec, " up to ", vg::kCaptureMaxD);
  TORCH_CHECK_VALUE(q_row.numel() == 0 || q_row.stride(-1) == 1, "q_row: the last dim must be contiguous");
  check_aligned(k, "k");
  TORCH_CHECK_VALUE(B <= 65535, "q_row: batch ", B, " exceeds the 65535 the launch grid allows");
  const Tensor ks = index_vector(key_start, "key_start", B, q_row);
  const Tensor lse = lse_row.to(at::kFloat).contiguous();
  Tensor keep_c;
  if (keep.has_value()) keep_c = bool_matrix(*keep, "keep", B, length, q_row);

  Tensor probs = at::empty({B, Hq, length}, q_row.options().dtype(at::kFloat));
  if (probs.numel() == 0) return probs;
  const c10::cuda::CUDAGuard guard(q_row.device());
  vg::CaptureParams p = capture_params(q_row, 0, q_row.stride(1), k, ks, scale, code, probs);
  p.lse = lse.data_ptr<float>();
  p.lse_sb = Hq;
  p.lse_sh = 1;
  if (keep.has_value()) {
    p.keep = bytes(keep_c);
    p.keep_sb = length;
    p.keep_len = length;
    p.keep_start = p.key_start;
  }
  check_launch(vg::launch_capture(p, c10::cuda::getCurrentCUDAStream()), "capture kernel launch");
  return probs;
}

// ---------------------------------------------------------------------------------------
// metrics_rows
// ---------------------------------------------------------------------------------------

// Element offset of each row of a tensor expanded to attn's shape (broadcast dims have
// stride 0), flattened over the leading dims.
Tensor row_offsets(const Tensor& t) {
  const auto opts = t.options().dtype(at::kLong);
  const int64_t nd = t.dim() - 1;
  std::vector<int64_t> lead(t.sizes().begin(), t.sizes().end() - 1);
  Tensor off = at::zeros(lead, opts);
  for (int64_t d = 0; d < nd; ++d) {
    std::vector<int64_t> shape(nd, 1);
    shape[d] = t.size(d);
    off = off + at::arange(t.size(d), opts).mul(t.stride(d)).view(shape);
  }
  return off.reshape({-1}).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> metrics_rows(const Tensor& attn, const Tensor& mask, const OptTensor& reference,
                                                double eps) {
  TORCH_CHECK_VALUE(attn.dim() >= 1, "attn: expected shape (..., N), got a scalar");
  TORCH_CHECK_VALUE(attn.is_cuda(), "attn: expected a CUDA tensor, got one on ", attn.device());
  TORCH_CHECK_TYPE(at::isFloatingType(attn.scalar_type()), "attn: expected a floating dtype, got ",
                   attn.scalar_type());
  check_cuda(mask, "mask", attn);
  const int64_t N = attn.size(-1);
  std::vector<int64_t> lead(attn.sizes().begin(), attn.sizes().end() - 1);
  int64_t R = 1;
  for (int64_t s : lead) R *= s;
  TORCH_CHECK_VALUE(mask.dim() <= attn.dim(), "mask: shape ", mask.sizes(), " does not broadcast to attn ",
                    attn.sizes());

  const Tensor a = attn.to(at::kFloat).contiguous();
  // expand() raises for shapes that do not broadcast to attn's.
  const Tensor m = mask.to(at::kFloat).expand(attn.sizes());
  const Tensor m_off = row_offsets(m);
  Tensor r, r_off;
  if (reference.has_value()) {
    check_cuda(*reference, "reference", attn);
    TORCH_CHECK_TYPE(at::isFloatingType(reference->scalar_type()), "reference: expected a floating dtype, got ",
                     reference->scalar_type());
    TORCH_CHECK_VALUE(reference->dim() <= attn.dim(), "reference: shape ", reference->sizes(),
                      " does not broadcast to attn ", attn.sizes());
    r = reference->to(at::kFloat).expand(attn.sizes());
    r_off = row_offsets(r);
  }
  const auto fopts = attn.options().dtype(at::kFloat);
  Tensor ar = at::empty(lead, fopts), kl = at::empty(lead, fopts), js = at::empty(lead, fopts);
  if (R == 0) return {ar, kl, js};

  const c10::cuda::CUDAGuard guard(attn.device());
  vg::MetricsParams p;
  p.attn = a.data_ptr<float>();
  p.R = R;
  p.N = N;
  p.mask = m.data_ptr<float>();
  p.mask_row_off = m_off.data_ptr<int64_t>();
  p.mask_n_stride = m.stride(-1);
  if (reference.has_value()) {
    p.ref = r.data_ptr<float>();
    p.ref_row_off = r_off.data_ptr<int64_t>();
    p.ref_n_stride = r.stride(-1);
  }
  p.eps = float(eps);
  p.ar = ar.data_ptr<float>();
  p.kl = kl.data_ptr<float>();
  p.js = js.data_ptr<float>();
  check_launch(vg::launch_metrics(p, c10::cuda::getCurrentCUDAStream()), "metrics kernel launch");
  return {ar, kl, js};
}

// ---------------------------------------------------------------------------------------
// decode_attention
// ---------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                    double scale, const OptTensor& key_padding_mask,
                                                    const OptTensor& ko_query_start, const OptTensor& ko_query_end,
                                                    const OptTensor& ko_key_start, const OptTensor& ko_keep,
                                                    int64_t ko_mode, const OptTensor& cap_row,
                                                    const OptTensor& cap_key_start, int64_t cap_length,
                                                    int64_t num_splits) {
  check_dim(q, "q", 4, "(B, Sq, Hq, D)");
  check_dim(k, "k", 4, "(B, Sk, Hkv, D)");
  check_dim(v, "v", 4, "(B, Sk, Hkv, D)");
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  const int code = dtype_code(q);
  TORCH_CHECK_TYPE(code == kCodeF16 || code == kCodeBF16,
                   "q: the CUDA short-query attention supports float16 and bfloat16, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "q, k, v: expected one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hkv = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, "k: expected (", B, ", Sk, Hkv, ", D, ") to match q ",
                    q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "k: Hq=", Hq, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK_VALUE(Sq <= Sk, "q: Sq=", Sq, " exceeds Sk=", Sk, " (queries are the last Sq key positions)");
  TORCH_CHECK_NOT_IMPLEMENTED(Sq <= vg::kAttnMaxSq, "decode_attention: Sq=", Sq,
                              " query rows; the CUDA short-query kernel handles at most ", vg::kAttnMaxSq);
  TORCH_CHECK_NOT_IMPLEMENTED(D == 64 || D == 80 || D == 96 || D == 128, "decode_attention: head dim D=", D,
                              " is not supported; expected 64, 80, 96 or 128");
  TORCH_CHECK_VALUE(B <= 65535, "q: batch ", B, " exceeds the 65535 the launch grid allows");
  check_aligned(q, "q");
  check_aligned(k, "k");
  check_aligned(v, "v");
  TORCH_CHECK_VALUE(ko_mode >= 0 && ko_mode <= 2, "ko_mode: expected 0 (none), 1 (renorm) or 2 (zero), got ",
                    ko_mode);

  Tensor kpm;
  if (key_padding_mask.has_value()) kpm = bool_matrix(*key_padding_mask, "key_padding_mask", B, Sk, q);
  Tensor qs, qe, ks, keep;
  if (ko_mode != 0) {
    TORCH_CHECK_VALUE(ko_query_start && ko_query_end && ko_key_start && ko_keep,
                      "knockout: ko_mode=", ko_mode, " needs ko_query_start, ko_query_end, ko_key_start, ko_keep");
    qs = index_vector(*ko_query_start, "knockout.query_start", B, q);
    qe = index_vector(*ko_query_end, "knockout.query_end", B, q);
    ks = index_vector(*ko_key_start, "knockout.key_start", B, q);
    keep = bool_matrix(*ko_keep, "knockout.keep", B, -1, q);
  }
  Tensor crow, cks;
  const bool want_capture = cap_row.has_value();
  if (want_capture) {
    TORCH_CHECK_VALUE(cap_key_start.has_value(), "capture: cap_row given without cap_key_start");
    TORCH_CHECK_VALUE(cap_length >= 0, "capture.length: expected a non-negative int, got ", cap_length);
    crow = index_vector(*cap_row, "capture.row", B, q);
    cks = index_vector(*cap_key_start, "capture.key_start", B, q);
  }

  const auto fopts = q.options().dtype(at::kFloat);
  Tensor out = at::empty({B, Sq, Hq, D}, q.options());
  Tensor lse = at::empty({B, Hq, Sq}, fopts);
  Tensor probs = at::empty({want_capture ? B : 0, want_capture ? Hq : 0, want_capture ? cap_length : 0}, fopts);
  if (out.numel() == 0) return {out, lse, probs};

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  vg::AttnParams p;
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_ss = q.stride(1);
  p.q_sh = q.stride(2);
  p.k = k.data_ptr();
  p.k_sb = k.stride(0);
  p.k_ss = k.stride(1);
  p.k_sh = k.stride(2);
  p.v = v.data_ptr();
  p.v_sb = v.stride(0);
  p.v_ss = v.stride(1);
  p.v_sh = v.stride(2);
  p.B = B;
  p.Sq = Sq;
  p.Sk = Sk;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.dtype = code;
  p.scale = float(scale);
  p.causal = causal;
  if (kpm.defined()) {
    p.kpm = bytes(kpm);
    p.kpm_sb = Sk;
  }
  if (ko_mode != 0) {
    p.ko_mode = int(ko_mode);
    p.ko_q_start = qs.data_ptr<int64_t>();
    p.ko_q_end = qe.data_ptr<int64_t>();
    p.ko_key_start = ks.data_ptr<int64_t>();
    p.ko_keep = bytes(keep);
    p.ko_keep_sb = keep.size(1);
    p.ko_len = keep.size(1);
  }
  p.out = out.data_ptr();
  p.o_sb = out.stride(0);
  p.o_ss = out.stride(1);
  p.o_sh = out.stride(2);
  p.lse = lse.data_ptr<float>();
  check_launch(vg::plan_attention(p, num_splits), "attention planning");
  Tensor part_o, part_lse;
  if (p.num_splits > 1) {
    part_o = at::empty({p.num_splits, B, Hq, Sq, D}, fopts);
    part_lse = at::empty({p.num_splits, B, Hq, Sq}, fopts);
    p.part_o = part_o.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  check_launch(vg::launch_attention(p, stream), "attention kernel launch");

  if (want_capture && probs.numel() > 0) {
    // The applied probabilities need the final (merged) lse, so the capture runs after
    // the attention on the same stream and rebuilds the row's scores from q and K.
    const Tensor qi = (crow - (Sk - Sq)).contiguous();
    vg::CaptureParams c = capture_params(q, q.stride(1), q.stride(2), k, cks, scale, code, probs);
    c.q_row = qi.data_ptr<int64_t>();
    c.lse = p.lse;
    c.lse_sb = Hq * Sq;
    c.lse_sh = Sq;
    c.lse_si = 1;
    c.row_pos = crow.data_ptr<int64_t>();
    c.causal = causal;
    c.kpm = p.kpm;
    c.kpm_sb = p.kpm_sb;
    if (ko_mode != 0) {
      c.keep = p.ko_keep;
      c.keep_sb = p.ko_keep_sb;
      c.keep_len = p.ko_len;
      c.keep_start = p.ko_key_start;
      c.keep_q_lo = p.ko_q_start;
      c.keep_q_hi = p.ko_q_end;
    }
    check_launch(vg::launch_capture(c, stream), "capture kernel launch");
  }
  return {out, lse, probs};
}

}  // namespace

TORCH_LIBRARY(vgkernels, m) {
  m.def("capture_rows(Tensor q_row, Tensor k, Tensor lse_row, Tensor key_start, int length, float scale, "
        "Tensor? keep) -> Tensor");
  m.def("metrics_rows(Tensor attn, Tensor mask, Tensor? reference, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? key_padding_mask, "
        "Tensor? ko_query_start, Tensor? ko_query_end, Tensor? ko_key_start, Tensor? ko_keep, int ko_mode, "
        "Tensor? cap_row, Tensor? cap_key_start, int cap_length, int num_splits) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vgkernels, CUDA, m) {
  m.impl("capture_rows", &capture_rows);
  m.impl("metrics_rows", &metrics_rows);
  m.impl("decode_attention", &decode_attention);
}
