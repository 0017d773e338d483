"""The command line: parses, then calls one function per command.

Two kinds of command: every stage kind of ``gonogo.stages`` is one (``gonogo train``, ``gonogo
eval``, ...; its flags come from its settings and it runs through the plan runner, see
``gonogo.stage_cli``), and the commands below that are not a stage each live in the module that
does their job, which exposes ``add_arguments(parser)`` and ``command(args) -> int``. This file
only lists them, turns a ``UserError`` into one line and exit code 2, and sets up logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from typing import Optional, Sequence

from gonogo import __version__
from gonogo.errors import UserError
from gonogo.stages import command_help

STAGE_CLI = "gonogo.stage_cli"
# command -> (module, one-line help): the commands that are not a stage kind
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("gonogo.plan_cli", "run a plan stage by stage with go/no-go gates (default: the built-in laptop plan)"),
    "launch": ("gonogo.cluster.launch", "write a Slurm batch script or Kubernetes manifests that run the same job with torchrun"),
    "report": ("gonogo.report.build", "re-render summary.json and report.html of a run directory"),
    "engine": ("gonogo.infer.engines.install", "install a serving engine (vLLM) into its own venv; which engines are ready"),
    "tokenizer": ("gonogo.data.tokenizer_train", "train a byte-level BPE tokenizer on your text (for [data] tokenizer)"),
    "export": ("gonogo.export.hf", "export a checkpoint to Hugging Face format (an imported model goes back to its own architecture)"),
}


def all_commands() -> dict[str, tuple[str, str]]:
    """Every command: the plan and tool commands, then one per stage kind that has a command."""
    stage_commands = {name: (STAGE_CLI, help_text) for name, help_text in command_help().items()}
    assert not set(stage_commands) & set(COMMANDS), "a stage kind and a command share a name"
    return {**COMMANDS, **stage_commands}


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the selected command's module is imported (fast start, no torch for --help)."""
    parser = argparse.ArgumentParser(
        prog="gonogo",
        description="Prove an LLM training and serving stack end to end, with a go/no-go gate per stage.")
    parser.add_argument("--version", action="version", version=f"gonogo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in all_commands().items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if name != selected:
            continue
        if module_name == STAGE_CLI:
            from gonogo import stage_cli

            stage_cli.add_arguments(sub, name)
        else:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in all_commands() else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # `gonogo run PLAN --out DIR name=value`: plan parameters may follow the options too
        if isinstance(getattr(args, "parameters", None), list) and not any(word.startswith("-") for word in unknown):
            args.parameters += unknown
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.command:
        parser.print_help()
        return 2
    # SIGTERM stops a command like Ctrl-C does: child process groups are stopped on the way out
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).command(args) or 0)
    except UserError as error:
        print(f"gonogo {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"gonogo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
