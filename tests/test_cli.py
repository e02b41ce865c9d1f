"""The command line as a user meets it: one-line errors and exit codes, --debug,
Ctrl-C, --version, --quiet / --verbose, help text for every option."""
import argparse
import os
import signal
import subprocess
import time

import pytest

from sweep_fake import fake_sweep, small_manifest, subprocess_env, sweep_cmd
from vgkernels import __version__
from vgkernels.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _walk(parser, name="vgkernels"):
    yield name, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, p in a.choices.items():
                yield from _walk(p, f"{name} {sub}")


def test_every_option_of_every_command_has_help_text():
    from vgkernels.cli import build_parser

    missing, seen = [], 0
    for name, p in _walk(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            seen += 1
            # argparse.SUPPRESS marks a deliberately hidden option (a test hook)
            if not a.help or not str(a.help).strip():
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert seen > 60 and not missing, missing


def test_top_level_help_says_no_command_runs_the_demo_and_agrees_with_readme(capsys):
    from vgkernels.sweep.demo import DEMO_DURATION

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Without a COMMAND, `python -m vgkernels` runs `demo`" in text and DEMO_DURATION in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert DEMO_DURATION in " ".join(capsys.readouterr().out.split())
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    make_demo = readme[readme.index("`make demo` runs"):][:1200]
    assert DEMO_DURATION in make_demo, "README's `make demo` paragraph must say how long the demo takes"
    assert "It takes seconds" not in readme


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vgkernels {__version__}"


def test_errors_are_one_line_with_exit_codes_and_debug_tracebacks(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nowhere.jsonl")
    # a value that cannot work: exit 2, one line, before any model is loaded
    assert main(["sweep", "--data", missing, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vgkernels sweep: error: --data: {missing!r} does not exist"
    # --debug, before or after the command name, adds the traceback
    for argv in (["--debug", "sweep", "--data", missing, "--out", str(tmp_path / "o")],
                 ["sweep", "--data", missing, "--out", str(tmp_path / "o"), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "UsageError" in err
    # argparse's own usage errors: exit 2
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("vgkernels sweep: error: the following arguments are required: --data "
                                               "(see vgkernels sweep --help)")
    # a run that fails: exit 1, the error in one line, a hint about --debug
    from vgkernels.sweep import heads

    def boom(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nsecond line")

    monkeypatch.setattr(heads, "run", boom)
    assert main(["heads", "--sweep", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("vgkernels heads: error: RuntimeError: CUDA error: an illegal memory access was encountered "
                   "second line (--debug shows the traceback)")
    # Ctrl-C
    monkeypatch.setattr(heads, "run", lambda a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["heads", "--sweep", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "vgkernels heads: interrupted; rerun the same command to resume"


def test_quiet_and_verbose_set_the_logging_level(tmp_path, capsys):
    import logging

    logger = logging.getLogger("vgkernels")

    fake_sweep(tmp_path / "s")
    try:
        assert main(["heads", "--sweep", str(tmp_path / "s"), "--top-k", "3"]) == 0
        out = capsys.readouterr().out
        assert "top 3 heads" in out and logger.level == logging.INFO
        assert main(["--quiet", "heads", "--sweep", str(tmp_path / "s"), "--top-k", "3"]) == 0
        assert capsys.readouterr().out == "" and logger.level == logging.WARNING
        assert main(["heads", "-v", "--sweep", str(tmp_path / "s"), "--top-k", "3"]) == 0
        assert logger.level == logging.DEBUG
        with pytest.raises(SystemExit):
            main(["heads", "-q", "-v", "--sweep", str(tmp_path / "s")])  # exclusive
    finally:
        logger.setLevel(logging.INFO)


def test_ctrl_c_in_a_real_sweep_ends_with_the_resume_hint(tmp_path):
    data = small_manifest(tmp_path, 4)
    out = tmp_path / "out"
    cmd = sweep_cmd(data, out, "--batch-size", "2", "--throttle", "300")
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=str(tmp_path))
    index = out / "shards" / "index.r0.jsonl"
    deadline = time.time() + 200
    while (not index.exists() or index.read_bytes().count(b"\n") < 2) and time.time() < deadline \
            and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read().decode()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "vgkernels sweep: interrupted; rerun the same command to resume"
    assert "Traceback" not in err
