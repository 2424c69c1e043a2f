"""Topology names -> what to plan for: a TPU slice's compile-only devices, or a GPU count.

``v5p-256`` (v4 / v5p slices count TensorCores: 128 chips), ``v5e-64`` / ``v6e-256`` (chips),
libtpu's own ``v5p:4x4x8`` / ``v5e:16x16``, or ``h100:8`` (GPUs: estimated, not compiled).
Chips, their HBM and peak FLOP/s come from ``covenant_jax.hardware``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path

from jax.experimental import topologies

from covenant_jax.errors import PlanError
from covenant_jax.hardware import CHIPS

ALIASES = {
    "v5litepod": "v5e",
    "v5lite": "v5e",
    "v6litepod": "v6e",
    "v6lite": "v6e",
    "v5": "v5p",
    "gpu": "h100",
}  # "gpu:16": assumed H100 80GB
EXAMPLES = "v5p-256, v5p:4x4x8, v5e-64, v5e:16x16, v6e-256, v4-128, h100:8"


@dataclasses.dataclass
class Topology:
    name: str  # as given
    platform: str  # "tpu" | "gpu"
    kind: str  # v5p, v5e, ..., h100
    spec: str  # libtpu's topology string ("" for GPUs)
    chips: int
    devices: list  # compile-only TPU devices ([] for GPUs)
    hbm_per_device: int
    peak_flops_per_chip: float

    @property
    def num_devices(self) -> int:
        return len(self.devices) if self.devices else self.chips

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s of the whole slice."""
        return self.peak_flops_per_chip * self.chips

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "platform": self.platform,
            "chip": self.kind,
            "libtpu_topology": self.spec,
            "chips": self.chips,
            "devices": self.num_devices,
            "hbm_per_device": self.hbm_per_device,
        }


def parse_topology(name: str) -> tuple[str, str, str]:
    """``name`` -> (platform, chip kind, libtpu topology string or GPU count)."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+)[-:=_](\d+(?:x\d+)*)", text)
    if not m:
        raise PlanError(f"unknown topology {name!r}; examples: {EXAMPLES}")
    kind, size = ALIASES.get(m.group(1), m.group(1)), m.group(2)
    if kind not in CHIPS:
        raise PlanError(
            f"unknown topology {name!r}: chip {m.group(1)!r} is not one of "
            f"{', '.join(sorted(CHIPS))}; examples: {EXAMPLES}"
        )
    chip = CHIPS[kind]
    if chip.platform == "gpu":
        if "x" in size or int(size) < 1:
            raise PlanError(f"GPU topology {name!r}: give a GPU count, e.g. h100:8")
        return "gpu", kind, size
    if "x" in size:
        return "tpu", kind, f"{kind}:{size}"
    count = int(size)
    if count % chip.cores_per_chip:
        raise PlanError(
            f"{name!r}: {kind} slices are named by TensorCores ({chip.cores_per_chip} per "
            f"chip); {count} is not a multiple"
        )
    return "tpu", kind, f"{kind}:{_torus(count // chip.cores_per_chip, chip.torus_dims)}"


def resolve_topology(name: str) -> Topology:
    """``name`` -> a Topology; for a TPU, libtpu's compile-only devices of that slice."""
    platform, kind, spec = parse_topology(name)
    chip = CHIPS[kind]
    if platform == "gpu":
        return Topology(name, "gpu", kind, "", int(spec), [], chip.hbm_bytes, chip.peak_flops)
    devices = _tpu_devices(name, spec)
    per_chip = max(1, len(devices) // max(1, len({tuple(d.coords) for d in devices})))
    chips = len(devices) // per_chip
    return Topology(name, "tpu", kind, spec, chips, devices, chip.hbm_bytes // per_chip, chip.peak_flops)


def _tpu_devices(name: str, spec: str) -> list:
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(
            "TPU planning needs libtpu (the TPU compiler; no TPU needed): pip install -e '.[tpu]'"
        )
    _quiet_libtpu()
    try:
        return list(
            topologies.get_topology_desc(platform="tpu", topology_name=spec, **_host_bounds(spec)).devices
        )
    except RuntimeError as e:  # JaxRuntimeError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "topology" not in msg.lower() and "tpu" not in msg.lower():
            raise
        raise PlanError(
            f"libtpu does not accept topology {name!r} (as {spec!r}): {msg}; examples: {EXAMPLES}"
        ) from None


def _torus(chips: int, dims: int) -> str:
    """The usual Cloud TPU slice shape for a chip count: 128 v5p chips -> 4x4x8, 4 -> 2x2x1,
    64 v5e -> 8x8, 1 -> 1x1 (v5e-1, v6e-1: single-chip slices)."""
    if chips < 1 or chips & (chips - 1):
        raise PlanError(
            f"{chips} chips: a named slice has a power of two of chips; give the shape "
            f"instead (e.g. v5p:4x4x8, v5e:8x16)"
        )
    shape = [1] * dims
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest) if smallest > 1 else shape.index(1)
        shape[i] *= 2
    return "x".join(map(str, sorted(s for s in shape if s > 1) + [1] * shape.count(1)))


def _host_bounds(spec: str) -> dict:
    """libtpu lays a slice out in hosts of 2x2x1 chips unless told otherwise; a slice smaller than
    that (v5e-1, v6e-1) is one host of its own shape."""
    dims = [int(d) for d in spec.split(":")[1].split("x")]
    bounds = [min(d, h) for d, h in zip(dims + [1] * (3 - len(dims)), (2, 2, 1))]
    return {} if bounds == [2, 2, 1] else {"chips_per_host_bounds": bounds}


def _quiet_libtpu() -> None:
    """On a host without TPUs libtpu logs errors while looking for TPU workers; give it a local
    single-host answer (only where nothing is set and no TPU device files exist)."""
    if (
        any(Path("/dev").glob("accel*"))
        or Path("/dev/vfio").exists()
        and any(Path("/dev/vfio").glob("[0-9]*"))
    ):
        return
    for key, value in {
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_ACCELERATOR_TYPE": "v5litepod-4",
        # compile-only: several planning processes may load libtpu at once
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }.items():
        os.environ.setdefault(key, value)
