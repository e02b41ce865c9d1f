"""Compare two pytest junit XML reports of the same suite: unpatched, then patched.

    python tests/peer/compare.py UNPATCHED.xml PATCHED.xml [--allow PATTERN ...]

Every test that passed unpatched must pass patched. A test *passed* when its testcase has
no ``failure``, ``error`` or ``skipped`` child (an unexpected pass of a non-strict xfail
counts as passed); a failed subtest makes its test failed. A test that is missing from the
patched report did not pass. ``--allow`` names tests (fnmatch patterns on the test name,
e.g. ``test_attn_implementation_composite_models``) whose difference is reported but
allowed. Prints the outcome counts of both runs, each regression with its message, and
the vgkernels counts the ``vgpatch_plugin`` stored in each test's properties; exits 1
when there is a regression, 0 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "missing")
_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 3}


@dataclass
class Result:
    outcome: str
    message: str = ""
    props: dict = field(default_factory=dict)


@dataclass
class Comparison:
    regressions: list  # [(test id, unpatched Result, patched Result)]
    allowed: list  # same shape: differences the allow-list covers
    fixed: list  # [test id]: did not pass unpatched, passed patched
    counts: dict  # {"unpatched": Counter, "patched": Counter}
    vgkernels_ran: int  # tests that passed in both runs with vgkernels kernel calls in the patched one
    passed_both: int

    @property
    def ok(self) -> bool:
        return not self.regressions


def _outcome(tc: ET.Element) -> tuple[str, str]:
    kinds = {}
    for ch in tc:
        if ch.tag in ("failure", "error", "skipped") and ch.tag not in kinds:
            kinds[ch.tag] = ch
    for tag in ("error", "failure"):
        if tag in kinds:
            ch = kinds[tag]
            lines = (ch.text or "").strip().splitlines()
            msg = ch.get("message") or (lines[-1] if lines else "")
            return ("error" if tag == "error" else "failed"), msg
    if "skipped" in kinds:
        ch = kinds["skipped"]
        return ("xfailed" if ch.get("type") == "pytest.xfail" else "skipped"), ch.get("message") or ""
    return "passed", ""


def load_junit(path: str) -> dict[str, Result]:
    """``{test id: Result}`` from a pytest junit XML file; the id is ``classname::name``.

    A test reported more than once (a teardown error after a pass, reruns) keeps its worst
    outcome.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise SystemExit(f"compare: cannot read junit XML {path!r}: {e}")
    out: dict[str, Result] = {}
    for tc in root.iter("testcase"):
        tid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        outcome, msg = _outcome(tc)
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        prev = out.get(tid)
        if prev is None or _RANK[outcome] > _RANK[prev.outcome]:
            out[tid] = Result(outcome, msg, {**(prev.props if prev else {}), **props})
    return out


def _name(tid: str) -> str:
    return tid.rsplit("::", 1)[-1]


def compare(unpatched: dict[str, Result], patched: dict[str, Result], allow=()) -> Comparison:
    regressions, allowed, fixed = [], [], []
    ran = passed_both = 0
    for tid, u in sorted(unpatched.items()):
        p = patched.get(tid, Result("missing", "not in the patched report"))
        if u.outcome == "passed" and p.outcome != "passed":
            (allowed if any(fnmatch.fnmatchcase(_name(tid), a) for a in allow) else regressions).append((tid, u, p))
        elif u.outcome != "passed" and p.outcome == "passed":
            fixed.append(tid)
        if u.outcome == "passed" and p.outcome == "passed":
            passed_both += 1
            if int(p.props.get("vgpatch_calls", 0) or 0) > 0:
                ran += 1
    counts = {
        "unpatched": collections.Counter(r.outcome for r in unpatched.values()),
        "patched": collections.Counter(r.outcome for r in patched.values()),
    }
    return Comparison(regressions, allowed, fixed, counts, ran, passed_both)


def _short(tid: str) -> str:
    cls, _, name = tid.rpartition("::")
    return f"{cls.rsplit('.', 1)[-1]}::{name}"


def report(c: Comparison, label: str = "", out=None) -> None:
    w = lambda s="": print(s, file=out or sys.stdout)
    head = f"[{label}] " if label else ""
    for run in ("unpatched", "patched"):
        cnt = c.counts[run]
        w(f"{head}{run:9s}: " + ", ".join(f"{cnt.get(o, 0)} {o}" for o in OUTCOMES if cnt.get(o, 0)))
    w(f"{head}passed in both runs: {c.passed_both}, of which {c.vgkernels_ran} ran vgkernels kernels "
      "when patched")
    for tid in c.fixed:
        w(f"{head}note: did not pass unpatched but passed patched: {_short(tid)}")
    for tid, u, p in c.allowed:
        w(f"{head}ALLOWED difference: {_short(tid)}: {u.outcome} -> {p.outcome}: {p.message[:300]}")
    if c.regressions:
        w(f"{head}REGRESSIONS: {len(c.regressions)} tests passed unpatched but not patched:")
        for tid, u, p in c.regressions:
            w(f"{head}  {_short(tid)}: {p.outcome}: {p.message[:300]}")
    else:
        w(f"{head}no regressions: every test that passed unpatched passed patched")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unpatched")
    ap.add_argument("patched")
    ap.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                    help="test name (fnmatch pattern) allowed to pass unpatched and not patched; reported")
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)
    c = compare(load_junit(a.unpatched), load_junit(a.patched), a.allow)
    report(c, a.label)
    return 0 if c.ok else 1


if __name__ == "__main__":
    sys.exit(main())
