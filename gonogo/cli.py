"""The command line: parses, then calls one function per command.

Each command lives in the module that does its job; that module exposes
``add_arguments(parser)`` and ``command(args) -> int``. This file only lists them, turns a
``UserError`` into one line and exit code 2, and sets up logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from gonogo import __version__
from gonogo.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("gonogo.plan_cli", "run a plan stage by stage with go/no-go gates (default: the built-in laptop plan)"),
    "doctor": ("gonogo.cluster.doctor", "inventory and health: devices, versions, GPU health, storage speed"),
    "collectives": ("gonogo.cluster.collectives", "nccl-tests-style bandwidth and correctness table via torch.distributed"),
    "train": ("gonogo.train.stage", "distributed pretraining (FSDP2 / DDP / expert parallel) with torchrun, metrics, MFU, MLPerf log"),
    "launch": ("gonogo.cluster.launch", "write a Slurm batch script or Kubernetes manifests that run the same job with torchrun"),
    "report": ("gonogo.report.build", "re-render summary.json and report.html of a run directory"),
    "serve": ("gonogo.infer.server", "OpenAI-compatible server (completions, chat, streaming) for a checkpoint"),
}


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the selected command's module is imported (fast start, no torch for --help)."""
    parser = argparse.ArgumentParser(
        prog="gonogo",
        description="Prove an LLM training and serving stack end to end, with a go/no-go gate per stage.")
    parser.add_argument("--version", action="version", version=f"gonogo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if name == selected:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).command(args) or 0)
    except UserError as error:
        print(f"gonogo {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"gonogo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
