"""The authors' question files (SPEC §7): one JSON object per line.

Fields: ``image`` (an id, str or int), ``label``, ``question``, ``bbox`` (list of
``[x, y, w, h]`` in original pixels), ``gt_tokens`` (24×24 cells stored ``[x, y]``),
and for VGMED also ``modality`` and ``location``. Any other field is carried in
``extra``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch

from .layout import gt_tokens_mask

from .constants import OFFICIAL_GRID


class RowError(ValueError):
    """A malformed row; ``line`` is 1-based; ``kind``: ``"bad box"`` for a box that
    cannot be one (NaN, negative size), else ``"malformed row"``."""

    def __init__(self, path: str, line: int, message: str, kind: str = "malformed row"):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.reason, self.kind = path, line, message, kind


@dataclass
class QuestionRecord:
    image: Union[str, int]
    question: str
    bbox: list[list[float]]
    label: Optional[str] = None
    gt_tokens: Optional[list[list[int]]] = None
    extra: dict = field(default_factory=dict)
    line: int = 0

    def gt_mask(self, grid: tuple[int, int] = OFFICIAL_GRID) -> torch.Tensor:
        """The ``gt_tokens`` cells as a ``(gh·gw,)`` row-major bool mask."""
        if self.gt_tokens is None:
            raise ValueError(f"line {self.line}: this row has no gt_tokens")
        return gt_tokens_mask(self.gt_tokens, grid)


def parse_question(obj, path: str = "<row>", line: int = 0) -> QuestionRecord:
    """One row as a :class:`QuestionRecord`; a :class:`RowError` says what is wrong."""
    if not isinstance(obj, dict):
        raise RowError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("image", "question", "bbox"):
        if key not in obj:
            raise RowError(path, line, f"missing field {key!r} (fields present: {sorted(obj)})")
    image = obj["image"]
    if not isinstance(image, (str, int)) or isinstance(image, bool) or image == "":
        raise RowError(path, line, f"image: expected a non-empty id (str or int), got {image!r}")
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise RowError(path, line, f"question: expected non-empty text, got {question!r}")
    boxes = obj["bbox"]
    if not isinstance(boxes, list) or not boxes:
        raise RowError(path, line, f"bbox: expected a non-empty list of [x, y, w, h], got {boxes!r}", "bad box")
    parsed = []
    for b in boxes:
        ok = isinstance(b, list) and len(b) == 4 and all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in b
        )
        if not ok or b[2] < 0 or b[3] < 0:
            raise RowError(path, line, f"bbox: expected [x, y, w, h] with finite numbers and w, h >= 0, got {b!r}",
                           "bad box")
        parsed.append([float(c) for c in b])
    gt = obj.get("gt_tokens")
    if gt is not None:
        if not isinstance(gt, list) or not all(isinstance(c, list) and len(c) == 2 for c in gt):
            raise RowError(path, line, f"gt_tokens: expected a list of [x, y] cells, got {str(gt)[:80]}")
        try:
            gt_tokens_mask(gt, OFFICIAL_GRID)
        except ValueError as e:
            raise RowError(path, line, str(e)) from None
    known = {"image", "question", "bbox", "label", "gt_tokens"}
    extra = {k: v for k, v in obj.items() if k not in known}
    label = obj.get("label")
    return QuestionRecord(image, question, parsed, None if label is None else str(label), gt, extra, line)


def iter_json_lines(path: str) -> Iterator[tuple[int, Union[object, RowError]]]:
    """``(line, object)`` for every non-blank line of a JSONL file (1-based line numbers);
    a line that is not JSON gives ``(line, RowError)`` instead, so readers can go on."""
    with open(path) as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as e:
                yield i, RowError(path, i, f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")


def iter_questions(path: str, *, errors: str = "raise") -> Iterator[Union[QuestionRecord, RowError]]:
    """Rows of a question file. ``errors="raise"`` raises the first :class:`RowError`;
    ``errors="yield"`` yields it in the row's place so a sweep can log and go on."""
    if errors not in ("raise", "yield"):
        raise ValueError(f"errors: expected 'raise' or 'yield', got {errors!r}")
    for i, obj in iter_json_lines(path):
        try:
            if isinstance(obj, RowError):
                raise obj
            yield parse_question(obj, path, i)
        except RowError as e:
            if errors == "raise":
                raise
            yield e


def read_questions(path: str) -> list[QuestionRecord]:
    """Every row of a question file; the first malformed row raises :class:`RowError`."""
    return list(iter_questions(path))


class ImageReadError(OSError):
    """An image that cannot be read; ``kind`` is ``"missing image"`` or
    ``"unreadable image"`` (the reject kinds a sweep retries on its next run)."""

    def __init__(self, path, kind: str, cause: BaseException):
        super().__init__(f"cannot read image {str(path)!r}: {cause}")
        self.path, self.kind = path, kind


def read_image(path) -> "PIL.Image.Image":  # noqa: F821
    """The image at ``path`` as RGB, fully loaded; :class:`ImageReadError` for a missing
    file or one PIL cannot decode (a corrupt or truncated file, an unknown format, or one
    over PIL's decompression-bomb limit, such as a whole-slide scan)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise ImageReadError(path, "missing image", e) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, "unreadable image", e) from None


def image_size(path) -> Optional[tuple]:
    """``(width, height)`` from the file's header, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
