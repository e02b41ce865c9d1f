"""A two-second tour on random tensors: capture, metrics, triage, knockout.

Shapes mimic a small LLaVA-style prefill: a 6×6 image grid (36 tokens) after a 5-token
system prompt, then a 9-token question.
"""
from __future__ import annotations

import torch

import vgkernels as vg


def add_arguments(p):
    p.add_argument("--seed", type=int, default=0, help="seed of the random tensors (default 0)")
    p.add_argument("--backend", default="auto", help="auto | triton | cuda | torch")


def run(args) -> int:
    g = torch.Generator().manual_seed(args.seed)
    B, H, Hkv, D = 2, 8, 2, 64
    gh = gw = 6
    N, key_start, n_text = gh * gw, 5, 9
    S = key_start + N + n_text
    q, k, v = (torch.randn(B, S, h, D, generator=g) for h in (H, Hkv, Hkv))
    last = torch.full((B,), S - 1)
    ks = torch.full((B,), key_start)
    print(f"vgkernels {vg.__version__}: B={B}, S={S}, Hq={H}, Hkv={Hkv}, D={D}, image tokens {N} ({gh}x{gw})")

    # 1. One fused call: outputs, log-sum-exp, and the last token's attention over the image.
    res = vg.attention(q, k, v, capture=vg.Capture(last, ks, N), backend=args.backend)
    print(f"capture: probs {tuple(res.probs.shape)}, image mass of head 0 = {res.probs[:, 0].sum(-1).tolist()}")

    # 2. Metrics against a box: the image is 336 px, the box covers its upper-left quarter.
    layout = vg.grid_layout((gh, gw), (336, 336), key_start=key_start)
    mask = vg.box_mask(layout, [[0, 0, 168, 168]])
    m = vg.grounding_metrics(res.probs, mask, backend=args.backend)
    print(f"metrics per head, sample 0: AR {fmt(m.ar[0])}\n                           KL {fmt(m.kl[0])}\n"
          f"                           JS {fmt(m.js[0])}")

    # 3. Triage: mean of three heads, keep tokens at or above the median.
    maps = res.probs[:, None]  # (B, L=1, H, N)
    keep = vg.triage_mask(maps, [(0, 0), (0, 3), (0, 5)], percentile=50.0)
    print(f"triage: keep {keep.sum(-1).tolist()} of {N} tokens; sample 0 grid:")
    for y in range(gh):
        print("   " + " ".join("#" if keep[0, y * gw + x] else "." for x in range(gw)))

    # 4. Knockout: question rows may no longer attend the dropped tokens.
    ko = vg.Knockout(torch.full((B,), key_start + N), torch.full((B,), S), ks, keep, "renorm")
    res2 = vg.attention(q, k, v, knockout=ko, capture=vg.Capture(last, ks, N), backend=args.backend)
    dropped = res2.probs[:, :, ~keep[0]][0].abs().max().item()
    changed = (res2.out - res.out).abs().amax(dim=(2, 3))[0]
    print(f"knockout: max prob on dropped tokens {dropped:.1e}; rows changed: "
          f"{[i for i, c in enumerate(changed.tolist()) if c > 0]} (question rows are {key_start + N}..{S - 1})")
    return 0


def fmt(t) -> str:
    return " ".join(f"{x:6.3f}" for x in t.tolist())
