"""``vgkernels`` command line: ``python -m vgkernels <command> ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only routes, so commands load their dependencies
(transformers, matplotlib) only when used.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "quickstart": ("vgkernels.quickstart", "run the kernels on random tensors and print what they return"),
    "sweep": ("vgkernels.sweep.command", "grounding metrics (AR/KL/JS per layer and head) of a model over a dataset"),
    "heads": ("vgkernels.sweep.heads", "rank attention heads of a finished sweep by mean KL, write heads.json"),
    "report": ("vgkernels.sweep.report", "redraw the tables and plots of a finished sweep"),
    "demo": ("vgkernels.sweep.demo", "generate coloured shapes on noise with boxes and sweep tiny-grounded, a tiny model "
                                     "with planted grounding heads, over it (under a minute on 2 CPU cores)"),
    "refine": ("vgkernels.refine.cli", "closed-ended VQA accuracy with and without VGRefine, with K/p/layer sweeps"),
}
DEFAULT_COMMAND = "demo"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vgkernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    if not argv:
        argv = [DEFAULT_COMMAND]
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
