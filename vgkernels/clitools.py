"""What every ``vgkernels`` command shares: errors, exit codes, logging, common options.

Exit codes: 0 success; 1 a run that failed (:class:`RunError` or any other exception);
2 a usage error (argparse's own, or :class:`UsageError`: a value that names something
that does not exist or does not fit); 130 interrupted (Ctrl-C). An error is printed as
one line, ``vgkernels COMMAND: error: ...``; ``--debug`` adds the traceback.

Console output goes through the ``vgkernels`` logger: ``--quiet`` keeps warnings and
errors only (and hides progress bars), ``--verbose`` adds debug lines.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
INTERRUPTED = "interrupted; rerun the same command to resume"

logger = logging.getLogger("vgkernels")


class UsageError(ValueError):
    """A command-line value that cannot work (exit 2): a missing file or folder, a
    field or layer that does not exist, settings that contradict each other."""


class RunError(RuntimeError):
    """A run that cannot go on (exit 1): its output folder is in use, nothing could be
    computed, too many samples failed."""


def at_least(lo: int):
    """An argparse ``type``: an integer ``>= lo`` (argparse reports a bad one: exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


DTYPES = ("auto", "float16", "bfloat16", "float32")


def check_model_options(args) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--vision-tower`` checked before any
    model is loaded (:class:`UsageError`, exit 2): what the loader would refuse after
    minutes of loading, refused at once."""
    import torch

    from vgkernels.integrations.loaders import check_model

    device = getattr(args, "device", None)
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    vt = getattr(args, "vision_tower", None)
    if vt is not None and not os.path.isdir(vt):
        raise UsageError(f"--vision-tower: {vt!r} is not a folder")
    try:
        check_model(args.model, vision_tower=vt)
    except ValueError as e:
        raise UsageError(f"--{e}" if str(e).startswith("model: ") else str(e)) from None


class _ConsoleHandler(logging.Handler):
    """INFO and DEBUG to stdout, warnings and errors to stderr; the streams are looked
    up at each record, so redirected or captured streams are honoured."""

    def emit(self, record):
        try:
            msg = self.format(record)
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(msg + "\n")
            stream.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def _install_handler() -> None:
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        h = _ConsoleHandler()
        h.setFormatter(_Format())
        logger.addHandler(h)
        logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


_install_handler()


def set_verbosity(quiet: bool = False, verbose: bool = False) -> int:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logger.setLevel(level)
    return level


def quiet() -> bool:
    """True when info lines (and progress bars) are switched off."""
    return not logger.isEnabledFor(logging.INFO)


def add_common_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--debug``, ``--quiet``, ``--verbose``. With ``suppress`` (the sub-commands' copy)
    an option not given leaves the top-level parser's value alone, so the options work
    before or after the command name."""
    d = argparse.SUPPRESS if suppress else False
    g = parser.add_argument_group("output")
    g.add_argument("--debug", action="store_true", default=d,
                   help="on an error, print the full traceback instead of one line")
    v = g.add_mutually_exclusive_group()
    v.add_argument("-q", "--quiet", action="store_true", default=d,
                   help="print only warnings and errors (no progress bars or tables)")
    v.add_argument("-v", "--verbose", action="store_true", default=d,
                   help="print debug lines as well")


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (exit 2) pointing to ``--help``."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def run_command(fn, args, prog: str) -> int:
    """Run ``fn(args)`` and turn what it raises into one line and an exit code."""
    debug = bool(getattr(args, "debug", False))
    set_verbosity(bool(getattr(args, "quiet", False)), bool(getattr(args, "verbose", False)))
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"\n{prog}: {INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(str(e.code))}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - every error ends as one line
        if debug:
            traceback.print_exc()
        code = EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILED
        text = str(e) if isinstance(e, (UsageError, RunError)) else f"{type(e).__name__}: {e}"
        hint = "" if debug else " (--debug shows the traceback)"
        if isinstance(e, UsageError):
            hint = ""
        print(f"{prog}: error: {_one_line(text)}{hint}", file=sys.stderr)
        return code


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def progress_enabled(args) -> bool:
    return not getattr(args, "no_progress", False) and not quiet()


__all__ = ["Parser", "UsageError", "at_least", "check_model_options", "DTYPES", "RunError", "logger", "run_command", "add_common_options", "set_verbosity", "quiet",
           "INTERRUPTED", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "progress_enabled"]
