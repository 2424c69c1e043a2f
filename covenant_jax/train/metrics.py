"""What a person and a script see: progress bar, metrics.jsonl, TensorBoard, MFU estimate."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from covenant_jax import hardware, storage
from covenant_jax.config import ModelConfig
from covenant_jax.model import lora as lora_lib


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Dense bf16 peak FLOP/s of this process's devices, from the one hardware table (None:
    unknown, MFU not shown); ``train.peak_tflops_per_device`` overrides it."""
    if override_tflops:
        return override_tflops * 1e12
    chip = hardware.chip_of_device_kind(jax.devices()[0].device_kind)
    return chip.peak_flops if chip else None


def train_flops_per_token(
    cfg: ModelConfig, seq_len: int, lora: lora_lib.LoraConfig | None = None, reference_forward: bool = False
) -> float:
    """6·N (matmul params, lm_head included, embedding lookup not) + 12·L·N_heads·H·T (attention).
    With ``lora``: 4·N (forward and input gradients; a frozen weight has no weight gradient) +
    6·N_adapters + attention. ``reference_forward``: DPO's reference model also runs forward in
    the step, 2·N + the attention's forward third."""
    matmul_params = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = attention_flops_per_token(cfg, seq_len)
    reference = 2 * matmul_params + attention / 3 if reference_forward else 0
    if lora is None:
        return 6 * matmul_params + attention + reference
    return 4 * matmul_params + 6 * lora_lib.num_params(cfg, lora) + attention + reference


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The attention core's share of :func:`train_flops_per_token`: q·k and p·v over the whole row
    (2 + 2 FLOPs per head dim and key, causal masking not discounted), forward and backward (x3)."""
    return 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


METRICS_FILE = "metrics.jsonl"


def _rows_through(path: storage.Path, last_step: int) -> list[str]:
    """The lines of an existing metrics file whose step is at most ``last_step`` (a torn last line
    from a killed run is dropped too)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if step <= last_step:
            kept.append(line + "\n")
    return kept


class MetricsWriter:
    """One JSON object per logged step in RUN_DIR/metrics.jsonl, the same scalars in TensorBoard.

    A run resumed from the checkpoint of step S replays steps S+1 on: the rows after S are
    dropped from metrics.jsonl, and TensorBoard hides the earlier events from step S+1 on
    (tensorboardX's ``purge_step``), so no step is shown twice. A fresh run (S = 0) starts both
    over.

    Object stores cannot append: for a remote run dir both files are written in a local staging
    folder and uploaded (each file rewritten whole) at every :meth:`flush` -- the loop flushes at
    each checkpoint, so the remote rows reach at least the last checkpoint -- and at
    :meth:`close`. (tensorboardX can write ``gs://`` itself, but through a second client,
    google-cloud-storage, and its writer uploads again from ``__del__`` after ``close``.)
    """

    def __init__(self, run_dir: str | Path, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = storage.path(run_dir)
        self._staging = tempfile.TemporaryDirectory(prefix="covenant-metrics-") if self.remote else None
        self.local = Path(self._staging.name) if self.remote else Path(self.run_dir)
        rows = _rows_through(self.run_dir / METRICS_FILE, start_step) if start_step else []
        tmp = self.local / f"{METRICS_FILE}.tmp"
        tmp.write_text("".join(rows))
        os.replace(tmp, self.local / METRICS_FILE)
        self.jsonl = open(self.local / METRICS_FILE, "a", buffering=1)
        from tensorboardX import SummaryWriter

        # The suffix keeps two runs started in the same second from sharing an event file name,
        # and orders them (TensorBoard reads a folder's event files in name order).
        self.tb = SummaryWriter(
            str(self.local / "tensorboard"),
            purge_step=start_step + 1 if start_step else 0,
            filename_suffix=f".{time.time_ns()}",
        )
        self._upload()

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.run_dir)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        for key, value in scalars.items():
            self.tb.add_scalar(key, float(value), step)

    def flush(self) -> None:
        """Makes every row written so far durable in the run dir."""
        if self.enabled:
            self.jsonl.flush()
            self.tb.flush()
            self._upload()

    def _upload(self) -> None:
        if not self.remote:
            return
        for file in sorted(self.local.rglob("*")):
            if file.is_file():
                storage.copy_file(storage.path(file), self.run_dir / file.relative_to(self.local).as_posix())

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            self._upload()
            if self._staging is not None:
                self._staging.cleanup()
