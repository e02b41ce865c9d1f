"""Closed-ended VQA evaluation for VGRefine: prompts, answer matching, data rows, scores.

Prompts (the paper's Supp. I.2, LLaVA's evaluation templates):

- short answer (VQA-RAD, SLAKE, PathVQA)::

      <question>
      Answer the question using a single word or phrase.

- multiple choice (PMC-VQA, OmniMedVQA, MMMU)::

      <question>
      A. <option_1>
      B. <option_2>
      ...
      Answer with the option's letter from the given choices directly.

Matching. A short answer is correct when, lower-cased and stripped of surrounding
punctuation, the gold answer is a substring of the response or the response of the gold
answer (the authors' rule), and the response is not empty. A multiple-choice response
is read as a letter (``"B"``, ``"(B)"``, ``"B. Liver"``, ``"The answer is B"``) or, failing
that, as exactly one option's text; it is correct when that letter is the gold one.

Profiles. ``profile="authors"`` uses the paper authors' released conventions instead
(:mod:`vgkernels.paper`): the question and its answer line joined by a space and nothing
stripped, their closed-ended rule (``capitalize()``, substring either way, an empty
response counts) and ``match_choice3`` for multiple choice.

Data. A JSONL file, one question per line::

    {"image": "img/001.png", "question": "Is there a fracture?", "answer": "yes"}
    {"image": "img/002.png", "question": "Which organ is shown?", "options": ["Liver", "Lung", "Heart", "Brain"],
     "answer": "B"}

``image`` is a path relative to the JSONL file (or absolute); ``options`` a list (letters
A, B, ... in order) or an object ``{"A": ..., "B": ...}``; for multiple choice ``answer``
is the letter or the option text. Optional: ``id`` (default: the line number).
A JSON **list** of such objects is read too — the authors' evaluation files (HuatuoGPT-
Vision's ``eval.py`` format): ``image`` may be a one-element list, ``answer_label`` gives
the gold letter, ``dataset_index`` the id (default: the position).
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from typing import Optional

from .. import paper
from ..constants import ANSWER_LINE
from ..constants import CHOICE_LINE as MC_INSTRUCTION

LETTERS = string.ascii_uppercase
PROFILES = ("exact", "authors")


@dataclass
class VQARow:
    """One evaluation question. ``options`` is an ordered ``{letter: text}`` (empty for a
    short answer); ``answer`` is the gold text, or the gold letter for multiple choice."""

    id: str
    image: str
    question: str
    answer: str
    options: dict = field(default_factory=dict)
    line: int = 0
    raw_answer: Optional[str] = None  # the answer as written in the file (the authors' rule reads it unstripped)
    fields: dict = field(default_factory=dict)  # the row's other scalar fields (dataset, modality, ...)

    @property
    def kind(self) -> str:
        return "mc" if self.options else "short"

    def prompt(self, profile: str = "exact") -> str:
        return format_prompt(self.question, self.options, profile)


def format_prompt(question: str, options: Optional[dict] = None, profile: str = "exact") -> str:
    """The paper's evaluation prompt for ``question`` (multiple choice when ``options``):
    stripped and joined by newlines (``"exact"``), or as the authors' code builds it
    (``"authors"``: :func:`vgkernels.paper.question_prompt` / :func:`~vgkernels.paper.choice_prompt`)."""
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {PROFILES}, got {profile!r}")
    if profile == "authors":
        return paper.choice_prompt(question, options) if options else paper.question_prompt(question)
    q = question.strip()
    return paper.choice_prompt(q, options) if options else q + "\n" + ANSWER_LINE


_STRIP = string.whitespace + string.punctuation.replace("%", "")


def normalize(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding punctuation removed."""
    return " ".join(str(text).lower().split()).strip(_STRIP)


_WORD = re.compile(r"[0-9a-z%]+(?:[.'-][0-9a-z%]+)*")


def words(text: str) -> list:
    """The lower-cased words of ``text`` (letters, digits and ``%``; inner ``.``, ``'`` and
    ``-`` kept, so ``3.5 cm``, ``x-ray`` and ``don't`` stay whole); punctuation dropped."""
    return _WORD.findall(str(text).lower())


def _contains(seq: list, part: list) -> bool:
    n = len(part)
    return any(seq[i:i + n] == part for i in range(len(seq) - n + 1))


def short_answer_correct(response: str, answer: str) -> bool:
    """Containment on whole words: the answer's words appear, in order and adjacent, in the
    response, or the response's in the answer. An empty response is wrong, and a word is
    never matched inside another (``"no"`` is not in ``"not sure"`` nor in ``"normal"``)."""
    r, a = words(response), words(answer)
    if not r or not a:
        return False
    return _contains(r, a) or _contains(a, r)


# The article "A" (followed by a word) is not the letter A.
_ARTICLE = r"(?!A\s+[A-Za-z]{2})"


def choice_letter(response: str, options: dict) -> Optional[str]:
    """The option letter a response picks, or None: a letter standing alone at the start
    (``B``, ``(C)``, ``D. Brain``; not the article in ``A lung``), after "answer is" /
    "option" / "choice", or alone anywhere; else the one option whose text the response
    contains (whole words); else None."""
    letters = "".join(options)
    text = response.strip()
    m = re.match(rf"^[\(\[]?{_ARTICLE}([{letters}])(?:[\)\]\.:,\s]|$)", text)
    if m:
        return m.group(1)
    m = re.search(rf"(?:answer|option|choice)\s*(?:is|:)?\s*[\(\[]?([{letters}])\b", text, flags=re.IGNORECASE)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    m = re.search(rf"\b{_ARTICLE}([{letters}])\b", text)
    if m:
        return m.group(1)
    said = words(text)
    hits = [k for k, v in options.items() if words(v) and _contains(said, words(v))]
    return hits[0] if len(hits) == 1 else None


def is_correct(row: VQARow, response: str, profile: str = "exact") -> bool:
    if profile == "authors":
        if row.kind == "mc":
            return paper.score_choice(response, row.options) == row.answer
        return paper.score_closed(response, row.raw_answer if row.raw_answer is not None else row.answer)
    if row.kind == "mc":
        return choice_letter(response, row.options) == row.answer
    return short_answer_correct(response, row.answer)


class DataError(ValueError):
    """A malformed evaluation row (``path:line: reason``)."""


def parse_row(obj, path: str, line: int) -> VQARow:
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("image"), list):  # the authors' files list the images of a question
        if len(obj["image"]) != 1:
            raise DataError(f"{where}: expected one image per question, got {len(obj['image'])}")
        obj = dict(obj, image=obj["image"][0])
    for key in ("image", "question", "answer"):
        if key not in obj or obj[key] in (None, ""):
            raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
    opts = obj.get("options") or {}
    if isinstance(opts, list):
        if len(opts) > len(LETTERS):
            raise DataError(f"{where}: at most {len(LETTERS)} options, got {len(opts)}")
        opts = {LETTERS[i]: str(o) for i, o in enumerate(opts)}
    elif isinstance(opts, dict):
        opts = {str(k).strip().upper(): str(v) for k, v in opts.items()}
        if any(len(k) != 1 or k not in LETTERS for k in opts):
            raise DataError(f"{where}: options keys must be single letters A, B, ..., got {sorted(opts)}")
        opts = dict(sorted(opts.items()))
    else:
        raise DataError(f"{where}: options: expected a list or an object, got {type(opts).__name__}")
    raw = str(obj["answer"])
    answer = raw.strip()
    if opts and obj.get("answer_label") not in (None, ""):
        answer = str(obj["answer_label"])
    if opts:
        letter = answer.strip("()[]. ").upper()
        if letter not in opts:
            hits = [k for k, v in opts.items() if normalize(v) == normalize(answer)]
            if len(hits) != 1:
                raise DataError(f"{where}: answer {answer!r} is neither an option letter ({', '.join(opts)}) "
                                "nor exactly one option's text")
            letter = hits[0]
        answer = letter
    image = str(obj["image"])
    if not os.path.isabs(image):
        image = os.path.join(os.path.dirname(os.path.abspath(path)), image)
    rid = obj.get("id", obj.get("dataset_index", line))
    known = {"id", "image", "question", "answer", "options", "answer_label"}
    extra = {k: v for k, v in obj.items() if k not in known and isinstance(v, (str, int, float, bool))}
    return VQARow(str(rid), image, str(obj["question"]), answer, opts, line, raw, extra)


def select_rows(rows: list, where: dict, path: str) -> list:
    """Rows whose carried fields equal every ``where`` value (compared as strings)."""
    if not where:
        return rows
    kept = [r for r in rows if all(str(r.fields.get(k)) == v for k, v in where.items())]
    if not kept:
        seen = sorted({k for r in rows for k in r.fields})
        raise DataError(f"{path}: no row has {where} (fields present: {seen})")
    return kept


def _objects(path: str):
    """``(line or position, object, error)`` of a JSONL file or of a JSON list; ``error`` is
    the :class:`DataError` of a line that is not JSON (a JSON list that does not parse
    raises at once)."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        for i, obj in enumerate(items, start=1):
            yield i, obj, None
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line), None
        except json.JSONDecodeError as e:
            yield i, None, DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})")


def read_rows(path: str, rejects: Optional[list] = None) -> list:
    """Every row of an evaluation JSONL file or JSON list (``path:N``: N is the line, or the
    position in a list).

    Without ``rejects`` the first malformed row raises :class:`DataError`, and so does a
    file without rows. With a list, each malformed row (not JSON, a missing field, an
    answer that is no option, a duplicate id) is appended to it as a
    :class:`vgkernels.sweep.datasets.Reject` and reading goes on, as the sweep's readers do.
    """
    from ..sweep.datasets import Reject

    rows, seen = [], set()
    for i, obj, err in _objects(path):
        try:
            if err is not None:
                raise err
            row = parse_row(obj, path, i)
            if row.id in seen:
                raise DataError(f"{path}:{i}: duplicate id {row.id!r}")
        except DataError as e:
            if rejects is None:
                raise
            kind = "duplicate id" if "duplicate id" in str(e) else "malformed row"
            # the reject carries the place itself: keep the message only
            msg = str(e).removeprefix(f"{path}:{i}: ")
            rejects.append(Reject(path, i, msg, None, kind))
            continue
        seen.add(row.id)
        rows.append(row)
    if not rows and rejects is None:
        raise DataError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------- scores


def summarize(records: list, labels: list) -> dict:
    """Accuracy per method (``"baseline"`` and each setting label): overall, short-answer,
    multiple-choice and multiple-choice by gold letter. ``records`` are the CLI's per-sample
    dicts (``kind``, ``answer``, ``results: {label: {"correct": bool}}``)."""
    out = {}
    for label in labels:
        tot = {"all": [0, 0], "short": [0, 0], "mc": [0, 0]}
        by_letter: dict = {}
        for r in records:
            res = r["results"].get(label)
            if res is None:
                continue
            ok = int(bool(res["correct"]))
            for key in ("all", r["kind"]):
                tot[key][0] += ok
                tot[key][1] += 1
            if r["kind"] == "mc":
                c = by_letter.setdefault(r["answer"], [0, 0])
                c[0] += ok
                c[1] += 1
        out[label] = {
            "n": tot["all"][1],
            "accuracy": _ratio(tot["all"]),
            "short": _ratio(tot["short"]), "n_short": tot["short"][1],
            "mc": _ratio(tot["mc"]), "n_mc": tot["mc"][1],
            "mc_by_letter": {k: {"accuracy": _ratio(v), "n": v[1]} for k, v in sorted(by_letter.items())},
        }
    return out


def _ratio(c) -> Optional[float]:
    return None if c[1] == 0 else c[0] / c[1]


def summary_table(summary: dict) -> str:
    """A Markdown table of :func:`summarize`'s output (accuracies in %)."""
    letters = sorted({k for v in summary.values() for k in v["mc_by_letter"]})
    head = ["method", "n", "accuracy", "short", "mc"] + [f"mc {k}" for k in letters]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, v in summary.items():
        cells = [label, str(v["n"]), _pct(v["accuracy"]), _pct(v["short"]), _pct(v["mc"])]
        cells += [_pct(v["mc_by_letter"].get(k, {}).get("accuracy")) for k in letters]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


ACCURACY_COLUMNS = ("method", "k", "p", "layers", "mode", "n", "accuracy", "short", "n_short", "mc", "n_mc")


def accuracy_rows(summary: dict, settings) -> list:
    """One dict per method (baseline first, then each setting) with :data:`ACCURACY_COLUMNS`;
    accuracies are fractions (None without questions of that kind)."""
    by_label = {s.label(): s for s in settings}
    out = []
    for label, v in summary.items():
        s = by_label.get(label)
        out.append({"method": label, "k": None if s is None else ("all" if s.k is None else s.k),
                    "p": None if s is None else s.p, "layers": None if s is None else "+".join(map(str, s.layers)),
                    "mode": None if s is None else s.mode, "n": v["n"], "accuracy": v["accuracy"],
                    "short": v["short"], "n_short": v["n_short"], "mc": v["mc"], "n_mc": v["n_mc"]})
    return out


def write_accuracy(out_dir: str, summary: dict, settings, title: str = "") -> dict:
    """``accuracy.csv`` (always) and ``accuracy.png`` (when K, p or the layers take two or
    more values): accuracy against each swept value, one line per combination of the
    others, the baseline dashed. Returns the written paths."""
    import csv

    rows = accuracy_rows(summary, settings)
    paths = {"accuracy_csv": os.path.join(out_dir, "accuracy.csv")}
    with open(paths["accuracy_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ACCURACY_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in ACCURACY_COLUMNS})
    swept = [d for d in ("k", "p", "layers") if len({r[d] for r in rows if r["method"] != "baseline"}) > 1]
    if swept:
        paths["accuracy_png"] = os.path.join(out_dir, "accuracy.png")
        plot_accuracy(paths["accuracy_png"], rows, swept, title)
    return paths


_AXIS = {"k": "K (top heads)", "p": "percentile p", "layers": "knockout layers"}


def plot_accuracy(path: str, rows: list, swept: list, title: str = "") -> None:
    """One panel per swept dimension: accuracy (%) against its values."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["method"] == "baseline"), None)
    settings = [r for r in rows if r["method"] != "baseline"]
    fig, axes = plt.subplots(1, len(swept), figsize=(5.2 * len(swept), 4.2), squeeze=False, layout="constrained")
    for ax, dim in zip(axes[0], swept):
        values = _ordered({r[dim] for r in settings})
        pos = {v: i for i, v in enumerate(values)}
        others = [d for d in ("k", "p", "layers", "mode") if d != dim]
        series: dict = {}
        for r in settings:
            series.setdefault(tuple(r[d] for d in others), []).append(r)
        for key, rs in sorted(series.items(), key=lambda kv: str(kv[0])):
            rs = sorted(rs, key=lambda r: pos[r[dim]])
            label = ", ".join(f"{d}={v}" for d, v in zip(others, key) if d != "mode" or v != "renorm")
            ax.plot([pos[r[dim]] for r in rs], [_pct_value(r["accuracy"]) for r in rs], marker="o",
                    label=label or None)
        if base is not None and base["accuracy"] is not None:
            ax.axhline(100 * base["accuracy"], color="black", ls="--", lw=1, label="baseline (no VGRefine)")
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(_AXIS[dim])
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if len(series) <= 12:
            ax.legend(fontsize=7)
    fig.suptitle(title or "VGRefine accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct_value(x):
    return float("nan") if x is None else 100 * x


def _ordered(values) -> list:
    def key(v):
        if v == "all":
            return (1, float("inf"), "")
        try:
            return (0, float(str(v).split("+")[0]), str(v))
        except ValueError:
            return (2, 0.0, str(v))

    return sorted(values, key=key)


# ----------------------------------------------------------------------------- demo data


def write_demo_data(directory: str, n: int = 12, seed: int = 0) -> str:
    """Write ``n`` rows of generated data (noise images with a bright box; yes/no and
    four-option questions) to ``directory/data.jsonl``; returns its path."""
    import random

    from vgkernels.integrations.tiny import test_image

    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    rnd = random.Random(seed)
    path = os.path.join(directory, "data.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            w, h = rnd.choice([(64, 48), (48, 64), (56, 56), (80, 40)])
            name = f"images/{i:04d}.png"
            test_image(w, h, seed=seed * 1000 + i).save(os.path.join(directory, name))
            if i % 2 == 0:
                row = {"id": f"q{i}", "image": name, "question": "Is there a bright rectangle in the image?",
                       "answer": rnd.choice(["yes", "no"])}
            else:
                opts = ["top", "bottom", "left", "right"]
                row = {"id": f"q{i}", "image": name, "question": "Where is the bright rectangle?",
                       "options": opts, "answer": LETTERS[rnd.randrange(4)]}
            f.write(json.dumps(row) + "\n")
    return path
