"""``gonogo <kind>``: one stage kind from the command line, through the plan runner.

The flags come from the kind's settings model (``--micro-batch-size`` for ``micro_batch_size``),
or from the kind's ``StageCommand.add_arguments`` where a flag is not a setting. The command
validates the settings, builds a one-stage plan in memory and runs it with
``gonogo.runner.run_stage_alone``: the same run directory, gates (the kind's default gates),
report and exit codes as ``gonogo run`` (GO 0, NO-GO 1, interrupted 130, a user's mistake 2).
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic.fields import FieldInfo

from gonogo.errors import UserError
from gonogo.stages.base import StageCommand, StageKind, StageSettings


class IntermixedParser(argparse.ArgumentParser):
    """Lets positionals (``key=value`` overrides) follow the options (``train tiny --nproc 2 a=1``).

    Plain argparse takes all positionals in one go, before ``--nproc``; the standard library's
    intermixed parsing collects them around the options instead.
    """

    _parsing_options = False

    def parse_known_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                         namespace: Optional[argparse.Namespace] = None) -> tuple[argparse.Namespace, list[str]]:
        if self._parsing_options:  # the inner call parse_known_intermixed_args makes
            return super().parse_known_args(args, namespace)
        self._parsing_options = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing_options = False


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _scalar(annotation: Any) -> Optional[type]:
    """int / float / str / bool of a settings field (through Optional), or None for anything else."""
    if annotation in (int, float, str, bool):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        return type(values[0]) if values and all(type(v) is type(values[0]) for v in values) else None
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _scalar(inner[0]) if len(inner) == 1 else None
    return None


def _list_item(annotation: Any) -> Optional[type]:
    """The scalar item type of a ``list[...]`` field (through Optional), or None."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation) or (str,)
        return _scalar(item)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _list_item(inner[0]) if len(inner) == 1 else None
    return None


def _describe(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    return f"(default: {default})" if default is not None else ""


def derive_arguments(settings: type[StageSettings], parser: argparse.ArgumentParser) -> None:
    """One flag per settings field a command line can say: scalars, and lists as ``a,b,c``.
    A field with a required value is a required flag. Nested tables stay plan-only."""
    for name, field in settings.model_fields.items():
        kind, item = _scalar(field.annotation), _list_item(field.annotation)
        required = field.is_required()
        if kind is bool:
            parser.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=_describe(field))
        elif kind is not None:
            parser.add_argument(flag_name(name), dest=name, type=kind, default=None, required=required,
                                metavar=name.upper(), help=_describe(field))
        elif item is not None:
            parser.add_argument(flag_name(name), dest=name, type=_comma_list(item), default=None, required=required,
                                metavar=f"{name.upper()},..", help=_describe(field))


def _comma_list(item: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [item(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {item.__name__} values separated by commas") from None
    return parse


def derived_settings(settings: type[StageSettings], args: argparse.Namespace) -> dict[str, Any]:
    """The settings table from derived flags: only the flags given (the model fills in defaults)."""
    return {name: getattr(args, name) for name in settings.model_fields if getattr(args, name, None) is not None}


def _command(kind: StageKind) -> StageCommand:
    return kind.command or StageCommand()


def add_arguments(parser: argparse.ArgumentParser, kind_name: str) -> None:
    from gonogo.stages import get_kind

    kind = get_kind(kind_name)
    command = _command(kind)
    if command.add_arguments is not None:
        command.add_arguments(parser)  # hand-written: its own --out where it runs a stage
        return
    derive_arguments(kind.settings, parser)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a new folder under runs/)")


def command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gonogo.typed_config import validate
    from gonogo.plan_cli import LiveView, print_outcome
    from gonogo.runner import run_stage_alone
    from gonogo.stages import get_kind

    kind = get_kind(args.command)
    command = _command(kind)
    code = command.instead(args)
    if code is not None:
        return code
    data = command.settings(args) if command.settings is not None else derived_settings(kind.settings, args)
    settings = validate(kind.settings, data, f"gonogo {kind.name}")
    if getattr(args, "out", None) is not None:
        from gonogo.files import check_output_dir

        check_output_dir(args.out)  # before the kind's checks, some of which hash a whole model
    command.check(args, settings)
    run_dir = command.continue_run(args, settings)
    console = Console(stderr=True)
    with LiveView(console) as view:
        outcome = run_stage_alone(kind, settings, out=getattr(args, "out", None), run_dir=run_dir, observer=view,
                                  gates=None if command.gates is None else command.gates(args),
                                  resume_hint=command.resume_hint)
    record = outcome.run_dir.read_state().get("stages", {}).get(kind.name, {})
    if outcome.verdict == "INTERRUPTED":
        raise KeyboardInterrupt  # the CLI says so in one line and exits 130
    if record.get("user_error"):
        raise UserError(record.get("reason", "invalid input"))
    stage_dir = outcome.run_dir.stage_dir(kind.name, create=False)
    metrics_path = stage_dir / "metrics.json"
    if command.summary is not None and metrics_path.is_file() and record.get("status") != "error":
        import json

        command.summary(args, stage_dir, json.loads(metrics_path.read_text(encoding="utf-8")))
    print_outcome(console, outcome)
    return outcome.exit_code
