"""Argument and result records of the public API (SPEC §2-§3).

These are plain containers. All checking of shapes, dtypes and ranges lives in
:mod:`vgkernels._validate`, so that every backend receives the same normalised input.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

KNOCKOUT_MODES = ("renorm", "zero")


class Knockout(NamedTuple):
    """Remove image keys from the softmax of a band of query rows.

    Attributes
    ----------
    query_start, query_end : (B,) int64
        Absolute positions; a row at position ``p`` is affected iff
        ``query_start[b] <= p < query_end[b]``.
    key_start : (B,) int64
        Absolute position of image token 0.
    keep : (B, N) bool
        Key ``key_start[b] + j`` is knocked out for affected rows iff ``keep[b, j]`` is False.
    mode : ``"renorm"`` | ``"zero"``
        ``renorm``: knocked-out scores are ``-inf`` before the softmax.
        ``zero``: ``α̂ = α ⊙ M`` — softmax over every attendable key, then the
        knocked-out probabilities are set to zero without renormalising.
    """

    query_start: torch.Tensor
    query_end: torch.Tensor
    key_start: torch.Tensor
    keep: torch.Tensor
    mode: str = "renorm"


class Capture(NamedTuple):
    """Return one row's applied attention probabilities over a key span.

    Attributes
    ----------
    row : (B,) int64
        Absolute position of the captured query row; must lie in this call's
        query block ``[Sk - Sq, Sk)``.
    key_start : (B,) int64
        First key of the span.
    length : int
        Span length ``N``; probabilities are returned for keys
        ``key_start[b] + j``, ``0 <= j < N``.
    """

    row: torch.Tensor
    key_start: torch.Tensor
    length: int


class AttentionResult(NamedTuple):
    """``out (B, Sq, Hq, D)`` in q's dtype, ``lse (B, Hq, Sq)`` float32,
    ``probs (B, Hq, N)`` float32 or None."""

    out: torch.Tensor
    lse: torch.Tensor
    probs: Optional[torch.Tensor]


class GroundingMetrics(NamedTuple):
    """AR, KL and JS, each shaped ``attn.shape[:-1]``, float32."""

    ar: torch.Tensor
    kl: torch.Tensor
    js: torch.Tensor
