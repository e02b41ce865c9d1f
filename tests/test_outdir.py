"""Output folders are never shared, corrupted or deleted when they are not ours:
exclusive locks (held by real processes, released by the kernel when one dies),
ownership markers for --overwrite and demo --out, and no settings file before validation."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sweep_fake import small_manifest, subprocess_env, sweep_cmd
from vgkernels.cli import main

try:
    from vgkernels import outdir
except ImportError:  # a version without output locks: the tests below fail, each for its reason
    outdir = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A process that takes the output lock the way a command does, says so, and waits.
HOLDER = """
import os, sys, time
out, rank = sys.argv[1], int(sys.argv[2])
sys.argv = ["vgkernels", "sweep", "--out", out]
from vgkernels import outdir
if rank == 0:
    lock = outdir.claim(out, "sweep")
else:
    os.makedirs(out, exist_ok=True)
    lock = outdir.OutputLock(out, rank).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def _hold(out, rank=0):
    """Start a holder process; returns it once it holds the lock."""
    args = [sys.executable, "-c", HOLDER, str(out), str(rank)]
    p = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    line = p.stdout.readline().decode()
    assert line.strip() == "locked", p.stderr.read().decode()
    return p


def _stop(p, sig=signal.SIGTERM):
    p.send_signal(sig)
    p.wait(timeout=30)
    p.stdout.close()
    p.stderr.close()


def test_second_run_on_a_locked_folder_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        with pytest.raises(outdir.OutputLocked, match=f"pid {holder.pid} on ") as e:
            outdir.claim(str(out), "sweep")
        assert "vgkernels sweep --out" in str(e.value)  # the holder's command
        # The commands: exit 1 before anything is loaded, one line naming the holder.
        data = tmp_path / "d.jsonl"
        data.write_text("")
        t0 = time.perf_counter()
        assert main(["sweep", "--data", str(data), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
        assert main(["refine", "--demo", "2", "--out", str(out)]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        # nor do heads and report read or write a folder while a run holds it
        for argv in (["heads", "--sweep", str(out)], ["report", "--sweep", str(out)]):
            assert main(argv) == 1
            assert f"pid {holder.pid}" in capsys.readouterr().err
        assert time.perf_counter() - t0 < 20  # no model was loaded
        assert not (out / "meta.json").exists() and not (out / "run.json").exists()
    finally:
        _stop(holder)
    # released with its process: the folder is usable again
    outdir.claim(str(out), "sweep").release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    holder = _hold(out)
    _stop(holder, signal.SIGKILL)
    # the holder's text is still in the lock file, but the kernel released the lock
    assert json.loads((out / outdir.LOCK).read_text())["pid"] == holder.pid
    lock = outdir.claim(str(out), "sweep")
    assert lock.held
    assert json.loads((out / outdir.LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_locks_are_per_rank_and_reentrant_in_one_process(tmp_path):
    out = tmp_path / "out"
    holder = _hold(out, rank=1)  # rank 1 of a torchrun run
    try:
        with outdir.claim(str(out), "sweep"):  # rank 0's lock is a different file
            with pytest.raises(outdir.OutputLocked, match=f"pid {holder.pid}"):
                outdir.OutputLock(str(out), rank=1).acquire()
            # the CLI locks before loading the model, then the Python API locks again
            inner = outdir.claim(str(out), "sweep")
            inner.release()
            assert outdir.OutputLock._held  # still held by the outer lock
        assert not outdir.OutputLock._held
    finally:
        _stop(holder)


def test_two_cli_sweeps_on_one_folder_one_is_refused(tmp_path):
    """The issue's scenario with real commands: the second sweep exits non-zero at once."""
    data = small_manifest(tmp_path, 6)
    out = tmp_path / "out"
    cmd = sweep_cmd(data, out, "--no-report", "--batch-size", "3")
    env = subprocess_env()
    index = out / "shards" / "index.r0.jsonl"
    # the first sweep writes a batch, then waits long enough for the second to start
    first = subprocess.Popen(cmd + ["--throttle", "300"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, cwd=str(tmp_path))
    try:
        deadline = time.time() + 200
        while (not index.exists() or index.read_bytes().count(b"\n") < 3) and time.time() < deadline \
                and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stdout.read().decode()
        second = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
                                timeout=200)
        assert second.returncode == 1, second.stdout.decode() + second.stderr.decode()
        assert f"in use by pid {first.pid}" in second.stderr.decode()
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    rows = [json.loads(t) for t in open(index)]
    assert [r["row"] for r in rows] == [0, 1, 2] and len({r["sid"] for r in rows}) == 3


# ----------------------------------------------------------------------------- ownership


def test_overwrite_deletes_only_folders_this_tool_created(tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    data = tmp_path / "d.jsonl"
    data.write_text("")
    assert main(["sweep", "--data", str(data), "--out", str(mine), "--overwrite"]) == 2
    assert "refusing to delete" in capsys.readouterr().err
    assert main(["refine", "--demo", "2", "--out", str(mine), "--overwrite"]) == 2
    assert main(["demo", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "demo --out" in err and "refusing to delete" in err
    # nor is anything written into it without --overwrite
    assert main(["sweep", "--data", str(data), "--out", str(mine)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "three years of work"
    # a folder of ours is emptied (but for its lock), a new one created
    ours = tmp_path / "ours"
    outdir.claim(str(ours), "sweep").release()
    (ours / "old.txt").write_text("x")
    with outdir.claim(str(ours), "sweep", overwrite=True):
        assert sorted(os.listdir(ours)) == sorted([outdir.MARKER, outdir.LOCK])
    # a sweep folder of an earlier version (meta.json, no marker) counts as ours
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "meta.json").write_text(json.dumps({"format_version": 1, "fingerprint": {}}))
    assert outdir.ownership(str(legacy)) == "ours"
    demo = tmp_path / "old-demo"  # runs/demo of an earlier version: make demo must still recreate it
    (demo / "data").mkdir(parents=True)
    (demo / "sweep").mkdir()
    (demo / "sweep" / "meta.json").write_text(json.dumps({"format_version": 1, "fingerprint": {}}))
    assert outdir.ownership(str(demo)) == "ours"
    (demo / "notes.txt").write_text("mine")
    assert outdir.ownership(str(demo)) == "foreign"
    assert outdir.ownership(str(tmp_path / "absent")) == "absent"


def test_demo_recreates_only_its_own_folder(tmp_path, monkeypatch):
    from vgkernels.sweep import command, heads, report

    ran = []
    monkeypatch.setattr(command, "run", lambda a: ran.append(a.out))
    monkeypatch.setattr(heads, "run", lambda a: 0)
    monkeypatch.setattr(report, "write_report", lambda *a, **k: {"text": "", "paths": {}})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "2", "--no-progress", "--model", "tiny-llava"]) == 0
    (out / "stale.txt").write_text("from last time")
    assert main(["demo", "--out", str(out), "--n", "2", "--no-progress", "--model", "tiny-llava"]) == 0
    assert not (out / "stale.txt").exists() and (out / "data" / "questions.jsonl").exists()
    assert ran == [str(out / "sweep")] * 2
