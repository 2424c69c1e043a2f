"""Every kind of bad input, in one place. Each is raised where its cause is detected; the CLI
prints any ``UserError`` as one line naming the cause and exits 2. Anything else is a bug.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(ValueError):
    """Bad input (a file, a field, an option) named in the message; not a bug in covenant_jax."""


USER_ERRORS = (UserError, FileNotFoundError)


# ---- recipes, options and the environment ------------------------------------------------------


class RecipeError(UserError):
    """A recipe field (or a CLI option) holds a value covenant_jax cannot run with."""


class MeshError(UserError):
    """A mesh that does not fit the devices or names an unknown axis."""


class PlanError(UserError):
    """``plan``: an unknown topology, a mesh that does not fit the chips or the model, a missing config.json."""


class AttentionBackendError(UserError):
    """An attention backend chosen for a platform or mesh it cannot run on."""


class DistributedError(UserError):
    """The processes of a multi-process job could not find each other in time."""


class MissingDependency(UserError):
    """An optional package a verb needs is not installed; the message says how to install it."""


# ---- models and checkpoints ---------------------------------------------------------------------


class ConfigError(UserError):
    """A config.json (or recipe) field is missing, of the wrong type, unsupported or inconsistent."""


class SafetensorsError(UserError):
    """A safetensors file is truncated, corrupt or not what its header says."""


class CheckpointError(UserError):
    """The checkpoint's files are missing, unreadable or inconsistent."""


class AdapterError(UserError):
    """A LoRA adapter folder is unreadable, uses a PEFT feature covenant_jax lacks, or does not fit
    the model (another base, other shapes)."""


class TokenizerError(UserError):
    """A model folder has no tokenizer files, or transformers cannot load them."""


# ---- outputs ------------------------------------------------------------------------------------


class OutputExistsError(UserError, FileExistsError):
    """OUT_DIR is not empty and --overwrite was not given."""


class OutputNotWritableError(UserError):
    """An output location cannot be written (read-only, missing bucket, no permission, full)."""


class OutputOverlapsInputError(UserError):
    """An output folder is its input, inside it, or contains it: writing it would destroy the input."""


class IncompleteFolderError(UserError):
    """A folder on an object store was never finished (its writer is running or died)."""


class CheckpointWriteError(UserError):
    """The storage refused a checkpoint (no space, quota, permission); the last complete one is kept."""


# ---- training and evaluation --------------------------------------------------------------------


class ResumeError(UserError):
    """Resuming a run_dir with this recipe would not continue that run (the message says what differs)."""


class NonFiniteLoss(UserError):
    """The loss, gradients or updated state became NaN/inf; the message names the step."""


class EvalInputError(UserError):
    """An evaluation input (text file, lengths, depths) is missing or unusable."""


class CacheError(UserError):
    """A data cache entry cannot be completed or read (e.g. a cache folder hosts do not share)."""


# ---- optional packages --------------------------------------------------------------------------

# Optional packages -> the covenant_jax extra that installs them.
EXTRAS = {"torch": "torch"}


def require(module: str, purpose: str) -> ModuleType:
    """Imports an optional package, or raises one line naming what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        install = (
            f"pip install 'covenant_jax[{EXTRAS[module]}]'" if module in EXTRAS else f"pip install {module}"
        )
        raise MissingDependency(
            f"{purpose} needs {module}, which is not installed: {install} (or the {module} build for "
            "your platform)"
        ) from None
