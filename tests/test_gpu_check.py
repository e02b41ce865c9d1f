"""``make gpu-check`` (bench/gpu_check.py) on a machine without a GPU: the dry run writes its
summary and skips every GPU stage with a reason; the time-limit machinery kills a stage
that hangs (its whole process group) at its limit and the next stage still runs; the
total budget trims and skips stages; a benchmark stage writes the results file."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _load("gpu_check")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _files(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def test_dry_run_writes_the_summary_and_skips_every_gpu_stage(tmp_path):
    out = tmp_path / "gpu-check"
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", str(out)],
                       capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t < 120
    files = _files(out)
    assert {"summary.json", "summary.md"} <= set(files)
    assert len(files) <= gc.MAX_FILES == 8, files
    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] is True and s["final"] is True
    names = [st["name"] for st in s["stages"]]
    assert names == ["env", "cuda-build", "triton-warmup", "gpu-tests", "cuda-tests", "tune", "bench-kernels",
                     "bench-model", "sanitizer", "more-tests"]
    env_stage = s["stages"][0]
    assert env_stage["status"] == "ok", env_stage
    assert s["env"]["torch"] and s["env"]["python"] and s["env"]["missing"] == []
    for st in s["stages"][1:]:
        assert st["status"] == "skipped", st
        assert "dry run" in st["reason"] and "would run" in st["reason"], st
    assert sorted(s["files"]) == files
    md = (out / "summary.md").read_text()
    for name in names:
        assert f"| {name} | " in md


def test_planned_limits_fit_in_nine_minutes():
    build, seq = gc.default_stages()
    planned = 40 + sum(st.limit for st in seq if not st.min_left)  # env + the stages that always run
    assert planned <= gc.TOTAL_BUDGET <= 540
    assert build.limit < gc.TOTAL_BUDGET


def test_a_hanging_stage_is_killed_at_its_limit_and_the_next_stage_runs(tmp_path):
    pidfile = tmp_path / "child.pid"
    # The stage's process starts a child that would outlive it, then hangs: the whole
    # process group must go at the limit.
    hang_code = ("import subprocess, sys, time\n"
                 "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                 f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
                 "print('hanging now', flush=True)\n"
                 "time.sleep(300)\n")

    def hang(check, limit):
        rc, _, _ = check.run_cmd([sys.executable, "-c", hang_code], log="tests.log", limit=limit, prefix="hang")
        return ("timeout" if rc is None else "ok"), f"status {rc}"

    def after(check, limit):
        rc, _, tail = check.run_cmd([sys.executable, "-c", "print('after ran')"], log="tests.log", limit=limit,
                                    prefix="after")
        return ("ok" if rc == 0 and "after ran" in tail else "failed"), f"status {rc}"

    check = gc.Check(tmp_path / "out", budget=120)
    t = time.monotonic()
    rc = check.run_all([gc.Stage("hang", 3, hang, needs_gpu=False), gc.Stage("after", 30, after, needs_gpu=False)])
    assert time.monotonic() - t < 40
    res = {r.name: r for r in check.results}
    assert res["hang"].status == "timeout" and 2.5 <= res["hang"].seconds < 20, res["hang"]
    assert res["after"].status == "ok", res["after"]
    assert rc == 1  # a stage that timed out fails the check, after the others ran
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the hanging stage's child survived the kill"
    log = (tmp_path / "out" / "tests.log").read_text()
    assert "[hang] hanging now" in log and "killed at its limit" in log and "[after] after ran" in log
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(x["name"], x["status"]) for x in s["stages"]] == [("hang", "timeout"), ("after", "ok")]


def test_the_total_budget_trims_a_stage_and_skips_what_no_longer_fits(tmp_path):
    calls = []

    def sleeper(check, limit):
        calls.append(limit)
        rc, _, _ = check.run_cmd([sys.executable, "-c", "import time; time.sleep(60)"], log="tests.log",
                                 limit=limit, prefix="sleep")
        return ("timeout" if rc is None else "ok"), ""

    def never(check, limit):  # must not be called
        calls.append("never")
        return "ok", ""

    check = gc.Check(tmp_path / "out", budget=3)
    check.run_all([gc.Stage("long", 100, sleeper, needs_gpu=False), gc.Stage("next", 100, never, needs_gpu=False),
                   gc.Stage("extra", 100, never, needs_gpu=False, min_left=50)])
    res = {r.name: r for r in check.results}
    assert calls and calls[0] <= 3.0 and "never" not in calls
    assert res["long"].status == "timeout" and res["long"].seconds < 15
    assert res["next"].status == "skipped" and "no time left" in res["next"].reason
    assert res["extra"].status == "skipped"


def test_benchmark_stages_share_the_time_earlier_stages_left(tmp_path):
    got = {}

    def note(name):
        def fn(check, limit):
            got[name] = limit
            return "ok", ""
        return fn

    check = gc.Check(tmp_path / "out", budget=100)
    check.run_all([gc.Stage("a", 10, note("a"), needs_gpu=False),
                   gc.Stage("b", 10, note("b"), needs_gpu=False, extend=True),
                   gc.Stage("c", 10, note("c"), needs_gpu=False, extend=True),
                   gc.Stage("d", 10, note("d"), needs_gpu=False),
                   gc.Stage("e", 10, note("e"), needs_gpu=False, min_left=5)])
    assert got["a"] == 10 and got["d"] == 10 and got["e"] == 10
    # b: 100 s left, 20 reserved for c and d, 70 of slack shared with c; c: the rest but d's 10
    assert 43 < got["b"] <= 45 and 88 < got["c"] <= 90, got


def test_gpu_stages_are_skipped_with_the_reason_when_there_is_no_gpu(tmp_path):
    check = gc.Check(tmp_path / "out", budget=30)
    check.gpu_reason = "no CUDA device visible to torch"
    ran = []
    check.start_background(gc.Stage("bg", 10, lambda c, l: ran.append("bg") or ("ok", ""), describe="a build"))
    check.run_all([gc.Stage("g", 10, lambda c, l: ran.append("g") or ("ok", ""), describe="gpu tests"),
                   gc.Stage("c", 10, lambda c, l: ("ok", "cpu stage"), needs_gpu=False)])
    res = {r.name: r for r in check.results}
    assert ran == []
    assert res["bg"].status == res["g"].status == "skipped"
    assert res["g"].reason == "no CUDA device visible to torch; would run: gpu tests"
    assert res["c"].status == "ok"


def test_pytest_outcome_reads_the_summary_line():
    assert gc.pytest_outcome(0, "....\n12 passed, 3 deselected in 4.2s\n") == ("ok", "12 passed, 3 deselected in 4.2s")
    st, why = gc.pytest_outcome(1, "F.\n1 failed, 1 passed in 1.0s\n")
    assert st == "failed" and "1 failed" in why
    assert gc.pytest_outcome(None, "")[0] == "timeout"
    assert gc.pytest_outcome(5, "no tests ran")[0] == "failed"


def test_a_benchmark_stage_writes_the_results_file(tmp_path):
    """bench/run.py end to end (one cheap row): rows streamed, results written, targets listed."""
    check = gc.Check(tmp_path / "out", budget=300)
    check.gpu_reason = None
    status, reason = gc.bench_stage(["bench_metrics.py"], "bench", ("-k", "bandwidth"))(check, 240)
    assert status == "ok", (reason, (tmp_path / "out" / "bench.log").read_text()[-3000:])
    results = Path(check.state["results_json"])
    assert results.parent == tmp_path / "out" and results.with_suffix(".md").exists()
    data = json.loads(results.read_text())
    rows = data["rows"]
    assert [r["provider"] for r in rows] == ["copy"] and rows[0]["gbps"] > 0
    assert rows[0]["group"].startswith("bandwidth")
    assert data["targets"] and all(t["status"] in ("pass", "fail", "unmeasured") for t in data["targets"])
    assert all(t["reason"] for t in data["targets"] if t["status"] == "unmeasured")
    assert len(_files(tmp_path / "out")) <= 8
