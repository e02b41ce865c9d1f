"""Every bad input of SPEC §2 raises, naming the argument and the expected shape."""
import pytest
import torch

import vgkernels as vg


def qkv(B=2, Sq=3, Sk=8, Hq=4, Hkv=2, D=16, dtype=torch.float32):
    return (torch.randn(B, Sq, Hq, D, dtype=dtype), torch.randn(B, Sk, Hkv, D, dtype=dtype),
            torch.randn(B, Sk, Hkv, D, dtype=dtype))


def ko(keep=None, qs=(5, 5), qe=(8, 8), ks=(1, 1), mode="renorm"):
    keep = torch.ones(2, 3, dtype=torch.bool) if keep is None else keep
    return vg.Knockout(torch.tensor(qs), torch.tensor(qe), torch.tensor(ks), keep, mode)


CASES = [
    ("q 3-D", lambda q, k, v: dict(q=q[0]), ValueError, r"q: expected shape \(B, Sq, Hq, D\), got \(3, 4, 16\)"),
    ("batch", lambda q, k, v: dict(k=k[:1], v=v[:1]), ValueError, r"k: expected batch 2 .* got \(1, 8, 2, 16\)"),
    ("head dim", lambda q, k, v: dict(k=k[..., :8], v=v[..., :8]), ValueError, r"k: expected head dim 16"),
    ("k vs v", lambda q, k, v: dict(v=v[:, :5]), ValueError, r"v: expected the shape of k \(2, 8, 2, 16\), got \(2, 5, 2, 16\)"),
    ("gqa", lambda q, k, v: dict(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)), ValueError,
     r"Hq=4 must be a multiple of Hkv=3"),
    ("sq > sk", lambda q, k, v: dict(q=torch.randn(2, 9, 4, 16)), ValueError, r"Sq=9 exceeds Sk=8"),
    ("mixed dtypes", lambda q, k, v: dict(k=k.half()), TypeError, r"expected one dtype, got q torch.float32, k torch.float16"),
    ("int dtype", lambda q, k, v: dict(q=q.int(), k=k.int(), v=v.int()), TypeError, r"q: expected float16"),
    ("last dim strided", lambda q, k, v: dict(q=torch.randn(2, 3, 4, 32)[..., ::2]), ValueError,
     r"q: the last \(head\) dimension must be contiguous"),
    ("kpm shape", lambda q, k, v: dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError,
     r"key_padding_mask: expected shape \(2, 8\), got \(2, 7\)"),
    ("kpm dtype", lambda q, k, v: dict(key_padding_mask=torch.ones(2, 8)), TypeError, r"key_padding_mask: expected dtype torch.bool"),
    ("keep shape", lambda q, k, v: dict(knockout=ko(keep=torch.ones(3, 3, dtype=torch.bool))), ValueError,
     r"knockout.keep: expected shape \(2, N\) bool, got \(3, 3\)"),
    ("keep dtype", lambda q, k, v: dict(knockout=ko(keep=torch.ones(2, 3))), TypeError, r"knockout.keep: expected dtype torch.bool"),
    ("ko span past end", lambda q, k, v: dict(knockout=ko(ks=(1, 6))), ValueError,
     r"knockout.key_start: the span \[key_start, key_start \+ 3\) must lie inside \[0, Sk=8\); got key_start=\[1, 6\]"),
    ("ko span negative", lambda q, k, v: dict(knockout=ko(ks=(-1, 0))), ValueError, r"knockout.key_start: the span"),
    ("ko rows", lambda q, k, v: dict(knockout=ko(qs=(6, 5), qe=(5, 9))), ValueError,
     r"knockout.query_start/query_end: expected 0 <= query_start <= query_end <= Sk=8"),
    ("ko vector shape", lambda q, k, v: dict(knockout=ko(qs=(1, 2, 3))), ValueError,
     r"knockout.query_start: expected shape \(2,\)"),
    ("ko float vector", lambda q, k, v: dict(knockout=vg.Knockout(torch.tensor([5.0, 5.0]), torch.tensor([8, 8]),
                                                                 torch.tensor([1, 1]), torch.ones(2, 3, dtype=torch.bool))),
     TypeError, r"knockout.query_start: expected an integer tensor"),
    ("ko mode", lambda q, k, v: dict(knockout=ko(mode="drop")), ValueError, r"knockout.mode: expected one of"),
    ("capture row outside block", lambda q, k, v: dict(capture=vg.Capture(torch.tensor([4, 7]), torch.tensor([0, 0]), 3)),
     ValueError, r"capture.row: expected positions in this call's query block \[5, 8\) \(Sq=3, Sk=8\), got \[4, 7\]"),
    ("capture span", lambda q, k, v: dict(capture=vg.Capture(torch.tensor([7, 7]), torch.tensor([0, 6]), 3)),
     ValueError, r"capture.key_start: the span"),
    ("capture length", lambda q, k, v: dict(capture=vg.Capture(torch.tensor([7, 7]), torch.tensor([0, 0]), -1)),
     ValueError, r"capture.length: expected a non-negative int"),
    ("backend", lambda q, k, v: dict(backend="jax"), ValueError, r"backend: expected one of"),
    ("not a tensor", lambda q, k, v: dict(q=[1, 2]), TypeError, r"q: expected a torch.Tensor"),
    ("scale", lambda q, k, v: dict(softmax_scale=float("nan")), ValueError, r"softmax_scale: expected a finite float"),
]


@pytest.mark.parametrize("name,change,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_attention_rejects(name, change, exc, pattern):
    q, k, v = qkv()
    kwargs = dict(q=q, k=k, v=v, backend="torch")
    kwargs.update(change(q, k, v))
    with pytest.raises(exc, match=pattern):
        vg.attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def test_capture_from_lse_rejects():
    q, k, _ = qkv()
    lse = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"lse_row: expected shape \(2, 4\), got \(2, 3\)"):
        vg.capture_from_lse(q[:, 0], k, torch.zeros(2, 3), torch.tensor([0, 0]), 3)
    with pytest.raises(ValueError, match=r"key_start: the span"):
        vg.capture_from_lse(q[:, 0], k, lse, torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match=r"keep: expected shape \(2, 3\) bool"):
        vg.capture_from_lse(q[:, 0], k, lse, torch.tensor([0, 0]), 3, keep=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q_row: expected shape \(B, Hq, D\)"):
        vg.capture_from_lse(q, k, lse, torch.tensor([0, 0]), 3)
    with pytest.raises(TypeError, match=r"q_row, k: expected one dtype"):
        vg.capture_from_lse(q[:, 0].half(), k, lse, torch.tensor([0, 0]), 3)


def test_metrics_rejects():
    with pytest.raises(ValueError, match=r"mask: shape \(5,\) does not broadcast against attn \(2, 4\)"):
        vg.grounding_metrics(torch.rand(2, 4), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: shape \(3, 2, 4\) would broadcast attn \(2, 4\)"):
        vg.grounding_metrics(torch.rand(2, 4), torch.ones(3, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"reference: shape \(3,\) does not broadcast"):
        vg.grounding_metrics(torch.rand(2, 4), torch.ones(4), reference=torch.ones(3))
    with pytest.raises(TypeError, match=r"attn: expected a floating dtype"):
        vg.grounding_metrics(torch.ones(2, 4, dtype=torch.int64), torch.ones(4))


# ------------------------------------------------------------- host synchronisations
#
# A CUDA tensor's value reaches the host only through a read that waits for the device
# (.item(), .tolist(), bool(), int(), .cpu(), torch.equal, ...). On the CPU, `OnDevice`
# stands in for a device tensor: a tensor subclass that every operation propagates, and
# that counts every call returning Python values computed from its data (everything that
# is not metadata: shape, strides, dtype, device, data_ptr). Python ints and plain tensors
# are host values and cost nothing.

_METADATA = {"dim", "size", "stride", "numel", "nelement", "element_size", "is_contiguous", "data_ptr",
             "storage_offset", "is_floating_point", "is_complex", "__len__", "get_device", "ndimension",
             "is_signed", "__get__", "__hash__", "__eq__", "__ne__", "__repr__", "__format__",
             "untyped_storage", "_is_view"}
_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "__array__", "cpu",
          "equal", "allclose", "is_nonzero", "__iter__"}


class OnDevice(torch.Tensor):
    reads: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        ret = super().__torch_function__(func, types, args, kwargs or {})
        if name in _READS or (name not in _METADATA and isinstance(ret, (bool, int, float, list))
                              and not isinstance(ret, torch.Size)):
            OnDevice.reads.append(name)
        return ret


def dev(t):
    return t.as_subclass(OnDevice)


def count_reads(fn):
    OnDevice.reads = []
    fn()
    return list(OnDevice.reads)


def test_the_counter_counts():
    t = dev(torch.tensor([1, 2, 3]))
    assert count_reads(lambda: t.max().item()) == ["item"]
    assert count_reads(lambda: int(t[0]) + bool((t > 1).any())) == ["__int__", "__bool__"]
    assert count_reads(lambda: (t + 1).tolist()) == ["tolist"]
    assert count_reads(lambda: (t.shape, t.stride(), t.dtype, t.device, t.data_ptr(), t.is_contiguous())) == []


class _StubBackend:
    """A backend that returns outputs of the right shapes without touching its inputs."""

    @staticmethod
    def attention(q, k, v, causal, scale, kpm, ko, cap, need_lse):
        B, Sq, Hq, D = q.shape
        return (torch.zeros(B, Sq, Hq, D), torch.zeros(B, Hq, Sq), None if cap is None else
                torch.zeros(B, Hq, cap.length))

    @staticmethod
    def capture_from_lse(q_row, k, lse_row, key_start, length, scale, keep):
        return torch.zeros(q_row.shape[0], q_row.shape[1], length)

    @staticmethod
    def grounding_metrics(attn, mask, reference, eps):
        return vg.GroundingMetrics(*(torch.zeros(attn.shape[:-1]) for _ in range(3)))


@pytest.fixture
def stub_backend(monkeypatch):
    from vgkernels import _dispatch

    monkeypatch.setattr(_dispatch, "get", lambda backend, device, op: _StubBackend)


def test_public_calls_read_the_device_at_most_once(stub_backend):
    B, Sq, Sk, H, D, N = 2, 3, 12, 2, 16, 5
    q, k, v = (dev(torch.randn(B, s, H, D)) for s in (Sq, Sk, Sk))
    kpm = dev(torch.ones(B, Sk, dtype=torch.bool))
    keep = dev(torch.ones(B, N, dtype=torch.bool))
    ko = vg.Knockout(dev(torch.tensor([9, 9])), dev(torch.tensor([12, 12])), dev(torch.tensor([2, 3])), keep)
    cap = vg.Capture(dev(torch.tensor([11, 10])), dev(torch.tensor([2, 3])), N)
    # Every index vector on the device: one read for all of them.
    assert count_reads(lambda: vg.attention(q, k, v, key_padding_mask=kpm, knockout=ko, capture=cap)) == ["tolist"]
    assert count_reads(lambda: vg.attention(q, k, v, key_padding_mask=kpm, return_lse=True)) == []
    # Host positions (Python ints, CPU tensors) need no read at all.
    host_ko = vg.Knockout([9, 9], torch.tensor([12, 12]), 2, keep)
    host_cap = vg.Capture(torch.tensor([11, 10]), [2, 3], N)
    assert count_reads(lambda: vg.attention(q, k, v, knockout=host_ko, capture=host_cap)) == []
    # capture_from_lse and the metrics.
    lse = dev(torch.zeros(B, H))
    assert count_reads(lambda: vg.capture_from_lse(q[:, 0], k, lse, dev(torch.tensor([0, 4])), N)) == ["tolist"]
    assert count_reads(lambda: vg.capture_from_lse(q[:, 0], k, lse, [0, 4], N, keep=keep)) == []
    attn = dev(torch.rand(2, 3, 40))
    # the metrics read their value checks (negative, inf, NaN in the mask, reference) at once
    assert count_reads(lambda: vg.grounding_metrics(attn, dev(torch.ones(40, dtype=torch.bool)),
                                                    reference=dev(torch.rand(40) + 1))) == ["tolist"]


def test_bad_spans_on_the_device_still_raise_after_one_read(stub_backend):
    q, k, v = qkv()
    bad = vg.Knockout(dev(torch.tensor([5, 5])), dev(torch.tensor([8, 8])), dev(torch.tensor([1, 6])),
                      dev(torch.ones(2, 3, dtype=torch.bool)))
    OnDevice.reads = []
    with pytest.raises(ValueError, match=r"knockout.key_start: the span .* got key_start=\[1, 6\]"):
        vg.attention(dev(q), dev(k), dev(v), knockout=bad)
    assert OnDevice.reads == ["tolist"]


def test_triton_backend_functions_never_read_the_device(monkeypatch):
    """What the model patch calls per layer: validated arguments in, launches out, no read.
    The launches are recorded instead of run (the interpreter itself reads every tensor)."""
    from vgkernels._validate import check_attention
    from vgkernels.triton import capture as cap_mod
    from vgkernels.triton import flash
    from vgkernels.triton import metrics as met_mod

    launches = []

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append(self.name)

    for mod, name in ((flash, "_attn_fwd_kernel"), (flash, "_attn_split_kernel"), (flash, "_attn_merge_kernel"),
                      (cap_mod, "_capture_from_lse_kernel"), (met_mod, "_metrics_kernel")):
        monkeypatch.setattr(mod, name, Launcher(name))
    B, Sk, H, D, N = 2, 40, 4, 64, 9
    for Sq in (3, 33):  # the split-KV path and the fused forward
        q, k, v = qkv(B, Sq, Sk, H, 2, D)
        ko = vg.Knockout(torch.tensor([30, 31]), torch.tensor([40, 40]), torch.tensor([2, 3]),
                         torch.rand(B, N) > 0.5, "zero")
        cap = vg.Capture(torch.tensor([39, 38]), torch.tensor([2, 3]), N)
        a = check_attention(q, k, v, True, None, torch.ones(B, Sk, dtype=torch.bool), ko, cap)
        d_ko = vg.Knockout(*(dev(t) for t in a.knockout[:4]), "zero")
        d_cap = vg.Capture(dev(a.capture.row), dev(a.capture.key_start), N)
        for tile in (None, flash.tiles.Tile(64, 32, 4, 2, True)):
            assert count_reads(lambda: flash.run_attention(
                dev(a.q), dev(a.k), dev(a.v), True, a.scale, dev(a.key_padding_mask), *d_ko[:4], 2,
                d_cap.row, d_cap.key_start, N, True, tile=tile)) == []
    assert launches == ["_attn_split_kernel", "_attn_merge_kernel"] * 2 + ["_attn_fwd_kernel"] * 2
    lse = dev(torch.zeros(B, H))
    assert count_reads(lambda: cap_mod.run_capture_from_lse(dev(q[:, 0]), dev(k), lse, dev(torch.tensor([0, 4])),
                                                            N, 0.125, None)) == []
    attn = dev(torch.rand(2, 3, 5000))
    assert count_reads(lambda: met_mod.run_grounding_metrics(attn, dev(torch.ones(5000, dtype=torch.bool)), None,
                                                             1e-12, False, None)) == []
    assert launches[-2:] == ["_capture_from_lse_kernel", "_metrics_kernel"]


@pytest.mark.gpu
def test_gpu_sync_counts():
    """On a GPU, torch's sync debug mode names every synchronising call: at most one per
    public call, none in the backend functions."""
    import warnings

    from vgkernels._validate import check_attention
    from vgkernels.triton import flash

    B, Sq, Sk, H, D, N = 2, 5, 300, 4, 64, 20
    q, k, v = (t.cuda() for t in qkv(B, Sq, Sk, H, 2, D))
    ko = vg.Knockout(torch.tensor([280, 290]).cuda(), torch.tensor([300, 300]).cuda(),
                     torch.tensor([2, 3]).cuda(), (torch.rand(B, N) > 0.5).cuda())
    cap = vg.Capture(torch.tensor([299, 298]).cuda(), torch.tensor([2, 3]).cuda(), N)
    kpm = torch.ones(B, Sk, dtype=torch.bool, device="cuda")
    for s in (Sq, 100):
        qq = torch.randn(B, s, H, D, device="cuda")
        vg.attention(qq, k, v, key_padding_mask=kpm, knockout=ko, capture=cap)  # compile first
        torch.cuda.synchronize()

        def syncs(fn):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return [x for x in w if "synchroniz" in str(x.message)]

        assert len(syncs(lambda: vg.attention(qq, k, v, key_padding_mask=kpm, knockout=ko, capture=cap))) <= 1
        a = check_attention(qq, k, v, True, None, kpm, ko, cap)
        assert syncs(lambda: flash.attention(*a, True)) == []
    assert q.is_cuda
