"""Helpers of the pipeline tests: a merged sweep folder written through the real store
with made-up metrics and no model (for the commands that read a finished sweep), a
small manifest with real images, a sweep command line, and the one-thread fixture."""
import contextlib
import json
import os
import sys

import numpy as np

from vgkernels.sweep.datasets import Reject, Sample
from vgkernels.sweep.store import FORMAT_VERSION, SampleResult, ShardWriter, check_or_write_meta, merge


def fake_sweep(out, n=6, L=3, H=4, *, fields=None, seed=0, rejects=(), nan_rows=(), layers=None, model="fake-model",
               num_layers=None, maps_for=(), image=None, edit=None):
    """Write and merge a sweep of ``n`` samples; returns ``(head (n, 6, L, H), layer (n, 6, L))``.

    ``fields(i) -> dict`` gives each sample's carried fields; ``nan_rows`` get NaN metrics;
    ``rejects``: extra run-time :class:`Reject` records; ``maps_for``: sample indices whose raw
    maps (a 2x2 grid over ``image``) are kept for overlays; ``edit(head, layer)`` may change
    the metrics before they are written.
    """
    rng = np.random.default_rng(seed)
    out = str(out)
    layers = list(range(L)) if layers is None else list(layers)
    meta = {"format_version": FORMAT_VERSION, "model": model, "family": "llava", "model_type": "llava",
            "num_layers": num_layers or max(layers) + 1, "num_heads": H, "hidden_size": 64, "L": L, "H": H,
            "layers": layers, "n_samples": n, "mask": "auto", "fingerprint": {"model": model}}
    try:
        from vgkernels import outdir

        lock = outdir.claim(out, "sweep")
    except ImportError:  # a version without output locks
        lock = contextlib.nullcontext()
        lock.release = lambda: None
    try:
        check_or_write_meta(out, meta, write=True)
        w = ShardWriter(out, 0, L, H)
        results = []
        heads = rng.random((n, 6, L, H)).astype(np.float32)
        lays = rng.random((n, 6, L)).astype(np.float32)
        for i in nan_rows:
            heads[i], lays[i] = np.nan, np.nan
        if edit is not None:
            edit(heads, lays)
        for i in range(n):
            f = fields(i) if fields else {"modality": ["CT", "MRI"][i % 2]}
            s = Sample(i, f"s{i}", image or f"/img/{i}.png", f"question {i}?", [[1.0, 2.0, 20.0, 20.0]],
                       fields=f, source="fake.jsonl", line=i + 1)
            keep = i in maps_for
            cells = np.array([[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]], np.float32)
            results.append(SampleResult(s, heads[i], lays[i], 4, (2, 2), "bbox", 1, (56, 56),
                                        rng.random((L, H, 4)).astype(np.float32) if keep else None,
                                        rng.random((L, H, 4)).astype(np.float32) if keep else None,
                                        cells if keep else None))
        w.append(results)
        w.reject(list(rejects))
        w.close()
        merge(out, [])
    finally:
        lock.release()
    return heads, lays


def a_reject(i, kind="bad box"):
    try:
        return Reject("fake.jsonl", 100 + i, f"made-up problem {i}", f"r{i}", kind)
    except TypeError:  # a version without reject kinds
        return Reject("fake.jsonl", 100 + i, f"made-up problem {i}", f"r{i}")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_manifest(folder, n, name="m.jsonl"):
    """``n`` manifest rows (ids m0..), all on one drawn 56x56 image; returns the path."""
    from vgkernels.integrations.tiny import test_image

    test_image(56, 56).save(folder / "a.png")
    data = folder / name
    data.write_text("".join(json.dumps({"id": f"m{i}", "image": "a.png", "boxes": [[4, 6, 24, 20]],
                                        "question": "q?"}) + "\n" for i in range(n)))
    return data


def sweep_cmd(data, out, *extra):
    """``python -m vgkernels sweep`` on tiny-llava, quiet and small."""
    return [sys.executable, "-m", "vgkernels", "sweep", "--model", "tiny-llava", "--workers", "0", "--no-progress",
            "--overlays", "0", "--data", str(data), "--out", str(out), *extra]


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def one_thread():
    """Fixture body: the tiny models are far too small for intra-op threads, which on a busy
    2-core runner only wait for each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
