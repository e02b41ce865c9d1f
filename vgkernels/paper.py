"""The paper authors' conventions, to reproduce their numbers (SPEC §8).

vgkernels' defaults are the exact per-row mathematics of SPEC §3. The authors' released
code (their measurement and evaluation notebooks, ``scorer.py``) differs in places; this
module reproduces it, and ``--profile authors`` of ``vgkernels sweep`` / ``refine``
uses it. Every difference, and why the default differs:

authors (this module) vs. the exact profile (the default):

- question prompt: ``q + " " + ANSWER_LINE`` vs. ``q + "\\n" + ANSWER_LINE`` (the LLaVA
  template the paper prints);
- reference prompt: the generic prompt ``+ " " + ANSWER_LINE`` vs. the same with
  ``"\\n"`` in the sweep and the generic prompt alone in ``refine``;
- AR: ``Σ a[idx] / (Σa/N · len(idx) + 1e-8)`` where a cell listed twice counts twice
  vs. ``(Σ a·m / Σ m) / (Σ a / N)`` over a 0/1 mask (an all-zero row is NaN);
- KL: the map divided by its sum over **all layers** of the sample (+1e-8), map and mask
  clipped to ``[1e-12, 1]``, summed over every token vs. each row normalised on its own,
  ``log max(Â, 1e-12)``, tokens outside the box contributing nothing;
- JS: per row with ``1e-8`` in the normaliser and inside both logs vs. per row, exact
  (``0 <= JS <= ln 2``);
- closed-ended scoring: ``capitalize()``, nothing stripped, answer in response or
  response in answer, an empty response correct vs. containment on whole lower-cased
  words (``"no"`` is not inside ``"not sure"``), an empty response wrong;
- multiple choice: ``match_choice3`` (the first letter A-N in either case by regex, as
  written; else the option text found last; else the highest ``difflib`` ratio) vs. an
  option letter standing alone (first word, "answer is X", anywhere; not the article
  "A"), else exactly one option's text, else no answer.

Why the default differs: normalising KL over all layers makes a layer's score depend on
the other layers of the same sample (a layer's KL moves when another layer's attention
to the image grows), so per-layer curves are not comparable across models or prompts;
the clip adds ``1e-12·log`` terms for tokens outside the box; AR's duplicated cells
weigh overlapping boxes twice; and the scoring counts empty answers and partial words
("no" inside "not") as correct. The exact profile keeps each quantity a function of its
own row, as SPEC §3 defines it.
"""
from __future__ import annotations

import difflib
import re
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ._types import GroundingMetrics
from .constants import ANSWER_LINE, CHOICE_LINE, OFFICIAL_GRID
from .constants import REFERENCE_PROMPT as GENERIC_PROMPT

#: What the authors put between a question and its answer line.
SEPARATOR = " "
AR_EPS = 1e-8       # added to AR's denominator
NORM_EPS = 1e-8     # added to the normalisers of KL (whole sample) and JS (per row)
KL_CLIP = 1e-12     # KL's floor for the normalised map and mask
JS_EPS = 1e-8       # inside JS's logs
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

Options = Union[Sequence[str], Mapping[str, str]]


def question_prompt(question: str, suffix: Optional[str] = ANSWER_LINE) -> str:
    """``question + " " + suffix`` (the authors' closed-ended prompt); ``question`` alone
    when ``suffix`` is empty. Nothing is stripped."""
    return question + SEPARATOR + suffix if suffix else question


#: The authors' reference prompt: the generic description prompt with the answer line.
REFERENCE_PROMPT = question_prompt(GENERIC_PROMPT)


def option_map(options: Options) -> dict:
    """``{letter: text}`` in order: a list gets letters A, B, ...; a mapping keeps its keys."""
    if isinstance(options, Mapping):
        return {str(k): str(v) for k, v in options.items()}
    options = list(options)
    if len(options) > len(LETTERS):
        raise ValueError(f"options: at most {len(LETTERS)} options, got {len(options)}")
    return {LETTERS[i]: str(o) for i, o in enumerate(options)}


def choice_prompt(question: str, options: Options) -> str:
    """``"{question}\\nA. opt\\nB. opt...\\nAnswer with the option's letter from the given
    choices directly."`` (the LLaVA multiple-choice template, question not stripped)."""
    lines = "\n".join(f"{k}. {v}" for k, v in option_map(options).items())
    return f"{question}\n{lines}\n{CHOICE_LINE}"


# ----------------------------------------------------------------------------- metrics


def _grid(grid) -> tuple:
    if isinstance(grid, int):
        return grid, grid
    gh, gw = (int(g) for g in grid)
    return gh, gw


def _cell_indices(cells, gh: int, gw: int, what: str) -> np.ndarray:
    idx = []
    for c in cells:
        try:
            x, y = (int(v) for v in c)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: expected [x, y] cells, got {c!r}") from None
        if not (0 <= x < gw and 0 <= y < gh):
            raise ValueError(f"{what}: cell [{x}, {y}] is outside the {gh}x{gw} grid")
        idx.append(y * gw + x)
    if not idx:
        raise ValueError(f"{what}: no cells (the authors' code cannot score a sample without ground-truth tokens)")
    return np.asarray(idx, dtype=np.int64)


def authors_metrics(maps, gt_tokens, *, grid=OFFICIAL_GRID[0]) -> GroundingMetrics:
    """AR, KL and JS as the authors' measurement notebook computes them.

    Parameters
    ----------
    maps
        ``(L, N)`` or ``(B, L, N)`` head-mean attention maps (question maps, or question
        maps divided elementwise by the reference prompt's), ``N = gh·gw``; a tensor or
        an array.
    gt_tokens
        The sample's cells ``[[x, y], ...]`` on the grid (the authors' ``gt_tokens``;
        a cell may repeat), or for ``(B, L, N)`` maps a list of ``B`` such lists.
    grid
        ``gh = gw`` (int) or ``(gh, gw)``; token ``t = y·gw + x``.

    With ``a`` one layer's row, ``idx`` the listed cells (repeats kept), ``m`` the 0/1 mask
    of those cells divided by its sum:

    - ``AR = Σ_{i in idx} a_i / ((Σ a)/N · len(idx) + 1e-8)``;
    - ``KL = Σ_j m'_j log(m'_j / p_j)`` with ``p = clip(A / (Σ_{all layers} A + 1e-8),
      1e-12, 1)`` where ``A`` is the sample's whole ``(L, N)`` array, and
      ``m' = clip(m, 1e-12, 1)``;
    - ``JS = ½ Σ q log((q+ε)/(r+ε)) + ½ Σ m log((m+ε)/(r+ε))``, ``q = a/(Σa + ε)``,
      ``r = (q + m)/2``, ``ε = 1e-8``.

    An all-zero row gives AR 0 and finite KL and JS. Computed in float64, returned as a
    float32 :class:`~vgkernels.GroundingMetrics` of shape ``(L,)`` or ``(B, L)``.
    """
    a = maps.detach().cpu().double().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float64)
    if a.ndim == 2:
        batch, cells = False, [gt_tokens]
        a = a[None]
    elif a.ndim == 3:
        batch, cells = True, list(gt_tokens)
        if len(cells) != a.shape[0]:
            raise ValueError(f"gt_tokens: expected one cell list per sample ({a.shape[0]}), got {len(cells)}")
    else:
        raise ValueError(f"maps: expected (L, N) or (B, L, N) head-mean maps, got shape {tuple(a.shape)}")
    gh, gw = _grid(grid)
    N = a.shape[-1]
    if N != gh * gw:
        raise ValueError(f"maps: the last axis ({N}) must be the {gh}x{gw} grid's {gh * gw} tokens")
    B, L = a.shape[:2]
    ar, kl, js = (np.empty((B, L)) for _ in range(3))
    for b in range(B):
        idx = _cell_indices(cells[b], gh, gw, "gt_tokens" + (f"[{b}]" if batch else ""))
        row = a[b]
        mask = np.zeros(N)
        mask[idx] = 1.0
        mask /= mask.sum()
        ar[b] = row[:, idx].sum(-1) / (row.sum(-1) / N * len(idx) + AR_EPS)
        p = np.clip(row / (row.sum() + NORM_EPS), KL_CLIP, 1.0)
        mc = np.clip(mask, KL_CLIP, 1.0)
        kl[b] = (mc * np.log(mc / p)).sum(-1)
        q = row / (row.sum(-1, keepdims=True) + NORM_EPS)
        r = 0.5 * (q + mask)
        js[b] = 0.5 * ((q * np.log((q + JS_EPS) / (r + JS_EPS))).sum(-1)
                       + (mask * np.log((mask + JS_EPS) / (r + JS_EPS))).sum(-1))
    out = [torch.from_numpy(v if batch else v[0]).float() for v in (ar, kl, js)]
    return GroundingMetrics(*out)


# ----------------------------------------------------------------------------- scoring


def score_closed(prediction: str, answer: str) -> bool:
    """The authors' closed-ended rule: after ``str.capitalize()`` of both (first character
    upper case, the rest lower case; nothing stripped), the answer is inside the
    response or the response inside the answer — so an empty response counts as correct."""
    p, a = str(prediction).capitalize(), str(answer).capitalize()
    return a in p or p in a


# A letter A-N in either case with a non-word character (or the start, or 是 / 为) before it
# and a non-word character (or the end) after it, unless it is the article "a "/"A ".
_LETTER = re.compile(r"(?:^|\W|是|为)(?![aA] )([a-nA-N])(?:\W|$)", re.S)


def score_choice(prediction: str, options: Options) -> Optional[str]:
    """The option a response picks, by the authors' ``match_choice3``.

    1. the first letter A–N, in either case, standing alone (see :data:`_LETTER`),
       returned as written — a lower-case letter stays lower case and so never equals
       an upper-case gold letter, as in the authors' scorer;
    2. else, lower-cased, the option whose text occurs in the response furthest to the
       right (its last occurrence; ties go to the earlier option);
    3. else the option whose lower-cased text has the highest ``difflib`` ratio to the
       lower-cased response (ties go to the later option).

    ``None`` only when there are no options.
    """
    opts = option_map(options)
    if not opts:
        return None
    text = str(prediction)
    m = _LETTER.search(text)
    if m:
        return m.group(1)
    low = text.lower()
    found = [(low.rindex(v.lower()), -i, k) for i, (k, v) in enumerate(opts.items()) if v.lower() in low]
    if found:
        return max(found)[2]
    best, best_ratio = None, -1.0
    for k, v in opts.items():
        ratio = difflib.SequenceMatcher(None, v.lower(), low).ratio()
        if ratio >= best_ratio:
            best, best_ratio = k, ratio
    return best


__all__ = ["REFERENCE_PROMPT", "SEPARATOR", "authors_metrics", "choice_prompt", "option_map", "question_prompt",
           "score_choice", "score_closed"]
