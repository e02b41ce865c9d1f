"""Sweep inputs: the authors' question files, COCO annotations and plain manifests.

Every reader turns its rows into :class:`Sample` records and its malformed rows into
:class:`Reject` records, so that a sweep logs a bad row and goes on.

Formats
-------
``official``
    The authors' VGMED / COCO question files (SPEC §7): ``image`` is an id, resolved to
    a file as ``IMAGE_ROOT / PATTERN.format(image=id)``. ``PATTERN`` defaults to
    ``"{image}"`` and, when that file does not exist, ``.jpg``, ``.jpeg`` and ``.png``
    are tried. Real layouts: COCO val2014 ``"COCO_val2014_{image:012d}.jpg"``, COCO
    2017 ``"{image:012d}.jpg"``, SLAKE ``"{image}/source.jpg"``.
``manifest``
    One JSON object per line: ``image`` (a path, relative to ``--image-root`` or else
    to the manifest's folder), ``bbox`` or ``boxes`` (a list of ``[x, y, w, h]`` in
    original pixels), ``question``, optional ``id`` and ``gt_tokens``. Every other
    field (``modality``, ``label``, …) is carried into the results.
``coco``
    A COCO ``instances_*.json``. Each (image, category) pair with at least one
    non-crowd box of positive area becomes one localisation question, built from the
    paper's Supp. I.1 templates with the category name as ``{label}`` and all boxes of
    that category as ``bbox`` — the shape of the authors' own COCO rows.

Sample ids are stable across runs (a resumed sweep skips finished ids): the manifest's
``id`` when given, ``"{file stem}:{line}:{hash}"`` otherwise (the hash of the row's
content, so an edited file does not silently reuse old results), and
``"coco:{image_id}:{category_id}"`` for COCO.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Optional, Union

from ..clitools import UsageError
from ..data import RowError, iter_json_lines, parse_question

# Supp. I.1 of the paper: "the question from a predefined question set is sampled".
LOCALISATION_TEMPLATES = (
    "Is there a {label} in the image?",
    "Can you see a {label} in the image?",
    "Does the image contain a {label}?",
    "Is a {label} present in this image?",
    "Do you see a {label} in the picture?",
    "Is the {label} visible in the image?",
    "Is there any sign of a {label} in the image?",
    "Can a {label} be found in this image?",
    "Does this image show a {label}?",
    "Is a {label} shown in the picture?",
)

FORMATS = ("auto", "official", "manifest", "coco")
_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class Sample:
    """One image–box–question sample.

    ``index`` is the position in the dataset (results are merged in this order);
    ``boxes`` are ``[x, y, w, h]`` in the original image's pixels; ``fields`` holds the
    carried columns (``label``, ``modality``, …) used for the report's breakdowns.
    """

    index: int
    sid: str
    image: str
    question: str
    boxes: list
    gt_tokens: Optional[list] = None
    fields: dict = field(default_factory=dict)
    source: str = ""
    line: int = 0

    def to_json(self) -> dict:
        return {"index": self.index, "sid": self.sid, "image": self.image, "question": self.question,
                "boxes": self.boxes, "gt_tokens": self.gt_tokens, "fields": self.fields,
                "source": self.source, "line": self.line}

    @classmethod
    def from_json(cls, d: dict) -> "Sample":
        return cls(d["index"], d["sid"], d["image"], d["question"], d["boxes"], d.get("gt_tokens"),
                   d.get("fields", {}), d.get("source", ""), d.get("line", 0))


# Why a sample was rejected (``Reject.kind``); the first two are retried by the next run.
RETRIED_KINDS = ("missing image", "unreadable image")
REJECT_KINDS = RETRIED_KINDS + ("malformed row", "duplicate id", "bad box", "box outside the image",
                                "box outside what the model sees", "empty mask", "processor failed",
                                "capture failed")


@dataclass
class Reject:
    """A row that could not be used: where it was, what was wrong (``error``, the full
    text) and the kind of problem (``kind``, one of :data:`REJECT_KINDS`).

    ``retry``: the sample is tried again by the next run of the same sweep (its image
    was missing or unreadable: the files may be fixed); other rejects stay done.
    """

    source: str
    line: int
    error: str
    sid: Optional[str] = None
    kind: str = "malformed row"

    @property
    def retry(self) -> bool:
        return self.kind in RETRIED_KINDS

    def to_json(self) -> dict:
        return {"source": self.source, "line": self.line, "sid": self.sid, "error": self.error, "kind": self.kind,
                "retry": self.retry}


class SampleError(ValueError):
    """A problem of one sample's data (not of the model, the code or the machine): the
    sweep rejects that sample and goes on. ``samples``: the indices, within the batch
    given to the call that raised, of the samples at fault (None: the only one)."""

    def __init__(self, message: str, kind: str, samples=None):
        super().__init__(message)
        self.kind = kind
        self.samples = None if samples is None else list(samples)


def reject_of(sample: "Sample", error: str, kind: str) -> Reject:
    return Reject(sample.source, sample.line, error, sample.sid, kind)


def _row_hash(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _scalar_fields(d: dict) -> dict:
    """Carried fields: JSON-able values only (non-scalars are kept but not grouped on)."""
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict)) or v is None}


def resolve_image(image: Union[str, int], root: str, pattern: str = "{image}") -> str:
    """``root / pattern.format(image=image)``, trying common extensions when absent."""
    try:
        rel = pattern.format(image=image)
    except (ValueError, IndexError, KeyError) as e:
        raise ValueError(f"image pattern {pattern!r} cannot format image id {image!r}: {e}") from None
    path = os.path.join(root, rel)
    if os.path.exists(path):
        return path
    for ext in _EXTENSIONS:
        if os.path.exists(path + ext):
            return path + ext
    return path  # the loader reports it missing, per sample


def detect_format(path: str) -> str:
    """``coco`` for a ``.json`` with ``images``/``annotations``; for JSON lines,
    ``official`` when the first object has ``gt_tokens`` or a non-path image id,
    ``manifest`` otherwise."""
    if path.endswith(".json"):
        return "coco"
    with open(path) as f:
        for text in f:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if "boxes" in obj:
                return "manifest"
            img = obj.get("image")
            if "gt_tokens" in obj or isinstance(img, int):
                return "official"
            if isinstance(img, str) and ("/" in img or os.path.splitext(img)[1].lower() in _EXTENSIONS):
                return "manifest"
            return "official"
    return "official"


def _read_jsonl(path: str, fmt: str, image_root: Optional[str], pattern: str, start: int):
    samples, rejects = [], []
    stem = os.path.splitext(os.path.basename(path))[0]
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    for i, obj in iter_json_lines(path):
        try:
            if isinstance(obj, RowError):
                raise obj
            if fmt == "manifest" and isinstance(obj, dict) and "boxes" in obj and "bbox" not in obj:
                obj = dict(obj)
                obj["bbox"] = obj.pop("boxes")
            rec = parse_question(obj, path, i)
        except RowError as e:
            rejects.append(Reject(path, i, e.reason, kind=e.kind))
            continue
        extra = dict(rec.extra)
        sid = extra.pop("id", None) if fmt == "manifest" else None
        sid = str(sid) if sid is not None else f"{stem}:{i}:{_row_hash(obj)}"
        fields = {}
        if rec.label is not None:
            fields["label"] = rec.label
        fields.update(_scalar_fields(extra))
        if fmt == "manifest":
            img = str(rec.image)
            image = img if os.path.isabs(img) else os.path.join(base, img)
        else:
            try:
                image = resolve_image(rec.image, image_root or base, pattern)
            except ValueError as e:
                rejects.append(Reject(path, i, str(e), sid))
                continue
            fields.setdefault("image_id", rec.image)
        samples.append(Sample(start + len(samples), sid, image, rec.question, rec.bbox, rec.gt_tokens,
                              fields, path, i))
    return samples, rejects


def _read_coco(path: str, image_root: Optional[str], seed: int, start: int):
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UsageError(f"data: {path!r}: expected a COCO instances file with 'images' and 'annotations'")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    images = {im["id"]: im for im in data["images"] if isinstance(im, dict) and "id" in im}
    cats = {c["id"]: c.get("name", str(c["id"])) for c in data.get("categories", []) if "id" in c}
    groups: dict = {}
    rejects = []
    for k, ann in enumerate(data["annotations"]):
        where = f"annotation #{k} (id {ann.get('id') if isinstance(ann, dict) else None})"
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann or "bbox" not in ann:
            rejects.append(Reject(path, k + 1, f"{where}: expected image_id, category_id and bbox"))
            continue
        if ann.get("iscrowd", 0):
            continue  # crowd regions are not object boxes
        b = ann["bbox"]
        if (not isinstance(b, list) or len(b) != 4
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in b)):
            rejects.append(Reject(path, k + 1, f"{where}: bbox must be [x, y, w, h], got {b!r}"))
            continue
        if ann["image_id"] not in images:
            rejects.append(Reject(path, k + 1, f"{where}: image_id {ann['image_id']!r} is not in 'images'"))
            continue
        if b[2] <= 0 or b[3] <= 0:
            continue  # degenerate boxes select no token
        groups.setdefault((ann["image_id"], ann["category_id"]), []).append([float(c) for c in b])
    samples = []
    for (img_id, cat_id), boxes in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        label = cats.get(cat_id, str(cat_id))
        sid = f"coco:{img_id}:{cat_id}"
        # A per-sample generator keeps each sample's question independent of the others.
        rng = random.Random(f"{seed}:{sid}")
        question = rng.choice(LOCALISATION_TEMPLATES).format(label=label)
        im = images[img_id]
        image = os.path.join(root, im.get("file_name", f"{img_id}.jpg"))
        samples.append(Sample(start + len(samples), sid, image, question, boxes, None,
                              {"label": label, "image_id": img_id, "task": "localisation"}, path, 0))
    return samples, rejects


def load_samples(paths, *, fmt: str = "auto", image_root: Optional[str] = None,
                 image_pattern: str = "{image}", seed: int = 0, limit: Optional[int] = None):
    """All samples of ``paths`` (one path or a list) and the rows rejected on parsing.

    Returns ``(samples, rejects)``; ``samples[i].index == i``. Duplicate sample ids are
    rejected after their first occurrence (results are keyed by id).
    """
    if fmt not in FORMATS:
        raise UsageError(f"format: expected one of {FORMATS}, got {fmt!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    samples, rejects = [], []
    for p in paths:
        p = os.fspath(p)
        if not os.path.isfile(p):
            raise UsageError(f"data: {p!r} " + ("is a folder, not a file" if os.path.isdir(p) else "does not exist"))
        try:
            f = detect_format(p) if fmt == "auto" else fmt
            if f == "coco":
                s, r = _read_coco(p, image_root, seed, len(samples))
            else:
                s, r = _read_jsonl(p, f, image_root, image_pattern, len(samples))
        except UnicodeDecodeError:
            raise UsageError(f"data: {p!r} is not a text file (JSON lines or a COCO JSON file)") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"data: {p!r} is not one JSON document ({e.msg.removesuffix(' at')} at line {e.lineno} "
                             f"column {e.colno}); a question file or manifest is JSON lines: --format "
                             "official/manifest or auto") from None
        samples += s
        rejects += r
    seen, unique = set(), []
    for s in samples:
        if s.sid in seen:
            rejects.append(Reject(s.source, s.line, f"duplicate sample id {s.sid!r}", s.sid, "duplicate id"))
            continue
        seen.add(s.sid)
        unique.append(s)
    if limit is not None:
        unique = unique[: int(limit)]
    for i, s in enumerate(unique):
        s.index = i
    return unique, rejects
