"""Will a recipe fit a pod? Compile the real train step ahead of time for a TPU topology.

No weights are read and no TPU is needed: libtpu (``pip install -e '.[tpu]'``) describes a TPU
topology's devices (``jax.experimental.topologies.get_topology_desc``) and the real TPU
compiler compiles for them on this host. The model is built abstractly (``nnx.eval_shape``)
from the recipe's config.json with its model options and RoPE override; params, optimizer state
and the ``[A, b, T]`` batch are ShapeDtypeStructs carrying their NamedShardings on a mesh made
from the recipe's mesh section over the topology's devices; ``make_steps(...).train_step`` is
lowered inside ``activation_sharding(mesh)`` and compiled. The report is per device from
``compiled.memory_analysis()``, checked against the chip's HBM, plus model FLOPs per step.
When the step does not fit, a small search recompiles candidates (stronger remat, more
micro-batches, fsdp instead of data / tensor, smaller loss chunks) and reports the first that
fits.

GPU targets ("h100:8", "gpu:16") cannot be compiled here (CUDA AOT needs a GPU host); for them
the report is an analytic estimate (exact parameter / optimizer / gradient bytes per device,
activations from a formula), labelled as such.

Topology names: ``v5p-256`` (v4/v5p count TensorCores: 128 chips), ``v5e-64`` / ``v6e-256``
(chips), or libtpu's own ``v5p:4x4x8`` / ``v5e:16x16``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from covenant_jax.errors import UserError

GiB = 1024**3


class PlanError(UserError):
    """An unknown topology, a mesh that does not fit the chips or the model, a missing config.json."""


# ---- topologies ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # per chip
    cores_per_chip: int  # TensorCores; "v5p-256" counts cores for these
    dims: int  # torus dimensions of the topology string
    peak_flops: float  # dense bf16 per chip


CHIPS = {
    "v4": Chip(32 * GiB, 2, 3, 275e12),
    "v5p": Chip(95 * GiB, 2, 3, 459e12),
    "v5e": Chip(16 * GiB, 1, 2, 197e12),
    "v6e": Chip(32 * GiB, 1, 2, 918e12),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e", "v5": "v5p"}
GPUS = {"h100": (80 * GiB, 989e12, "H100 80GB"), "h200": (140 * GiB, 989e12, "H200 141GB"),
        "gpu": (80 * GiB, 989e12, "GPU, assumed H100 80GB")}
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

    def to_dict(self) -> dict:
        return {"name": self.name, "platform": self.platform, "chip": self.kind, "libtpu_topology": self.spec,
                "chips": self.chips, "devices": self.num_devices, "hbm_per_device": self.hbm_per_device}


def _torus(chips: int, dims: int) -> str:
    """The usual Cloud TPU slice shape for a chip count: 128 v5p chips -> 4x4x8, 4 -> 2x2x1,
    64 v5e -> 8x8, 1 -> 1x1 (v5e-1, v6e-1: single-chip slices)."""
    if chips < 1 or chips & (chips - 1):
        raise PlanError(f"{chips} chips: a named slice has a power of two of chips; give the shape "
                        f"instead (e.g. v5p:4x4x8, v5e:8x16)")
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


def parse_topology(name: str) -> tuple[str, str, str]:
    """``name`` -> (platform, chip kind, libtpu topology string or GPU count)."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+)[-:=_](\d+(?:x\d+)*)", text)
    if not m:
        raise PlanError(f"unknown topology {name!r}; examples: {EXAMPLES}")
    kind, size = ALIASES.get(m.group(1), m.group(1)), m.group(2)
    if kind in GPUS:
        if "x" in size or int(size) < 1:
            raise PlanError(f"GPU topology {name!r}: give a GPU count, e.g. h100:8")
        return "gpu", kind, size
    if kind not in CHIPS:
        known = ", ".join(sorted(CHIPS) + sorted(GPUS))
        raise PlanError(f"unknown topology {name!r}: chip {m.group(1)!r} is not one of {known}; "
                        f"examples: {EXAMPLES}")
    chip = CHIPS[kind]
    if "x" in size:
        return "tpu", kind, f"{kind}:{size}"
    count = int(size)
    if count % chip.cores_per_chip:
        raise PlanError(f"{name!r}: {kind} slices are named by TensorCores ({chip.cores_per_chip} per "
                        f"chip); {count} is not a multiple")
    return "tpu", kind, f"{kind}:{_torus(count // chip.cores_per_chip, chip.dims)}"


def _quiet_libtpu() -> None:
    """On a host without TPUs libtpu logs errors while looking for TPU workers; give it a local
    single-host answer (only where nothing is set and no TPU device files exist)."""
    if any(Path("/dev").glob("accel*")) or Path("/dev/vfio").exists() and any(Path("/dev/vfio").glob("[0-9]*")):
        return
    for key, value in {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                       "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                       # compile-only: several planning processes may load libtpu at once
                       "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
        os.environ.setdefault(key, value)


def resolve_topology(name: str) -> Topology:
    platform, kind, spec = parse_topology(name)
    if platform == "gpu":
        hbm, peak, _ = GPUS[kind]
        return Topology(name, "gpu", kind, "", int(spec), [], hbm, peak)
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("TPU planning needs libtpu (the TPU compiler; no TPU needed): "
                        "pip install -e '.[tpu]'")
    _quiet_libtpu()
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=spec, **_host_bounds(spec)).devices
    except RuntimeError as e:  # JaxRuntimeError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "topology" not in msg.lower() and "tpu" not in msg.lower():
            raise
        raise PlanError(f"libtpu does not accept topology {name!r} (as {spec!r}): {msg}; "
                        f"examples: {EXAMPLES}") from None
    chip = CHIPS[kind]
    per_chip = max(1, len(devices) // max(1, len({tuple(d.coords) for d in devices})))
    chips = len(devices) // per_chip
    return Topology(name, "tpu", kind, spec, chips, list(devices), chip.hbm_bytes // per_chip, chip.peak_flops)


# ---- the recipe ---------------------------------------------------------------------------------


def model_config(cfg):
    """The recipe's model shape (config.json at model.path) with its RoPE override applied."""
    from covenant_jax import storage
    from covenant_jax.config import ModelConfig
    from covenant_jax.train import recipe

    path = storage.path(cfg.model.path) / "config.json"  # local or gs://
    if not path.is_file():
        raise PlanError(f"plan reads the model's shape from {path}, which does not exist; point "
                        "--config.model.path at a folder holding the model's config.json "
                        "(no weights are read)")
    return recipe.rope_override(ModelConfig.from_json_file(path), cfg.model)


def mesh_shape(cfg, num_devices: int) -> dict[str, int]:
    """The recipe's mesh with a -1 axis resolved; a clear error when it does not fit the devices."""
    from covenant_jax.parallel.sharding import MESH_AXES

    sizes = {a: int(cfg.mesh.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise PlanError(f"mesh {sizes}: sizes must be positive, at most one -1")
    if free:
        if num_devices % fixed:
            raise PlanError(f"mesh {sizes} does not divide the topology's {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise PlanError(f"mesh {sizes} uses {math.prod(sizes.values())} devices but the topology has "
                        f"{num_devices}; make the product match (one axis may be -1)")
    return sizes


@dataclasses.dataclass(frozen=True)
class _MeshShape:
    """Stands in for a Mesh where only ``mesh.shape`` is read (``logical_to_spec``)."""
    shape: dict[str, int]


def check_mesh(cfg, model_cfg, sizes: dict[str, int]) -> list[str]:
    """Errors (raised) for a mesh the model or batch cannot be split over; warnings returned."""
    from covenant_jax.train import recipe

    problems = []
    t, f = sizes["tensor"], sizes["fsdp"]
    for what, dim in [("num_attention_heads", model_cfg.num_attention_heads),
                      ("intermediate_size", model_cfg.intermediate_size), ("vocab_size", model_cfg.vocab_size)]:
        if dim % t:
            problems.append(f"tensor={t} does not divide {what}={dim}")
    if model_cfg.hidden_size % f:
        problems.append(f"fsdp={f} does not divide hidden_size={model_cfg.hidden_size}")
    if cfg.data.seq_len % sizes["context"]:
        problems.append(f"context={sizes['context']} does not divide data.seq_len={cfg.data.seq_len}")
    try:
        recipe.validate(cfg, model_cfg, sizes["data"] * sizes["fsdp"])
    except UserError as e:
        problems.append(str(e))
    if cfg.model.attention == "splash":  # its shard_map takes only some meshes
        from covenant_jax.model.gpu_attention import splash_partition
        from covenant_jax.parallel.sharding import DEFAULT_RULES

        try:
            splash_partition(_MeshShape(sizes), DEFAULT_RULES, cfg.data.batch_size // cfg.train.micro_batches,
                             model_cfg.num_attention_heads, model_cfg.num_key_value_heads)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise PlanError("the mesh does not fit the model / batch: " + "; ".join(problems))
    warnings = []
    if model_cfg.num_key_value_heads % t:
        warnings.append(f"tensor={t} does not divide num_key_value_heads={model_cfg.num_key_value_heads}: "
                        "k/v projections are replicated over the tensor axis")
    return warnings


# ---- compiling ----------------------------------------------------------------------------------


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass
class Memory:
    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int
    generated_code: int
    peak: int  # what must fit: max(arguments + outputs - aliased + temporaries + code, XLA's peak)
    params: int  # of the arguments: parameters (analytic, from the shardings)
    opt_state: int  # of the arguments: optimizer state (analytic)
    estimate: bool = False  # True: a formula, not a compile (GPU targets)
    note: str = ""  # e.g. the compiler's out-of-memory message (temporaries then come from it)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_COMPILED: dict[tuple, tuple] = {}  # (recipe json, topology, mesh) -> compile_memory's result


def compile_memory(cfg, model_cfg, topo: Topology, sizes: dict[str, int]) -> tuple[Memory, float | None, float]:
    """Lowers and compiles the train step for ``topo``: (memory per device, compiled flops per
    device or None, compile seconds). Results are memoised per process."""
    key = (cfg.to_json_best_effort(sort_keys=True), topo.spec, tuple(sorted(sizes.items())))
    if key not in _COMPILED:
        _COMPILED[key] = _compile_memory(cfg, model_cfg, topo, sizes)
    return _COMPILED[key]


def _compile_memory(cfg, model_cfg, topo: Topology, sizes: dict[str, int]) -> tuple[Memory, float | None, float]:
    from covenant_jax.parallel.sharding import activation_sharding, make_mesh
    from covenant_jax.train import program

    mesh = make_mesh(sizes, devices=topo.devices)
    abstract = program.abstract_state(cfg, model_cfg, mesh)
    state = abstract.state
    steps = program.make_steps(cfg, abstract.graphdef, abstract.rest, abstract.tx, abstract.schedule,
                               abstract.shardings, mesh)
    batch = program.abstract_batch(cfg.data.batch_size, cfg.data.seq_len, cfg.train.micro_batches,
                                   steps.batch_sharding)
    started = time.time()
    try:
        with activation_sharding(mesh):
            compiled = steps.train_step.lower(state, batch).compile()
    except RuntimeError as e:  # JaxRuntimeError: the TPU compiler refuses a program over HBM
        found = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        state_bytes = _device_bytes(state)
        arguments = state_bytes + _device_bytes(batch)
        temporaries = int(float(found.group(1)) * GiB)
        memory = Memory(arguments, state_bytes, state_bytes, temporaries, 0, arguments + temporaries,
                        _device_bytes(state["params"]), _device_bytes(state["opt_state"]),
                        note=f"compiler: temporaries {found.group(1)}G exceed the available HBM "
                             f"{found.group(2)}G (compile stopped there)")
        return memory, None, time.time() - started
    seconds = time.time() - started
    stats = compiled.memory_analysis()
    summed = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
              + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)
    # The TPU runtime reserves the whole temp allocation, so the sum is what the step holds;
    # XLA's own peak (heap simulation) is taken when it is larger (seen for tiny programs).
    peak = max(summed, int(getattr(stats, "peak_memory_in_bytes", 0) or 0))
    memory = Memory(stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
                    stats.temp_size_in_bytes, stats.generated_code_size_in_bytes, peak,
                    _device_bytes(state["params"]), _device_bytes(state["opt_state"]))
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost["flops"]) if cost and cost.get("flops", -1) > 0 else None
    except Exception:  # cost analysis is optional and backend-dependent
        pass
    return memory, flops, seconds


def estimate_memory(cfg, model_cfg, topo: Topology, sizes: dict[str, int]) -> Memory:
    """An analytic per-device estimate (GPU targets): parameter, optimizer and float32 gradient
    bytes are exact from the shardings; activations come from a formula (saved layer inputs /
    projections per remat policy, one layer's working set, the loss chunk)."""
    import jax
    import numpy as np
    from flax import nnx

    from covenant_jax.model.llama import abstract_model
    from covenant_jax.parallel.sharding import _axes_of, logical_to_spec, spec_axes
    from covenant_jax.train import optimizer
    from covenant_jax.train.program import model_options

    model = abstract_model(model_cfg, model_options(cfg))
    _, params_state, _ = nnx.split(model, nnx.Param, ...)
    variables = jax.tree.leaves(params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def shard_elems(v) -> int:
        value = v.get_value()
        spec = logical_to_spec(_axes_of(v), value.shape, _MeshShape(sizes))
        n = 1
        for dim, axes in zip(value.shape, tuple(spec) + (None,) * (len(value.shape) - len(spec))):
            n *= dim // math.prod(sizes[a] for a in spec_axes(axes))
        return n

    elems = [shard_elems(v) for v in variables]
    p_item = np.dtype(cfg.model.param_dtype).itemsize
    params = sum(elems) * p_item
    tx, _ = optimizer.make_optimizer(cfg.optim, cfg.train.steps)
    pure = nnx.to_pure_dict(params_state)
    opt_total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, pure)))
    opt_state = int(opt_total * params / max(1, sum(int(np.prod(v.get_value().shape)) for v in variables) * p_item))
    grads = sum(elems) * 4  # float32 accumulation
    # activations
    c = np.dtype(cfg.model.dtype).itemsize
    b = cfg.data.batch_size // cfg.train.micro_batches // (sizes["data"] * sizes["fsdp"])
    t = cfg.data.seq_len // sizes["context"]
    tp = sizes["tensor"]
    d, f, layers = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_hidden_layers
    qkv = (model_cfg.num_attention_heads + 2 * model_cfg.num_key_value_heads) * model_cfg.head_dim
    per_token_dots = (qkv + model_cfg.num_attention_heads * model_cfg.head_dim) / tp + 2 * d + 3 * f / tp
    saved_per_layer = {"full": d, "save_dots": d + per_token_dots, "offload": d,
                       "none": d + 2 * per_token_dots}[cfg.model.remat]
    working = 3 * per_token_dots  # one layer's forward + backward intermediates
    attention = 0
    if cfg.model.attention == "naive":
        attention = 2 * (model_cfg.num_attention_heads // tp if model_cfg.num_attention_heads % tp == 0
                         else model_cfg.num_attention_heads) * t * t * 4 * b
    loss = 3 * min(cfg.train.loss_chunk_size, b * t) * (model_cfg.vocab_size / tp) * 4
    temporaries = int(b * t * c * (saved_per_layer * layers + working) + attention + loss + grads)
    args = params + opt_state + 5 * 4 * b * t * cfg.train.micro_batches
    return Memory(args, params + opt_state, params + opt_state, temporaries, 0,
                  args + temporaries, params, opt_state, estimate=True)


# ---- the plan -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    changes: dict[str, Any]  # recipe fields changed from the recipe (empty: as written)
    mesh: dict[str, int]
    memory: Memory | None
    fits: bool | None
    compile_seconds: float = 0.0
    compiled_flops_per_device: float | None = None
    skipped: str = ""  # why it was not compiled (e.g. arguments alone exceed HBM)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["memory"] = self.memory.to_dict() if self.memory else None
        return d


@dataclasses.dataclass
class Plan:
    recipe: str
    topology: Topology
    model: dict
    train: dict
    attempt: Attempt  # the recipe as written
    model_flops_per_step: float
    warnings: list[str]
    suggestion: Attempt | None = None  # first candidate that fits, when the recipe does not
    tried: list[Attempt] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return self.attempt.fits

    def to_dict(self) -> dict:
        chips = self.topology.chips
        peak = self.topology.peak_flops_per_chip * chips
        return {
            "recipe": self.recipe, "topology": self.topology.to_dict(), "model": self.model,
            "train": self.train, "mesh": self.attempt.mesh, "fits": self.fits,
            "memory_per_device": self.attempt.memory.to_dict() if self.attempt.memory else None,
            "hbm_per_device": self.topology.hbm_per_device,
            "flops": {"model_flops_per_step": self.model_flops_per_step,
                      "model_flops_per_chip": self.model_flops_per_step / chips,
                      # XLA's cost analysis: a scan / while body is counted once, not per iteration
                      "compiled_flops_per_device": self.attempt.compiled_flops_per_device,
                      "step_seconds_at_100pct_mfu": self.model_flops_per_step / peak if peak else None},
            "compile_seconds": self.attempt.compile_seconds,
            "warnings": self.warnings,
            "suggestion": self.suggestion.to_dict() if self.suggestion else None,
            "tried": [a.to_dict() for a in self.tried],
        }


def _with(cfg, changes: dict[str, Any]):
    out = copy.deepcopy(cfg)
    with out.unlocked():
        for key, value in changes.items():
            if key == "mesh":
                for axis, size in value.items():
                    out.mesh[axis] = size
            else:
                section, field = key.split(".", 1)
                out[section][field] = value
    return out


def candidates(cfg, model_cfg, sizes: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Changes to try, cheapest (in step time) first: stronger remat, more micro-batches, fsdp
    instead of data / more or less tensor, smaller loss chunks; each builds on the strongest
    remat."""
    order = ["none", "save_dots", "full"]
    current = cfg.model.remat if cfg.model.remat in order else "full"
    for remat in order[order.index(current) + 1:]:
        yield {"model.remat": remat}
    base = {"model.remat": "full"} if cfg.model.remat not in ("full", "offload") else {}
    rows = cfg.data.batch_size
    dp = sizes["data"] * sizes["fsdp"]
    a = cfg.train.micro_batches
    micro = []
    for factor in (2, 4, 8):
        if rows % (a * factor) == 0 and (rows // (a * factor)) % dp == 0:
            micro.append(a * factor)
            yield {**base, "train.micro_batches": a * factor}
    most_micro = {"train.micro_batches": micro[-1]} if micro else {}
    meshes = []
    if sizes["data"] > 1:
        meshes.append({**sizes, "data": 1, "fsdp": sizes["fsdp"] * sizes["data"]})
    if sizes["tensor"] > 1:
        meshes.append({**sizes, "tensor": sizes["tensor"] // 2, "fsdp": sizes["fsdp"] * 2})
    if sizes["fsdp"] % 2 == 0 and model_cfg.num_attention_heads % (sizes["tensor"] * 2) == 0:
        meshes.append({**sizes, "tensor": sizes["tensor"] * 2, "fsdp": sizes["fsdp"] // 2})
    for mesh in meshes:
        dp2 = mesh["data"] * mesh["fsdp"]
        for extra in ({}, most_micro):
            a2 = extra.get("train.micro_batches", a)
            if rows % a2 == 0 and (rows // a2) % dp2 == 0:
                yield {**base, **extra, "mesh": mesh}
    chunk = cfg.train.loss_chunk_size
    if chunk >= 512:
        yield {**base, **most_micro, "train.loss_chunk_size": chunk // 4}


def _fits(memory: Memory, topo: Topology) -> bool:
    return memory.peak <= topo.hbm_per_device


def _attempt(cfg, model_cfg, topo: Topology, changes: dict, search: bool) -> Attempt:
    sizes = mesh_shape(cfg, topo.num_devices)
    if topo.platform == "gpu":
        memory = estimate_memory(cfg, model_cfg, topo, sizes)
        return Attempt(changes, sizes, memory, _fits(memory, topo))
    if search:  # skip a compile the arguments alone rule out
        memory = estimate_memory(cfg, model_cfg, topo, sizes)
        if memory.params + memory.opt_state > topo.hbm_per_device:
            return Attempt(changes, sizes, None, False,
                           skipped=f"params + optimizer state alone are {memory.params + memory.opt_state:,} "
                                   f"bytes per device > HBM {topo.hbm_per_device:,}")
    memory, flops, seconds = compile_memory(cfg, model_cfg, topo, sizes)
    return Attempt(changes, sizes, memory, _fits(memory, topo), seconds, flops)


def plan(cfg, topology: str | Topology, *, search: bool = True, max_candidates: int = 6,
         hbm_bytes: int | None = None, recipe_name: str = "", log=None) -> Plan:
    """Plans ``cfg`` (a recipe ConfigDict) on ``topology``; see the module docstring."""
    from covenant_jax.train import recipe
    from covenant_jax.train.metrics import train_flops_per_token

    recipe.check_fields(cfg)
    topo = topology if isinstance(topology, Topology) else resolve_topology(topology)
    if hbm_bytes:
        topo = dataclasses.replace(topo, hbm_per_device=int(hbm_bytes))
    model_cfg = model_config(cfg)
    sizes = mesh_shape(cfg, topo.num_devices)
    warnings = check_mesh(cfg, model_cfg, sizes)
    if topo.platform == "gpu":
        warnings.append("GPU target: memory is an analytic ESTIMATE (CUDA ahead-of-time compilation "
                        "needs a GPU host); params/optimizer/gradient bytes are exact, activations "
                        "approximate")
    tokens = cfg.data.batch_size * cfg.data.seq_len
    model = {"params": model_cfg.num_params(), "layers": model_cfg.num_hidden_layers,
             "hidden_size": model_cfg.hidden_size, "vocab_size": model_cfg.vocab_size,
             "max_position_embeddings": model_cfg.max_position_embeddings,
             "rope": model_cfg.rope.rope_type}
    train = {"seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size,
             "micro_batches": cfg.train.micro_batches, "tokens_per_step": tokens,
             "remat": cfg.model.remat, "attention": cfg.model.attention,
             "param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype,
             "loss_chunk_size": cfg.train.loss_chunk_size}
    say = log or (lambda _msg: None)
    if topo.platform == "gpu" and cfg.model.attention == "splash":
        warnings.append("attention 'splash' is a TPU kernel; on GPUs use cudnn or blockwise")
    verb = "estimating" if topo.platform == "gpu" else "compiling"
    say(f"{verb} {recipe_name or 'recipe'} for {topo.spec or topo.name} (mesh {sizes}) ...")
    attempt = _attempt(cfg, model_cfg, topo, {}, search=False)
    result = Plan(recipe_name, topo, model, train, attempt,
                  train_flops_per_token(model_cfg, cfg.data.seq_len) * tokens, warnings)
    if attempt.fits or not search:
        return result
    for changes in candidates(cfg, model_cfg, sizes):
        if len(result.tried) >= max_candidates:
            break
        candidate = _with(cfg, changes)
        try:
            check_mesh(candidate, model_cfg, mesh_shape(candidate, topo.num_devices))
        except PlanError:
            continue
        say(f"  does not fit; trying {changes} ...")
        tried = _attempt(candidate, model_cfg, topo, changes, search=True)
        result.tried.append(tried)
        if tried.fits:
            result.suggestion = tried
            break
    return result


# ---- the report ---------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


def _changes_text(changes: dict) -> str:
    parts = []
    for key, value in changes.items():
        if key == "mesh":
            parts += [f"--config.mesh.{a}={s}" for a, s in value.items()]
        else:
            parts.append(f"--config.{key}={value}")
    return " ".join(parts)


def report(p: Plan) -> str:
    topo, m = p.topology, p.attempt.memory
    label = " (ESTIMATE)" if m and m.estimate else ""
    lines = [
        f"plan: {p.recipe or 'recipe'} on {topo.name}"
        + (f" (libtpu {topo.spec})" if topo.spec else "")
        + f": {topo.chips} chips, {topo.num_devices} devices, HBM {_gib(topo.hbm_per_device)} per device",
        f"  model:  {p.model['params'] / 1e9:.2f}B params, {p.model['layers']} layers; "
        f"seq {p.train['seq_len']} x batch {p.train['batch_size']} "
        f"({p.train['micro_batches']} micro-batches), remat {p.train['remat']}, attention {p.train['attention']}",
        "  mesh:   " + " ".join(f"{k}={v}" for k, v in p.attempt.mesh.items()),
    ]
    if m:
        lines += [
            f"  memory per device{label}:",
            f"    arguments      {_gib(m.arguments):>12}  (params {_gib(m.params)}, optimizer state {_gib(m.opt_state)}, batch)",
            f"    outputs        {_gib(m.outputs):>12}  ({_gib(m.aliased)} of it written into the donated state)",
            f"    temporaries    {_gib(m.temporaries):>12}",
            f"    generated code {_gib(m.generated_code):>12}",
            f"    peak           {_gib(m.peak):>12}  = {m.peak / topo.hbm_per_device:.0%} of HBM",
        ] + ([f"    ({m.note})"] if m.note else [])
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "unknown"}[p.fits]
    lines.append(f"  verdict: {verdict}")
    d = p.to_dict()["flops"]
    flops = (f"  flops:  model {d['model_flops_per_step']:.3e} per step ({d['model_flops_per_chip']:.3e} per chip)")
    if d["compiled_flops_per_device"]:
        flops += (f"; XLA cost analysis {d['compiled_flops_per_device']:.3e} per device "
                  "(loop bodies counted once)")
    lines.append(flops)
    if d["step_seconds_at_100pct_mfu"]:
        lines.append(f"          >= {d['step_seconds_at_100pct_mfu']:.2f} s per step at 100% MFU")
    if p.attempt.compile_seconds:
        lines.append(f"  compile: {p.attempt.compile_seconds:.1f} s")
    for w in p.warnings:
        lines.append(f"  warning: {w}")
    for t in p.tried:
        status = ("fits" if t.fits else "does not fit") if not t.skipped else f"skipped: {t.skipped}"
        peak = f"peak {_gib(t.memory.peak)}" if t.memory else ""
        lines.append(f"  tried {_changes_text(t.changes)}: {peak} {status}".rstrip())
    if p.fits is False:
        if p.suggestion:
            lines.append(f"  suggestion: {_changes_text(p.suggestion.changes)}")
        elif p.tried or True:
            lines.append("  no candidate fits; use more chips, optim.mu_dtype=bfloat16, or a smaller batch / seq_len")
    return "\n".join(lines)


def to_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=2, default=str)
