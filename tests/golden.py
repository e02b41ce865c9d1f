"""Float64 golden implementations, written independently of vgkernels.reference.

Deliberately naive: full (Sq, Sk) matrices, K/V repeated for GQA, masks built key by
key from the SPEC's sentences rather than from vectorised index arithmetic.
"""
import math

import numpy as np
import torch


def dense_attention(q, k, v, *, causal=True, scale=None, kpm=None, knockout=None, capture=None):
    """Returns (out float64 (B,Sq,Hq,D), lse float64 (B,Hq,Sq), probs float64 (B,Hq,N) | None)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q64, k64, v64 = q.double(), k.double().repeat_interleave(G, dim=2), v.double().repeat_interleave(G, dim=2)
    out = torch.zeros(B, Sq, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=torch.float64)
    probs = None if capture is None else torch.zeros(B, Hq, capture["length"], dtype=torch.float64)
    for b in range(B):
        allowed = torch.zeros(Sq, Sk, dtype=torch.bool)
        knocked = torch.zeros(Sq, Sk, dtype=torch.bool)
        for i in range(Sq):
            pos = Sk - Sq + i
            for j in range(Sk):
                ok = (not causal or j <= pos) and (kpm is None or bool(kpm[b, j]))
                allowed[i, j] = ok
                if knockout is not None:
                    qs, qe, ks = int(knockout["query_start"][b]), int(knockout["query_end"][b]), int(knockout["key_start"][b])
                    keep = knockout["keep"][b]
                    if qs <= pos < qe and ks <= j < ks + keep.numel() and not bool(keep[j - ks]):
                        knocked[i, j] = True
        zero = knockout is not None and knockout["mode"] == "zero"
        denom_keys = allowed if zero else (allowed & ~knocked)
        for h in range(Hq):
            s = (q64[b, :, h] @ k64[b, :, h].T) * scale  # (Sq, Sk)
            s = s.masked_fill(~denom_keys, -math.inf)
            row_lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - row_lse[:, None])
            p = torch.nan_to_num(p, nan=0.0)
            p = p.masked_fill(~denom_keys, 0.0)
            if zero:
                p = p.masked_fill(knocked, 0.0)
            out[b, :, h] = p @ v64[b, :, h]
            lse[b, h] = row_lse
            if capture is not None:
                r = int(capture["row"][b]) - (Sk - Sq)
                ks = int(capture["key_start"][b])
                probs[b, h] = p[r, ks: ks + capture["length"]]
    return out, lse, probs


def np_metrics(attn, mask, reference=None, eps=1e-12):
    """SPEC §3 row by row in NumPy float64. Returns (ar, kl, js) arrays of attn.shape[:-1]."""
    attn = np.asarray(attn, dtype=np.float64)
    mask = np.broadcast_to(np.asarray(mask, dtype=np.float64), attn.shape)
    if reference is not None:
        attn = attn / np.broadcast_to(np.asarray(reference, dtype=np.float64), attn.shape)
    flat_a = attn.reshape(-1, attn.shape[-1])
    flat_m = mask.reshape(-1, attn.shape[-1])
    res = np.empty((flat_a.shape[0], 3))
    for r, (a, m) in enumerate(zip(flat_a, flat_m)):
        N = a.size
        if a.sum() == 0 or m.sum() == 0:
            res[r] = np.nan
            continue
        ah, mh = a / a.sum(), m / m.sum()
        ar = (np.sum(a * m) / np.sum(m)) / (np.sum(a) / N)
        kl = sum(mh[j] * (math.log(mh[j]) - math.log(max(ah[j], eps))) for j in range(N) if mh[j] > 0)
        R = (ah + mh) / 2
        js = 0.5 * sum(ah[j] * math.log(ah[j] / R[j]) for j in range(N) if ah[j] > 0) + 0.5 * sum(
            mh[j] * math.log(mh[j] / R[j]) for j in range(N) if mh[j] > 0
        )
        res[r] = (ar, kl, js)
    shape = attn.shape[:-1]
    return res[:, 0].reshape(shape), res[:, 1].reshape(shape), res[:, 2].reshape(shape)
