"""The one base class for bad input: the CLI prints these as one clear line and exits 2."""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(ValueError):
    """Bad input (a file, a field, an option) named in the message; not a bug in covenant_jax."""


class MissingDependency(UserError):
    """An optional package a verb needs is not installed; the message says how to install it."""


class CheckpointWriteError(UserError):
    """The storage refused a checkpoint (no space, quota, permission); the last complete one is kept."""


class ResumeError(UserError):
    """Resuming a run_dir with this recipe would not continue that run (the message says what differs)."""


USER_ERRORS = (UserError, FileNotFoundError)

# Optional packages -> the covenant_jax extra that installs them.
EXTRAS = {"torch": "torch"}


def require(module: str, purpose: str) -> ModuleType:
    """Imports an optional package, or raises one line naming what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        install = f"pip install 'covenant_jax[{EXTRAS[module]}]'" if module in EXTRAS else f"pip install {module}"
        raise MissingDependency(
            f"{purpose} needs {module}, which is not installed: {install} (or the {module} build for "
            "your platform)") from None


class RecipeError(UserError):
    """A recipe field (or a CLI option) holds a value covenant_jax cannot run with."""
