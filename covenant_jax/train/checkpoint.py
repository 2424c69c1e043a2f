"""Run checkpoints through Orbax's CheckpointManager: train state, data-iterator state, config.

Async (training continues while arrays are written), keep-N, and atomic: Orbax writes each step
into a temporary folder and renames it when complete, so a kill at any moment leaves the last
finished checkpoint intact (leftover temporary folders are removed when the next run opens the
folder). The Grain iterator state is saved with the same step, so a resumed run sees exactly the
batches the uninterrupted one would have.

Each step also stores an ``integrity`` item: content digests of every state array and of each
process's iterator state (:mod:`covenant_jax.train.integrity`), checked after restoring. A step
that is unreadable or fails its digests is reported, moved aside to ``<step>.damaged`` (nothing
is deleted) and the newest intact step is used instead. A save that fails for lack of space (or
quota, or permission) is one :class:`CheckpointWriteError` line, with its partial folder removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from covenant_jax import storage
from covenant_jax.errors import CheckpointError, CheckpointWriteError
from covenant_jax.train import integrity

ITEMS = ("state", "data", "config", "integrity")
DAMAGED_SUFFIX = ".damaged"
# OS errors that mean "the storage refused the write", not a bug: reported in one line.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)
_WRITE_FAILURES = tuple(os.strerror(code) for code in _WRITE_ERRNOS)


class _Damaged(Exception):
    """One step cannot be resumed from; the message says why in a few words."""


def _root_cause(e: BaseException, limit: int = 400) -> str:
    """The first line of the innermost exception (TensorStore's own words), without its spec dump."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [""])[0]
    for noise in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(noise)[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _write_failure(e: BaseException) -> str | None:
    """The OS's words for a refused write anywhere in ``e``'s chain, or None (a bug: keep the traceback)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        message = str(e)
        # The errno where the error carries one (an OSError whose text is TensorStore's own, or
        # TensorStore's os_error_code), else the OS's words in the text.
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (found := re.search(r"os_error_code='?(\d+)", message)):
            code = int(found.group(1))
        if code in _WRITE_ERRNOS:
            return os.strerror(code)
        found = next((reason for reason in _WRITE_FAILURES if reason in message), None)
        if found:
            return found
        e = e.__cause__ or e.__context__
    return None


class _QuietWriteFailures(logging.Filter):
    """Orbax's save threads (absl) and asyncio log a traceback per failed write; the caller
    reports the failure in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return _write_failure(exc) is None and not any(r in record.getMessage() for r in _WRITE_FAILURES)


def _quiet_write_failures() -> None:
    """Installs the filter once. Also drops the "Event loop is closed" errors TensorStore's
    pending writes raise, as unraisable, into the event loop Orbax closed after the first failure
    (hundreds of tracebacks for one full disk)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietWriteFailures) for f in logger.filters):
            logger.addFilter(_QuietWriteFailures())
    previous = sys.unraisablehook
    if getattr(previous, "_covenant_quiet", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook._covenant_quiet = True
    sys.unraisablehook = hook


def _any_process(flag: bool) -> list[int]:
    """Indices of the processes where ``flag`` is set (a collective in multi-process runs)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(flag))).reshape(-1)
    return [i for i, f in enumerate(flags) if f]


def _on_every_process(fn: Callable[[], Any]) -> Any:
    """``fn()``; if it finds damage on any process, :class:`_Damaged` on all (they stay in step)."""
    reason, result = None, None
    try:
        result = fn()
    except _Damaged as e:
        reason = str(e)
    failed = _any_process(reason is not None)
    if failed:
        raise _Damaged(reason or f"damaged as seen from process {failed[0]}")
    return result


class RunCheckpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, create: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=create,
            cleanup_tmp_directories=create,
        )
        self.directory = storage.path(directory)  # local or gs://: Orbax takes epath paths
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._saving: int | None = None  # the step whose (async) save may still be running
        _quiet_write_failures()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> None:
        """Starts saving ``step`` (all processes call it); digests are taken first, on device."""
        record = integrity.record(state, data_iterator)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config),
            integrity=ocp.args.JsonSave(record),
        )
        self.wait()  # the previous save's failure is that step's
        self._saving = step
        with self._write_errors_as_one_line(step):
            self.manager.save(step, args=args)

    def wait(self) -> None:
        """Until the last save is complete on storage."""
        with self._write_errors_as_one_line(self._saving):
            self.manager.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        """Waits for the last save, then closes; a refused write surfacing in either is one line
        (the first one: closing after a failed wait must not replace its error)."""
        step = self._saving
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):
                self.manager.close()
            raise
        with self._write_errors_as_one_line(step):
            self.manager.close()

    @contextlib.contextmanager
    def _write_errors_as_one_line(self, step: int | None):
        """A save of ``step`` refused by the storage becomes one line; its partial folder goes."""
        try:
            yield
        except Exception as e:
            reason = _write_failure(e)
            if reason is None:
                raise
            self._saving = None
            self._remove_partial(step)
            latest = self.manager.latest_step()
            kept = (
                f"the last complete checkpoint, step {latest}, is intact"
                if latest is not None
                else "no complete checkpoint exists yet"
            )
            raise CheckpointWriteError(
                f"could not write checkpoint step {step} to {self.directory}: {reason}; {kept} and "
                "the partial step was removed. Free space (or raise the quota) and rerun the same "
                "command to resume"
            ) from None

    def _remove_partial(self, step: int | None) -> None:
        """Deletes what a failed save of ``step`` left (never a finalised step)."""
        self.manager.reload()
        if step is None or jax.process_index() != 0:
            return
        for path in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            path.rmtree()
        final = self.directory / str(step)
        if final.exists() and step not in self.manager.all_steps():  # gs://: no commit_success.txt
            final.rmtree()

    # -- restoring ------------------------------------------------------------------------------

    def saved_config(self) -> tuple[int, dict] | None:
        """(step, recipe) of the newest step whose ``config`` item reads, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
                return step, dict(config.config)
            except Exception:  # a damaged step: the restore below reports it
                continue
        return None

    def restore_newest_intact(
        self, abstract_state: Any, data_iterator: Any, log: Callable[[str], None] = print
    ) -> tuple[int | None, Any]:
        """(step, state) of the newest step that restores and verifies; (None, None) if none saved.

        The iterator is restored in place. Newer damaged steps are moved aside (``log`` says which
        and why); when no step is intact, a :class:`CheckpointError` lists every step's reason.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None, None
        self._check_process_count(steps[0])
        skipped: list[tuple[int, str]] = []
        for step in steps:
            state, reason = self._restore_agreed(step, abstract_state, data_iterator, log)
            if reason is None:
                self._set_aside([s for s, _ in skipped], log)
                return step, state
            skipped.append((step, reason))
            log(
                f"checkpoint step {step} in {self.directory} is damaged: {reason}; "
                + (f"trying step {steps[len(skipped)]}" if len(skipped) < len(steps) else "no older step")
            )
        listing = "; ".join(f"step {s}: {r}" for s, r in skipped)
        raise CheckpointError(
            f"no intact checkpoint in {self.directory} ({listing}); nothing was changed. Move the "
            "folder away (or train into a new run_dir) to start afresh"
        )

    def _restore_agreed(self, step, abstract_state, data_iterator, log) -> tuple[Any, str | None]:
        """(state, None) when ``step`` restores and verifies on every process, else (None, why)."""
        try:
            saved = _on_every_process(lambda: self._read_integrity(step))
            state = _on_every_process(lambda: self._restore(step, abstract_state, data_iterator))
            if saved is not None:
                _on_every_process(lambda: self._verify(saved, state, data_iterator))
        except _Damaged as e:
            return None, str(e)
        if saved is None:
            log(
                f"checkpoint step {step} carries no content digests (saved by an older covenant_jax): "
                "restored without verifying them"
            )
        return state, None

    @staticmethod
    def _verify(saved: dict, state: Any, data_iterator: Any) -> None:
        bad = integrity.mismatches(saved, state, data_iterator)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise _Damaged(f"content digests differ from those saved for {', '.join(bad[:3])}{more}")

    def _check_files(self, step: int) -> None:
        """The items and this process's iterator file exist: names the missing one."""
        step_dir = self.directory / str(step)
        if not any(step_dir.iterdir()):
            raise _Damaged(f"its folder {step_dir} is empty")
        for item in ("state", "data"):
            if not (step_dir / item).is_dir():
                raise _Damaged(f"its {item!r} item ({step_dir / item}) is missing")
        mine = step_dir / "data" / self._iterator_file()
        if not mine.exists():
            raise _Damaged(
                f"the data-iterator state {mine} is missing (Grain writes one file per "
                "process, and this process cannot resume its data order without it)"
            )

    def _read_integrity(self, step: int) -> dict | None:
        """The digests saved with ``step`` (None before they were recorded), once its files are there."""
        self._check_files(step)
        try:
            return self._saved_digests(step)
        except Exception as e:
            raise _Damaged(f"its digests cannot be read ({_root_cause(e)})") from e

    def _restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )
        except Exception as e:
            raise _Damaged(f"it cannot be read ({_root_cause(e)})") from e
        return restored.state

    def _iterator_file(self) -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def _check_process_count(self, step: int) -> None:
        """Grain keeps one iterator-state file per process: another process count cannot resume."""
        data_dir = self.directory / str(step) / "data"
        if not data_dir.is_dir():
            return
        found = sorted(p.name for p in data_dir.glob("process_*.json"))
        suffix = f"-of-{jax.process_count()}.json"
        if found and not any(name.endswith(suffix) for name in found):
            raise CheckpointError(
                f"{self.directory / str(step)} was written by a different number of processes "
                f"(data iterator states {found}); this run has {jax.process_count()}: resume with "
                f"the same process count, or train into a new run_dir"
            )

    def _set_aside(self, steps: list[int], log: Callable[[str], None]) -> None:
        """Renames damaged steps newer than the one resumed from, so new saves can take their place."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}{DAMAGED_SUFFIX}"
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{step}{DAMAGED_SUFFIX}{n}"
                (self.directory / str(step)).rename(target)
                log(f"moved the damaged step {step} to {target} (kept for inspection; delete it when done)")
        from covenant_jax.parallel import distributed

        distributed.barrier(f"covenant_jax:set_aside:{max(steps)}")
        self.manager.reload()

    def config_of(self, step: int) -> dict:
        """The recipe ``step`` was trained with (saved with it)."""
        try:
            item = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: its recipe cannot be read ({_root_cause(e)})"
            ) from e
        return dict(item.config)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """The trained params of ``step`` alone (no optimizer state, no data iterator: what an
        export needs), checked against the digests saved with the step. Ask it of a checkpointer
        that has restored nothing else (Orbax binds an item to the first kind of restore)."""
        target = {"params": abstract_params}
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                ),
            ).state
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read ({_root_cause(e)})"
            ) from e
        saved = self._saved_digests(step)
        if saved is not None:
            now = integrity.state_digests(restored)
            bad = [path for path, digest in now.items() if saved["state"].get(path) != digest]
            if bad:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} is damaged: content digests differ "
                    f"from those saved for {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                    "export another step (--step)"
                )
        return restored["params"]

    def _saved_digests(self, step: int) -> dict | None:
        if not (self.directory / str(step) / "integrity").exists():
            return None
        item = self.manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
        return dict(item.integrity)

    def read_state(self, step: int) -> Any:
        """The saved state as stored (no target shardings): for inspection and tests."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
