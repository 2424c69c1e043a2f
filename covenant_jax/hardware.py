"""The accelerators covenant_jax knows, in one table: peak dense bf16 FLOP/s and HBM per chip, and
how Cloud TPU names their slices. The training loop's MFU (``train/metrics.py``) and ``plan``
(topologies, HBM to fit, the 100%-MFU step time) both read it.
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as topology names spell it: v5p, h100
    platform: str  # "tpu" | "gpu"
    device_kinds: tuple[str, ...]  # jax ``Device.device_kind`` prefixes of this chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: int  # per chip
    cores_per_chip: int = 1  # TensorCores; v4 / v5p slice names ("v5p-256") count these
    torus_dims: int = 0  # dimensions of a TPU slice's shape (v5p 4x4x8, v5e 16x16)


CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip("v4", "tpu", ("TPU v4",), 275e12, 32 * GiB, cores_per_chip=2, torus_dims=3),
        Chip("v5p", "tpu", ("TPU v5p", "TPU v5"), 459e12, 95 * GiB, cores_per_chip=2, torus_dims=3),
        Chip("v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB, torus_dims=2),
        Chip("v6e", "tpu", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB, torus_dims=2),
        Chip("h100", "gpu", ("NVIDIA H100",), 989e12, 80 * GiB),
        Chip("h200", "gpu", ("NVIDIA H200",), 989e12, 140 * GiB),
        Chip("a100", "gpu", ("NVIDIA A100",), 312e12, 80 * GiB),  # the 80 GB part
    )
}


def chip_of_device_kind(device_kind: str) -> Chip | None:
    """The chip whose longest known ``device_kind`` prefix matches ("TPU v5 lite" is a v5e, not a
    v5p's "TPU v5"); None for an unknown device."""
    matches = [
        (len(k), chip) for chip in CHIPS.values() for k in chip.device_kinds if device_kind.startswith(k)
    ]
    return max(matches, key=lambda m: m[0])[1] if matches else None
