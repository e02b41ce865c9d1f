"""Run transformers' own LLaVA and Qwen2-VL model tests unpatched, then with
``vgkernels.patch_model(capture="all")`` on every model they build, and compare.

    python tests/peer/run.py [--tf .venv-tf524] [--files llava,qwen2_vl] [--out build/peer]

The suite is ``shared/peer/transformers`` (its README says how it runs); it is found
beside the repository, as CI lays it out (``<repo>/../shared``), or at
``$VGKERNELS_PEER_DIR``. A missing suite is a failure, never a skip.

For each test file: a fresh copy of the suite under ``OUT/tf-<version>/`` (with
``src/transformers`` linked to the transformers under test), one pytest session
unpatched and one with ``-p vgpatch_plugin`` (tests/peer/vgpatch_plugin.py), each with a
junit XML, a log and its wall time; then ``compare.py``. Exit status 1 when the
unpatched run fails, when a test that passed unpatched does not pass patched (except
the ``--allow`` list, reported), or when the plugin counted no patched instance, no
vgkernels kernel call or no capture.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compare  # noqa: E402

FILES = {
    "llava": "tests/models/llava/test_modeling_llava.py",
    "qwen2_vl": "tests/models/qwen2_vl/test_modeling_qwen2_vl.py",
}
# Allowed to differ (issue 10): the test checks every attention module's config for the
# implementation the model was switched to, which a per-layer config copy changes.
ALLOW = ["test_attn_implementation_composite_models"]


def peer_dir(arg) -> str:
    path = arg or os.environ.get("VGKERNELS_PEER_DIR") or os.path.join(REPO, "..", "shared", "peer", "transformers")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "tests", "test_modeling_common.py")):
        raise SystemExit(
            f"FAIL: transformers' own model tests not found at {path} (expected tests/test_modeling_common.py there). "
            "CI lays shared/ beside the repository (<repo>/../shared/peer/transformers); elsewhere set "
            "VGKERNELS_PEER_DIR to that folder."
        )
    return path


def run_env(tf_dir, plugin: bool) -> dict:
    env = dict(os.environ)
    paths = ([os.path.abspath(tf_dir)] if tf_dir else []) + ([HERE] if plugin else [])
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false")
    return env


def transformers_location(tf_dir) -> tuple[str, str]:
    code = "import os, transformers; print(transformers.__version__); print(os.path.dirname(transformers.__file__))"
    out = subprocess.run([sys.executable, "-c", code], env=run_env(tf_dir, False), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"FAIL: cannot import transformers (PYTHONPATH first: {tf_dir}):\n{out.stderr}")
    version, path = out.stdout.split()
    return version, path


def prepare(src: str, dst: str, tf_path: str) -> None:
    """A writable copy of the suite with ``src/transformers`` pointing at the package under test."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    skip = lambda d, names: [n for n in names if n == "__pycache__" or (d == src and n == "src")]
    shutil.copytree(src, dst, ignore=skip)
    for root, dirs, files in os.walk(dst):  # shared/ is read-only in CI
        for n in dirs + files:
            p = os.path.join(root, n)
            os.chmod(p, os.stat(p).st_mode | 0o200)
    os.makedirs(os.path.join(dst, "src"), exist_ok=True)
    os.symlink(tf_path, os.path.join(dst, "src", "transformers"))


def pytest_run(suite: str, test_file: str, tf_dir, plugin: bool, stem: str, timeout: int) -> dict:
    xml, log, js = stem + ".xml", stem + ".log", stem + ".json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--timeout={timeout}",
           "-k", "not Integration", test_file, f"--junitxml={xml}"]
    if plugin:
        cmd += ["-p", "vgpatch_plugin", f"--vgpatch-json={js}"]
    for p in (xml, js):
        if os.path.exists(p):
            os.remove(p)
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=suite, env=run_env(tf_dir, plugin), stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    with open(log) as f:
        lines = [l.rstrip() for l in f if l.strip()]
    summary = next((l for l in reversed(lines) if " in " in l and ("passed" in l or "failed" in l or "error" in l)),
                   lines[-1] if lines else "(no output)")
    counts = None
    if plugin and os.path.exists(js):
        with open(js) as f:
            counts = json.load(f)
    return {"rc": rc, "wall_s": round(wall, 1), "xml": xml, "log": log, "summary": summary.strip("= "),
            "counts": counts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tf", default=None, help="folder put first on PYTHONPATH that holds the transformers under test")
    ap.add_argument("--files", default=",".join(FILES), help=f"comma-separated, of {list(FILES)}")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "peer"))
    ap.add_argument("--peer", default=None, help="the suite's folder (default: <repo>/../shared/peer/transformers)")
    ap.add_argument("--timeout", type=int, default=300, help="per-test timeout, seconds (pytest-timeout)")
    a = ap.parse_args(argv)

    src = peer_dir(a.peer)
    version, tf_path = transformers_location(a.tf)
    work = os.path.join(os.path.abspath(a.out), f"tf-{version}")
    suite = os.path.join(work, "transformers")
    results = os.path.join(work, "results")
    prepare(src, suite, tf_path)
    os.makedirs(results, exist_ok=True)
    print(f"peer suite {src} on transformers {version} ({tf_path}); results in {results}", flush=True)

    problems, table = [], []
    for key in a.files.split(","):
        if key not in FILES:
            raise SystemExit(f"--files: unknown {key!r}; expected some of {list(FILES)}")
        runs = {}
        for mode in ("unpatched", "patched"):
            r = pytest_run(suite, FILES[key], a.tf, mode == "patched", os.path.join(results, f"{key}-{mode}"), a.timeout)
            runs[mode] = r
            print(f"[{key}@{version}] {mode}: {r['wall_s']:.0f} s, pytest rc {r['rc']}: {r['summary']}", flush=True)
        u, p = runs["unpatched"], runs["patched"]
        if u["rc"] != 0:
            problems.append(f"{key}: the unpatched run failed (rc {u['rc']}, see {u['log']})")
        if not (os.path.exists(u["xml"]) and os.path.exists(p["xml"])):
            problems.append(f"{key}: a run wrote no junit XML (see {u['log']}, {p['log']})")
            continue
        c = p["counts"]
        if c is None:
            problems.append(f"{key}: the patched run wrote no vgpatch counts (see {p['log']})")
        else:
            print(f"[{key}@{version}] vgpatch: {c['patched']} instances patched in {c['tests_patched']} tests; "
                  f"{c['calls']} vgkernels kernel calls {c['op_calls']}, {c['captures']} captures; vgkernels ran in "
                  f"{c['tests_vgkernels']} tests; left alone: {c['refused']} {c['refused_classes'] or ''}", flush=True)
            if c["error_messages"]:
                print(f"[{key}@{version}] patch_model raised on construction: {c['error_messages']}")
            if c["failed_because"]:
                problems.append(f"{key}: vgpatch: " + "; ".join(c["failed_because"]))
        cmp = compare.compare(compare.load_junit(u["xml"]), compare.load_junit(p["xml"]), ALLOW)
        compare.report(cmp, f"{key}@{version}")
        if not cmp.ok:
            problems.append(f"{key}: {len(cmp.regressions)} tests passed unpatched but not patched")
        table.append((key, u["wall_s"], p["wall_s"]))

    with open(os.path.join(work, "timings.json"), "w") as f:
        json.dump({"transformers": version, "runs": [dict(zip(("file", "unpatched_s", "patched_s"), t)) for t in table]},
                  f, indent=1)
    print(f"timings (wall, s) on transformers {version}: " +
          "; ".join(f"{k}: unpatched {u:.0f}, patched {p:.0f}" for k, u, p in table))
    if problems:
        print("PEER SUITE FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("peer suite: every test that passed unpatched passed patched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
