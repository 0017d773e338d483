"""Typed configuration: TOML files, ``key=value`` overrides, and one-line errors.

Every config in gonogo is a pydantic model with ``extra="forbid"``, so a misspelt key is an
error that names the key and lists the allowed ones, not a silently ignored setting.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from gonogo.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
PLANS_DIR = PACKAGE_DIR / "plans"

Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


def parse_scalar(text: str) -> Any:
    """A command-line value parsed as a TOML scalar; a bare word stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], source: str = "command line") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to nested dicts (a copy is returned)."""
    import copy

    result = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{source}: override {item!r} is not key=value (for example: train.steps=50)")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"{source}: override {item!r}: {part!r} is a value, not a table")
            node = child
        node[parts[-1]] = parse_scalar(raw.strip())
    return result


def _describe_allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The keys allowed at ``loc`` inside ``model``, for an 'extra key' error."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return ""
        annotation = fields[part].annotation
        # unwrap Optional[...] / list[...] / dict[str, X]
        for candidate in getattr(annotation, "__args__", ()) or (annotation,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                annotation = candidate
                break
        current = annotation
    fields = getattr(current, "model_fields", None)
    if not fields:
        return ""
    return ", ".join(sorted(fields))


def format_validation_error(error: ValidationError, source: str, model: type[BaseModel], data: Any = None) -> str:
    """The first problem of a pydantic error as one line: file, key, bad value, what is allowed."""
    first = error.errors()[0]
    loc = tuple(first.get("loc", ()))
    key = ".".join(str(part) for part in loc) or "(top level)"
    kind = first.get("type", "")
    bad = first.get("input")
    if kind == "extra_forbidden":
        allowed = _describe_allowed(model, loc)
        hint = f"; allowed keys: {allowed}" if allowed else ""
        message = f"{source}: unknown key {key!r}{hint}"
    elif kind == "missing":
        message = f"{source}: missing required key {key!r}"
    elif isinstance(bad, dict):
        # a check across a table's keys (a model validator): the message names the keys; the
        # whole table as the "value" would only bury it
        reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{source}: {reason}" if key == "(top level)" else f"{source}: in {key!r}: {reason}"
    else:
        reason = first.get("msg", "invalid value")
        message = f"{source}: key {key!r} has bad value {bad!r}: {reason}"
    extra = len(error.errors()) - 1
    if extra:
        message += f" (and {extra} more problem{'s' if extra > 1 else ''})"
    return message


def validate(model: type[Model], data: dict[str, Any], source: str) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UserError(format_validation_error(error, source, model, data)) from None


def resolve_preset(name_or_path: str | Path, directory: Path = CONFIGS_DIR, what: str = "preset") -> Path:
    """A preset word (``tiny-dense``) or a TOML path, as a path that exists."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists() or "/" in str(name_or_path):
        if not candidate.is_file():
            raise UserError(f"{candidate}: no such {what} file")
        return candidate
    builtin = directory / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    known = ", ".join(sorted(p.stem for p in directory.glob("*.toml")))
    raise UserError(f"unknown {what} {str(name_or_path)!r}; built-in {what}s: {known} (or give a path to a .toml file)")
