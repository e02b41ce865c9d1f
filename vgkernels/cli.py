"""``vgkernels`` command line: ``python -m vgkernels <command> ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only routes, so commands load their dependencies
(transformers, matplotlib) only when used.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import clitools

COMMANDS = {
    "quickstart": ("vgkernels.quickstart", "run the kernels on random tensors and print what they return"),
    "sweep": ("vgkernels.sweep.command", "grounding metrics (AR/KL/JS per layer and head) of a model over a dataset"),
    "heads": ("vgkernels.sweep.heads", "rank attention heads of a finished sweep by mean KL, write heads.json"),
    "report": ("vgkernels.sweep.report", "redraw the tables and plots of a finished sweep"),
    "demo": ("vgkernels.sweep.demo", "generate coloured shapes on noise with boxes and sweep tiny-grounded, a tiny model "
                                     "with planted grounding heads, over it (the default command)"),
    "refine": ("vgkernels.refine.cli", "closed-ended VQA accuracy with and without VGRefine, with K/p/layer sweeps"),
}
DEFAULT_COMMAND = "demo"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .sweep.demo import DEMO_DURATION

    parser = clitools.Parser(
        prog="vgkernels", description=__doc__.splitlines()[0],
        epilog=f"Without a COMMAND, `python -m vgkernels` runs `{DEFAULT_COMMAND}` (= `vgkernels {DEFAULT_COMMAND} "
               f"--out runs/demo`, {DEMO_DURATION}). `vgkernels COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"vgkernels {__version__}",
                        help="print the version and exit")
    clitools.add_common_options(parser)
    common = clitools.Parser(add_help=False)
    clitools.add_common_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command (options only, or nothing): the demo
        args = parser.parse_args(argv + [DEFAULT_COMMAND])
    module = importlib.import_module(COMMANDS[args.command][0])
    return clitools.run_command(module.run, args, prog=f"vgkernels {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
