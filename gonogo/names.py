"""Checks on user strings that end up in a path, a generated script or a manifest.

Shell words are quoted with ``shlex``; what cannot be quoted (a ``#SBATCH`` line, a Kubernetes
name, a file name under ``runs/``, an environment variable's name) is checked here against what
that place allows, and refused in one line (``UserError``, exit 2) naming the field and the fix.
"""

from __future__ import annotations

import re

from gonogo.errors import UserError

# a file or directory name that stays where it is put: no separator, no control character, no
# leading dot ('.', '..', hidden); anything else (spaces included) is a legal, harmless name
_PATH_COMPONENT = re.compile(r"[^/\\\x00-\x1f\x7f.][^/\\\x00-\x1f\x7f]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_path_component(value: str, what: str) -> str:
    """A name used as one directory under a base folder (e.g. ``runs/<plan>-<time>``)."""
    if not _PATH_COMPONENT.fullmatch(value) or len(value) > 100:
        raise UserError(f"{what} {value!r} must be one plain name of at most 100 characters (no '/', '\\', "
                        f"newline or leading '.'), so the run stays under runs/")
    return value


def check_env_name(value: str, what: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise UserError(f"{what} {value!r} is not an environment variable name (letters, digits and '_', "
                        f"not starting with a digit)")
    return value


def check_dns_label(value: str, what: str) -> str:
    """A Kubernetes object name / namespace (RFC 1123 label); also safe unquoted in a shell word."""
    if not _DNS_LABEL.fullmatch(value):
        raise UserError(f"{what} {value!r} must be lower-case letters, digits and '-', at most 63, starting and "
                        f"ending with a letter or digit (a Kubernetes / Slurm name)")
    return value


def check_single_line(value: str, what: str) -> str:
    """Any text that goes into a generated file: no newline or other control character."""
    if _CONTROL.search(value):
        raise UserError(f"{what} {value!r} contains a newline or another control character; give it on one line")
    return value


def check_pattern(value: str, pattern: str, what: str, allowed: str) -> str:
    """A field written unquoted (e.g. into a ``#SBATCH`` line): only the characters it needs."""
    if not re.fullmatch(pattern, value):
        raise UserError(f"{what} {value!r} is not valid here: {allowed}")
    return value
