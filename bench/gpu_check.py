#!/usr/bin/env python3
"""``make gpu-check``: everything a briefly lent GPU should run, in one command of at most
9 minutes, writing at most 8 files into one folder.

    python3 bench/gpu_check.py OUT            # on the GPU machine (``make gpu-check OUT=...``)
    python3 bench/gpu_check.py --dry-run OUT  # anywhere: plan only, every GPU stage skipped

Stages, in order, each with its own time limit (seconds) inside a total of
``TOTAL_BUDGET`` = 520 s; a stage gets ``min(its limit, time left)``; the two benchmark
stages (``+``) also share the time the earlier stages left unused, never what the later
ones are guaranteed:

=================  =====  ===============================================================
stage              limit  what
=================  =====  ===============================================================
env                   40  python, torch, CUDA, GPU name and capability, nvcc, required
                          packages (wheels carried in ``.whl/`` installed first; missing
                          ones tried from the pinned requirements with no retries),
                          ``vgkernels`` installed editable (without the extension) if
                          this tree is not importable as it
cuda-build        (240)   ``setup.py build_ext --inplace`` for this GPU's architecture only
                          (``VGKERNELS_CUDA_ARCHS``); in the background from the end of
                          ``env``, beside the warm-up
triton-warmup         90  Triton kernels compiled for the dtypes, head dims and feature sets
                          the tests and benchmarks use, in parallel processes (shared
                          on-disk cache)
gpu-tests            115  ``pytest -m "gpu and not cuda_ext"`` (the Triton GPU tests, every
                          tile configuration), kernel files first
cuda-tests            60  waits for ``cuda-build``, then ``pytest -m "cuda_ext and not slow"``
tune                  40  ``bench/tune.py`` (per-configuration timings against SDPA) when it
                          exists, with ``--out OUT/tune.json --time-limit`` if it takes them
bench-kernels        75+  ``bench/run.py --small`` over bench_attention, bench_metrics,
                          bench_cuda (rows kept if stopped at the limit)
bench-model         100+  ``bench/run.py --small`` over bench_model (7B-shaped LLaVA, B = 1)
sanitizer      if time    ``compute-sanitizer`` memcheck test of the CUDA kernels (>= 45 s left)
more-tests     if time    the other Triton and dispatch tests on the GPU (>= 40 s left)
=================  =====  ===============================================================

Every stage runs as a subprocess in its own process group: at its limit the whole group
is killed (SIGTERM, then SIGKILL), its output so far stays in its log, and the next stage
runs. ``summary.json`` and ``summary.md`` are rewritten after every stage.

Files in OUT (at most 8): ``summary.json``, ``summary.md``, ``build.log`` (extension build
and warm-up), ``tests.log``, ``bench.log``, ``tune.json`` (if tune.py writes it) and the
benchmark results ``<device>-<date>.json`` / ``.md`` (the files to commit as
``bench/results/``).

On a machine without CUDA (or with ``--dry-run``) every stage that needs the GPU is
skipped with its reason, so CI runs the orchestration itself (tests/test_gpu_check.py).
The script imports only the standard library; torch is imported by its subprocesses.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOTAL_BUDGET = 520.0  # seconds: 9 minutes less a margin for kills (<= 20 s each) and the summary
MAX_FILES = 8
REQUIRED = ("torch", "triton", "transformers", "tokenizers", "numpy", "einops", "PIL", "safetensors", "tqdm",
            "pytest", "pytest_benchmark", "hypothesis")
# import name -> distribution name in requirements*.txt
DISTS = {"PIL": "pillow", "pytest_benchmark": "pytest-benchmark"}
NEVER_INSTALL = {"torch", "triton"}  # the GPU machine's own CUDA builds are the ones to use


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One step. ``fn(check, limit) -> (status, reason)``; status in ok / failed / timeout /
    partial / skipped. ``needs_gpu`` stages are skipped where there is none (or in a dry run);
    ``min_left`` > 0 makes a stage opportunistic: it runs only with that much time left."""

    name: str
    limit: float
    fn: Callable
    needs_gpu: bool = True
    min_left: float = 0.0
    describe: str = ""
    extend: bool = False  # may also use a share of the time earlier stages left unused


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    limit_s: Optional[float]
    reason: str = ""
    started: float = field(default=0.0, repr=False)

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 1),
                "limit_s": None if self.limit_s is None else round(self.limit_s, 1), "reason": self.reason}


class Check:
    """Runs stages against a total budget and keeps ``summary.{json,md}`` up to date."""

    def __init__(self, out: Path, *, budget: float = TOTAL_BUDGET, dry_run: bool = False,
                 python: str = sys.executable):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.budget = float(budget)
        self.dry_run = dry_run
        self.python = python
        self.t0 = time.monotonic()
        self.results: list[Result] = []
        self.env: dict = {}
        self.gpu_reason: Optional[str] = "environment not probed yet"
        self.state: dict = {}
        self._opened: set = set()
        self._lock = threading.Lock()
        self._background: dict = {}
        self._procs: set = set()  # process groups alive now
        self.stopping = False  # set when the budget ends with a background stage still running
        self.started_at = _dt.datetime.now().isoformat(timespec="seconds")

    # -- time
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    # -- logs
    def log_path(self, name: str) -> Path:
        return self.out / name

    def write_log(self, name: str, text: str) -> None:
        with self._lock:
            mode = "a" if name in self._opened else "w"
            self._opened.add(name)
            with open(self.log_path(name), mode) as f:
                f.write(text)
                f.flush()

    # -- subprocesses
    def run_cmd(self, cmd: list, *, log: str, limit: float, prefix: str, env: Optional[dict] = None,
                cwd: Path = ROOT) -> tuple:
        """Run ``cmd`` in its own process group, streaming its output into ``log`` line by line
        with ``prefix``. Returns ``(returncode or None if killed at the limit, seconds, tail)``."""
        full_env = dict(os.environ)
        full_env.pop("TRITON_INTERPRET", None)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        shown = " ".join("<script>" if "\n" in str(c) else str(c) for c in cmd)
        self.write_log(log, f"\n[{prefix}] $ {shown}   (limit {limit:.0f} s)\n")
        t = time.monotonic()
        try:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            self.write_log(log, f"[{prefix}] could not start: {e}\n")
            return 127, 0.0, str(e)
        with self._lock:
            self._procs.add(proc)
        tail: list = []

        def pump():
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace")
                tail.append(line)
                del tail[:-60]
                self.write_log(log, f"[{prefix}] {line}" if line.endswith("\n") else f"[{prefix}] {line}\n")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(limit, 0.1))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc = None
            self.write_log(log, f"[{prefix}] killed at its limit of {limit:.0f} s\n")
        finally:
            with self._lock:
                self._procs.discard(proc)
        reader.join(timeout=5)
        return rc, time.monotonic() - t, "".join(tail)

    # -- running stages
    def run_stage(self, stage: Stage, later: tuple = ()) -> Result:
        """Run one stage within ``min(its limit, time left)``. An ``extend`` stage also gets
        its share of the slack: the time left beyond the limits of the ``later`` stages that
        always run, split evenly among the extendable stages from this one on."""
        start = self.elapsed()
        left = self.left()
        limit = min(stage.limit, left)
        if stage.extend:
            reserved = sum(s.limit for s in later if not s.min_left)
            slack = left - reserved - stage.limit
            sharers = 1 + sum(1 for s in later if s.extend)
            if slack > 0:
                limit = min(stage.limit + slack / sharers, left)
        skip = None
        if stage.needs_gpu and self.gpu_reason:
            skip = self.gpu_reason + (f"; would run: {stage.describe}" if stage.describe else "")
        elif stage.min_left and left < stage.min_left:
            skip = f"not enough time left ({left:.0f} s < {stage.min_left:.0f} s needed)"
        elif limit <= 1.0:
            skip = f"no time left in the {self.budget:.0f} s budget"
        if skip:
            res = Result(stage.name, "skipped", 0.0, None, skip, start)
        else:
            try:
                status, reason = stage.fn(self, limit)
            except Exception as e:  # the orchestrator itself must survive any stage
                status, reason = "error", f"{type(e).__name__}: {e}"
            res = Result(stage.name, status, self.elapsed() - start, limit, reason, start)
        self.results.append(res)
        self.write_summary()
        print(f"gpu-check: {res.name:14s} {res.status:8s} {res.seconds:6.1f} s  {res.reason}", flush=True)
        return res

    def run_all(self, stages: list) -> int:
        for i, st in enumerate(stages):
            self.run_stage(st, tuple(stages[i + 1:]))
        for name in list(self._background):
            if self.join_background(name, 0.0) is None:
                # Still running at the end of the budget: stop it rather than leave it behind.
                self.stopping = True
                with self._lock:
                    procs = list(self._procs)
                for proc in procs:
                    kill_group(proc)
                self.join_background(name, 15.0)
        self.write_summary(final=True)
        bad = [r for r in self.results if r.status in ("failed", "timeout", "error")]
        return 1 if bad else 0

    # -- background stages (the extension build beside the warm-up)
    def start_background(self, stage: Stage) -> None:
        if stage.needs_gpu and self.gpu_reason:
            reason = self.gpu_reason + (f"; would run: {stage.describe}" if stage.describe else "")
            self.results.append(Result(stage.name, "skipped", 0.0, None, reason, self.elapsed()))
            self.write_summary()
            return
        box: dict = {}
        start = self.elapsed()
        limit = min(stage.limit, self.left())

        def body():
            try:
                box["out"] = stage.fn(self, limit)
            except Exception as e:
                box["out"] = ("error", f"{type(e).__name__}: {e}")

        th = threading.Thread(target=body, daemon=True)
        th.start()
        self._background[stage.name] = (th, box, start, limit)

    def join_background(self, name: str, wait: float) -> Optional[Result]:
        """Wait up to ``wait`` s for a background stage; record it once it is done."""
        done = next((r for r in self.results if r.name == name), None)
        if done is not None:
            return done
        if name not in self._background:
            return None
        th, box, start, limit = self._background[name]
        th.join(timeout=max(wait, 0.0))
        if th.is_alive():
            return None
        del self._background[name]
        status, reason = box.get("out", ("error", "no result"))
        res = Result(name, status, self.elapsed() - start, limit, reason, start)
        self.results.append(res)
        self.write_summary()
        print(f"gpu-check: {res.name:14s} {res.status:8s} {res.seconds:6.1f} s  {res.reason}", flush=True)
        return res

    # -- summary
    def files(self) -> list:
        return sorted(p.name for p in self.out.rglob("*") if p.is_file())

    def write_summary(self, final: bool = False) -> None:
        results = sorted(self.results, key=lambda r: r.started)
        running = [n for n in self._background]
        data = {
            "started": self.started_at, "dry_run": self.dry_run, "budget_s": self.budget,
            "elapsed_s": round(self.elapsed(), 1), "final": final, "env": self.env,
            "gpu": self.env.get("device_name"), "stages": [r.to_json() for r in results],
            "running_in_background": running, "targets": self._targets(),
        }
        files = set(self.files()) | {"summary.json", "summary.md"}
        data["files"] = sorted(files)
        if len(files) > MAX_FILES:
            data["warning"] = f"{len(files)} files in the output folder, more than {MAX_FILES}"
        (self.out / "summary.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (self.out / "summary.md").write_text(summary_markdown(data))

    def _targets(self) -> list:
        """The issue-14 targets from the benchmark results file this check wrote, if any."""
        path = self.state.get("results_json")
        if not path or not Path(path).exists():
            return []
        try:
            return json.loads(Path(path).read_text()).get("targets", [])
        except (OSError, json.JSONDecodeError):
            return []


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL whatever is left of it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                # the leader is gone; members of its group may linger: make sure
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def summary_markdown(d: dict) -> str:
    env = d.get("env", {})
    lines = [f"# gpu-check — {env.get('device_name') or 'no GPU'} — {d['started']}", ""]
    if d.get("dry_run"):
        lines += ["**Dry run**: stages that need the GPU were skipped.", ""]
    lines += [f"{d['elapsed_s']:.0f} s of a {d['budget_s']:.0f} s budget"
              + ("" if d.get("final") else " (in progress)") + ".", ""]
    keys = ("python", "torch", "torch_cuda", "triton", "transformers", "device_name", "capability", "gpu_memory_gib",
            "nvcc", "compute_sanitizer", "cpu_count", "missing")
    lines += ["| environment | |", "|---|---|"]
    lines += [f"| {k} | {env.get(k)} |" for k in keys if k in env]
    lines += ["", "| stage | status | seconds | limit s | reason |", "|---|---|---:|---:|---|"]
    for s in d["stages"]:
        lim = "–" if s["limit_s"] is None else f"{s['limit_s']:.0f}"
        reason = str(s["reason"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {lim} | {reason} |")
    if d.get("running_in_background"):
        lines += ["", f"still running: {', '.join(d['running_in_background'])}"]
    if d.get("targets"):
        lines += ["", "## Targets", "", "| target | group | value | status |", "|---|---|---:|---|"]
        for t in d["targets"]:
            val = "–" if t.get("value") is None else f"{t['value']} {t.get('unit') or ''}"
            st = t["status"] if t["status"] != "unmeasured" else f"unmeasured: {t.get('reason')}"
            lines.append(f"| {t['target']} | {t['group']} | {val} | {st} |")
    lines += ["", "files: " + ", ".join(d.get("files", [])), ""]
    if d.get("warning"):
        lines += [f"**{d['warning']}**", ""]
    return "\n".join(lines)


def pytest_outcome(rc, tail: str) -> tuple:
    """(status, reason) of a pytest run from its exit status and the last summary line."""
    counts = ""
    for line in reversed(tail.splitlines()):
        if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            counts = line.strip(" =\n")
            break
    if rc is None:
        return "timeout", f"killed at its limit; last summary: {counts or 'none yet'}"
    if rc == 0:
        return "ok", counts
    if rc == 5:
        return "failed", "no tests collected for this selection"
    return "failed", counts or f"pytest exit status {rc}"


# ----------------------------------------------------------------------------- env

PROBE = r"""
import importlib.util, json, os, platform, shutil, subprocess, sys
req = json.loads(sys.argv[1])
out = {"python": platform.python_version(), "executable": sys.executable, "cpu_count": os.cpu_count()}
out["missing"] = [m for m in req if importlib.util.find_spec(m) is None]
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device_name"] = torch.cuda.get_device_name(0)
        out["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
        out["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        out["multiprocessors"] = p.multi_processor_count
except Exception as e:
    out["torch_error"] = "%s: %s" % (type(e).__name__, e)
for mod in ("triton", "transformers"):
    try:
        out[mod] = __import__(mod).__version__
    except Exception as e:
        out[mod] = None
nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
out["nvcc"] = None
if nvcc:
    try:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
        out["nvcc"] = nvcc + " " + (v.strip().splitlines()[-1] if v.strip() else "")
    except Exception as e:
        out["nvcc"] = nvcc + " (%s)" % e
out["compute_sanitizer"] = shutil.which("compute-sanitizer") or next(
    (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
if shutil.which("nvidia-smi"):
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip()
    except Exception as e:
        out["nvidia_smi"] = str(e)
try:
    import vgkernels, vgkernels.integrations
    out["vgkernels"] = os.path.dirname(vgkernels.__file__)
except Exception as e:
    out["vgkernels_error"] = "%s: %s" % (type(e).__name__, e)
print("PROBE " + json.dumps(out))
"""


def probe(check: Check, limit: float) -> dict:
    rc, _, tail = check.run_cmd([check.python, "-c", PROBE, json.dumps(list(REQUIRED))], log="build.log",
                                limit=limit, prefix="env")
    line = next((l for l in reversed(tail.splitlines()) if l.startswith("PROBE ")), None)
    if line is None:
        return {"probe_error": f"probe exit status {rc}: {tail[-500:]}"}
    return json.loads(line[len("PROBE "):])


def pinned(names) -> list:
    """``name==version`` for ``names`` from requirements*.txt (distribution names)."""
    pins = {}
    for req in ("requirements.txt", "requirements-test.txt"):
        path = ROOT / req
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            line = line.split("#")[0].split(";")[0].strip()
            m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            if m:
                pins[m.group(1).lower().replace("_", "-")] = line
    out = []
    for n in names:
        dist = DISTS.get(n, n).lower().replace("_", "-")
        out.append(pins.get(dist, dist))
    return out


def stage_env(check: Check, limit: float) -> tuple:
    deadline = time.monotonic() + limit
    left = lambda: max(deadline - time.monotonic(), 1.0)  # noqa: E731
    env = probe(check, min(left(), 60.0))
    notes = []
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels and not check.dry_run:
        # Carried wheels (bench/README.md): installed as they are, over the machine's versions.
        rc, _, _ = check.run_cmd([check.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                                  *map(str, wheels)], log="build.log", limit=min(left(), 120.0), prefix="env")
        notes.append(f"installed {len(wheels)} carried wheels" if rc == 0 else f"carried wheels failed (pip {rc})")
        env = probe(check, min(left(), 60.0))
    missing = [m for m in env.get("missing", []) if m not in NEVER_INSTALL]
    if missing and not check.dry_run:
        # No network on a lent machine: one quick try, no retries.
        cmd = [check.python, "-m", "pip", "install", "-q", "--retries", "0", "--timeout", "5", *pinned(missing)]
        rc, _, _ = check.run_cmd(cmd, log="build.log", limit=min(left(), 60.0), prefix="env")
        notes.append(f"installed {missing}" if rc == 0 else f"could not install {missing} (pip status {rc})")
    here = str(ROOT / "vgkernels")
    if env.get("vgkernels") != here and not check.dry_run and "torch" in env:
        # Editable, pure Python: the extension is built in place by the cuda-build stage.
        rc, _, _ = check.run_cmd([check.python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                                  "-e", str(ROOT)], log="build.log", limit=min(left(), 120.0), prefix="env",
                                 env={"VGKERNELS_BUILD_CUDA": "0"})
        notes.append("installed vgkernels (editable)" if rc == 0 else f"editable install failed (pip status {rc})")
    if notes or missing:
        env = dict(probe(check, min(left(), 60.0)), actions=notes)
    check.env = env
    if check.dry_run:
        check.gpu_reason = "dry run: stages that need the GPU are skipped"
    elif "torch" not in env:
        check.gpu_reason = f"torch is not importable: {env.get('torch_error') or env.get('probe_error')}"
    elif not env.get("cuda_available"):
        check.gpu_reason = "no CUDA device visible to torch " + (
            f"(torch {env['torch']} is a CPU build)" if not env.get("torch_cuda") else f"(torch {env['torch']})")
    elif "vgkernels_error" in env:
        check.gpu_reason = f"vgkernels is not importable: {env['vgkernels_error']}"
    else:
        check.gpu_reason = None
    status = "ok"
    reason = f"{env.get('device_name') or 'no GPU'}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), " \
             f"triton {env.get('triton')}, transformers {env.get('transformers')}"
    still = env.get("missing") or []
    if still:
        reason += f"; missing: {still}"
        status = "failed" if not check.dry_run else "ok"
    if notes:
        reason += "; " + "; ".join(notes)
    return status, reason


# ----------------------------------------------------------------------------- build and warm-up


def arch_of(env: dict) -> Optional[str]:
    cap = env.get("capability")
    return cap.replace(".", "") if cap else None


def stage_cuda_build(check: Check, limit: float) -> tuple:
    if not check.env.get("nvcc"):
        return "skipped", "nvcc not found: the CUDA extension cannot be built here"
    arch = arch_of(check.env)
    if not arch:
        return "skipped", "the GPU's compute capability is unknown"
    jobs = str(max(2, min(8, (check.env.get("cpu_count") or 4) // 2)))
    env = {"VGKERNELS_BUILD_CUDA": "1", "VGKERNELS_CUDA_ARCHS": arch, "MAX_JOBS": jobs,
           "TORCH_CUDA_ARCH_LIST": check.env.get("capability", "")}
    rc, secs, tail = check.run_cmd([check.python, "setup.py", "build_ext", "--inplace"], log="build.log",
                                   limit=limit, prefix="cuda-build", env=env)
    if rc is None or (rc < 0 and check.stopping):
        return "timeout", f"extension build for sm_{arch} stopped after {secs:.0f} s (its limit or the budget's end)"
    if rc != 0:
        return "failed", f"extension build for sm_{arch} failed (status {rc}): {tail.strip().splitlines()[-1:]}"
    check.state["cuda_built"] = True
    return "ok", f"vgkernels._C built for sm_{arch} only in {secs:.0f} s (MAX_JOBS={jobs})"


def warmup_jobs() -> list:
    """The Triton compile jobs, one per process slot: dtype x head dim, then metrics and capture."""
    jobs = [("attention", dt, D) for D in (128, 64, 80, 96, 256) for dt in ("bfloat16", "float16")]
    jobs += [("attention", "float32", 128), ("attention", "float32", 64), ("metrics",), ("capture",)]
    return jobs


def stage_warmup(check: Check, limit: float) -> tuple:
    n = max(1, min(len(warmup_jobs()), (check.env.get("cpu_count") or 8) - 4))
    procs = []
    deadline = time.monotonic() + limit
    results: list = [None] * n

    def one(i):
        results[i] = check.run_cmd([check.python, str(Path(__file__).resolve()), "--warmup-worker", str(i), str(n)],
                                   log="build.log", limit=max(deadline - time.monotonic(), 1.0),
                                   prefix=f"warmup {i}/{n}")

    for i in range(n):
        th = threading.Thread(target=one, args=(i,), daemon=True)
        th.start()
        procs.append(th)
    for th in procs:
        th.join()
    killed = [i for i, r in enumerate(results) if r is None or r[0] is None]
    failed = [i for i, r in enumerate(results) if r is not None and r[0] not in (0, None)]
    variants = sum(len(re.findall(r"^WARM ok", r[2], re.M)) for r in results if r)
    errors = sum(len(re.findall(r"^WARM error", r[2], re.M)) for r in results if r)
    if killed:
        # Not a failure: what compiled is cached; the rest compiles on first use.
        return "partial", (f"{len(killed)} of {n} warm-up processes stopped at the limit; {variants} variants "
                           f"compiled, {errors} raised")
    if failed or errors:
        return "failed", f"{errors} variants raised, {len(failed)} processes failed (see build.log)"
    return "ok", f"{variants} kernel variants compiled in {n} processes"


def warmup_worker(index: int, total: int) -> int:
    """Compile this worker's share of :func:`warmup_jobs` by calling the public API once per
    variant (the compiled kernels land in Triton's on-disk cache, shared with later stages)."""
    import math

    import torch

    import vgkernels
    from vgkernels import Capture, Knockout

    dev = "cuda"
    jobs = warmup_jobs()[index::total]
    bad = 0

    def run(label, fn):
        nonlocal bad
        t = time.perf_counter()
        try:
            fn()
            torch.cuda.synchronize()
            print(f"WARM ok {label} {time.perf_counter() - t:.1f}s", flush=True)
        except Exception as e:
            bad += 1
            print(f"WARM error {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)

    g = torch.Generator().manual_seed(index)
    for job in jobs:
        if job[0] == "attention":
            _, dtn, D = job
            dt = getattr(torch, dtn)
            # the GPU tests' prefill shape, the benchmarks' S = 1200, a decode row
            for Sq, Sk, Hq, Hkv in ((300, 700, 8, 2), (1200, 1200, 28, 4), (1, 1000, 28, 4)):
                B, N = 2, min(200, Sk - 40)
                q = torch.randn(B, Sq, Hq, D, generator=g).to(dev, dt)
                k = torch.randn(B, Sk, Hkv, D, generator=g).to(dev, dt)
                v = torch.randn(B, Sk, Hkv, D, generator=g).to(dev, dt)
                t = lambda x: torch.full((B,), x, dtype=torch.int64)  # noqa: E731
                keep = torch.rand(B, N, generator=g).to(dev) > 0.5
                kpm = torch.ones(B, Sk, dtype=torch.bool, device=dev)
                kpm[1, :5] = False
                cap = Capture(t(Sk - 1), t(35), N)
                for mode in ("renorm", "zero"):
                    ko = Knockout(t(max(Sk - Sq, 35 + N)), t(Sk), t(35), keep, mode)
                    tag = f"attention {dtn} D{D} Sq{Sq} Sk{Sk} {Hq}/{Hkv}"
                    if mode == "renorm":
                        run(f"{tag} plain+lse", lambda: vgkernels.attention(q, k, v, return_lse=True, backend="triton"))
                        run(f"{tag} cap", lambda: vgkernels.attention(q, k, v, capture=cap, backend="triton"))
                    run(f"{tag} ko-{mode}", lambda: vgkernels.attention(q, k, v, knockout=ko, backend="triton"))
                    run(f"{tag} ko-{mode}+cap", lambda: vgkernels.attention(q, k, v, knockout=ko, capture=cap,
                                                                          backend="triton"))
                    run(f"{tag} kpm+ko-{mode}+cap", lambda: vgkernels.attention(
                        q, k, v, key_padding_mask=kpm, knockout=ko, capture=cap, backend="triton"))
        elif job[0] == "metrics":
            for shape in ((16, 28, 28, 576), (2, 3, 4, 1000), (16, 32, 4096), (16, 32, 16384)):
                attn = torch.softmax(torch.randn(shape, generator=g), -1).to(dev)
                mask = (torch.rand(shape[0], *(1,) * (len(shape) - 2), shape[-1], generator=g) < 0.1).to(dev)
                run(f"metrics {shape}", lambda: vgkernels.grounding_metrics(attn, mask, backend="triton"))
                run(f"metrics {shape} ref", lambda: vgkernels.grounding_metrics(attn, mask, reference=attn + 1e-3,
                                                                               backend="triton"))
        else:
            for dtn in ("bfloat16", "float16", "float32"):
                dt = getattr(torch, dtn)
                for D in (64, 128):
                    B, Sk, Hq, Hkv, N = 2, 900, 28, 4, 576
                    qr = torch.randn(B, Hq, D, generator=g).to(dev, dt)
                    k = torch.randn(B, Sk, Hkv, D, generator=g).to(dev, dt)
                    lse = torch.full((B, Hq), 3.0, device=dev)
                    ks = torch.full((B,), 35, dtype=torch.int64)
                    keep = torch.rand(B, N, generator=g).to(dev) > 0.5
                    run(f"capture_from_lse {dtn} D{D}", lambda: vgkernels.capture_from_lse(
                        qr, k, lse, ks, N, softmax_scale=1 / math.sqrt(D), backend="triton"))
                    run(f"capture_from_lse {dtn} D{D} keep", lambda: vgkernels.capture_from_lse(
                        qr, k, lse, ks, N, keep=keep, backend="triton"))
    return 1 if bad else 0


# ----------------------------------------------------------------------------- tests, tune, bench


def pytest_stage(args: list, log: str = "tests.log", prefix: str = "") -> Callable:
    def fn(check: Check, limit: float) -> tuple:
        cmd = [check.python, "-m", "pytest", *args, "-q", "-ra", "-p", "no:cacheprovider", "--durations=10"]
        rc, _, tail = check.run_cmd(cmd, log=log, limit=limit, prefix=prefix or "pytest")
        return pytest_outcome(rc, tail)

    return fn


GPU_TEST_FILES = ["tests/test_triton_attention.py", "tests/test_triton_capture.py", "tests/test_triton_metrics.py"]


def stage_gpu_tests(check: Check, limit: float) -> tuple:
    # Kernel files first (pytest drops the duplicates of the trailing folder).
    return pytest_stage([*GPU_TEST_FILES, "tests", "-m", "gpu and not cuda_ext"], prefix="gpu-tests")(check, limit)


def stage_cuda_tests(check: Check, limit: float) -> tuple:
    t = time.monotonic()
    build = check.join_background("cuda-build", limit - 20.0)
    if build is None:
        return "skipped", f"the extension build was still running after waiting {time.monotonic() - t:.0f} s"
    if build.status != "ok":
        return "skipped", f"no CUDA extension: cuda-build {build.status}: {build.reason}"
    left = limit - (time.monotonic() - t)
    return pytest_stage(["tests", "-m", "cuda_ext and not slow"], prefix="cuda-tests")(check, left)


def stage_sanitizer(check: Check, limit: float) -> tuple:
    build = check.join_background("cuda-build", 0.0)
    if build is None or build.status != "ok":
        return "skipped", "no CUDA extension built"
    if not check.env.get("compute_sanitizer"):
        return "skipped", "compute-sanitizer not found"
    return pytest_stage(["tests/test_cuda_ops.py", "-m", "slow", "-k", "sanitizer"], prefix="sanitizer")(check, limit)


def stage_more_tests(check: Check, limit: float) -> tuple:
    return pytest_stage([*GPU_TEST_FILES, "tests/test_dispatch.py", "tests/test_cuda_dispatch.py", "-m",
                         "not gpu and not cuda_ext and not slow"], prefix="more-tests")(check, limit)


def stage_tune(check: Check, limit: float) -> tuple:
    tune = HERE / "tune.py"
    if not tune.exists():
        return "skipped", "bench/tune.py does not exist in this tree"
    rc, _, help_text = check.run_cmd([check.python, str(tune), "--help"], log="bench.log", limit=min(30.0, limit / 3),
                                     prefix="tune")
    args = []
    if rc == 0 and "--out" in help_text:
        args += ["--out", str(check.out / "tune.json")]
    if rc == 0 and "--time-limit" in help_text:
        args += ["--time-limit", str(int(max(limit - 40, 10)))]
    rc, secs, tail = check.run_cmd([check.python, str(tune), *args], log="bench.log",
                                   limit=max(limit - 30.0, 5.0), prefix="tune")
    if rc is None:
        return "timeout", "tune.py killed at its limit"
    return ("ok" if rc == 0 else "failed"), f"tune.py {' '.join(args) or '(no options)'}: status {rc}"


def bench_stage(files: list, prefix: str, pytest_args: tuple = ()) -> Callable:
    def fn(check: Check, limit: float) -> tuple:
        inner = max(limit - 30.0, 10.0)  # run.py interrupts pytest first and still writes the results
        cmd = [check.python, str(HERE / "run.py"), "--small", "--out", str(check.out), "--time-limit", f"{inner:.0f}",
               "--files", *files]
        if pytest_args:
            cmd += ["--", *pytest_args]
        if check.state.get("results_json"):
            cmd.insert(2, "--append")
        rc, _, tail = check.run_cmd(cmd, log="bench.log", limit=limit, prefix=prefix)
        m = re.search(r"wrote (\S+)\.json and \S+ \((\d+) rows, (\d+) skipped", tail)
        if m:
            check.state["results_json"] = m.group(1) + ".json"
        rows = f"{m.group(2)} rows, {m.group(3)} skipped or failed" if m else "no results written"
        if rc is None:
            return "timeout", f"killed at its limit; {rows}"
        if rc == 124:
            return "partial", f"stopped at its time limit, finished rows kept; {rows}"
        return ("ok" if rc == 0 else "failed"), f"run.py status {rc}; {rows}"

    return fn


def default_stages() -> tuple:
    """(the background build stage, the sequence after ``env``)."""
    build = Stage("cuda-build", 240, stage_cuda_build, describe="CUDA extension for this GPU only")
    seq = [
        Stage("triton-warmup", 90, stage_warmup, describe="Triton kernels compiled in parallel"),
        Stage("gpu-tests", 115, stage_gpu_tests, describe='pytest -m "gpu and not cuda_ext"'),
        Stage("cuda-tests", 60, stage_cuda_tests, describe='pytest -m "cuda_ext and not slow"'),
        Stage("tune", 40, stage_tune, describe="bench/tune.py"),
        Stage("bench-kernels", 75, bench_stage(["bench_attention.py", "bench_metrics.py", "bench_cuda.py"],
                                               "bench-kernels"), describe="kernel benchmarks, reduced shapes",
              extend=True),
        Stage("bench-model", 100, bench_stage(["bench_model.py"], "bench-model"),
              describe="model benchmarks, 7B-shaped LLaVA B=1", extend=True),
        Stage("sanitizer", 90, stage_sanitizer, min_left=45, describe="compute-sanitizer memcheck"),
        Stage("more-tests", 120, stage_more_tests, min_left=40, describe="other Triton tests on the GPU"),
    ]
    return build, seq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=str(ROOT / "out" / "gpu-check"), help="output folder (at most 8 files)")
    p.add_argument("--dry-run", action="store_true", help="probe the environment only; skip every GPU stage")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET, help="total seconds (default %(default)s)")
    p.add_argument("--warmup-worker", nargs=2, type=int, metavar=("I", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup_worker:
        return warmup_worker(*args.warmup_worker)
    check = Check(Path(args.out), budget=args.budget, dry_run=args.dry_run)
    build, seq = default_stages()
    check.run_stage(Stage("env", 40, stage_env, needs_gpu=False, describe="environment and GPU"))
    check.start_background(build)
    rc = check.run_all(seq)
    print("\n" + (check.out / "summary.md").read_text(), flush=True)  # the end of the output is what comes back
    print(f"gpu-check: wrote {', '.join(check.files())} into {check.out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
