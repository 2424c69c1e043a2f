"""Device mesh, logical-axis rules and the shardings derived from them.

Every parameter axis carries a logical name (``Param(..., axes=(...))``) and key activations
are constrained with :func:`shard`. One rule table maps logical names to mesh axes; shardings
are derived from it here and nowhere else. A dimension that a mesh axis does not divide is
replicated over that axis instead (e.g. 3 KV heads on tensor=2), so any model runs on any mesh.

Mesh axes: data (pure data parallel), fsdp (data parallel + parameter sharding), context
(sequence), tensor (heads / mlp / vocab). Axis types are Auto on purpose: the model math is
written once, XLA's propagation places the collectives, and :func:`shard` pins activations.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from covenant_jax.errors import MeshError


MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical axis name -> mesh axes (a tuple shards over several; None replicates)
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
    "layers": None,
    "lora_rank": None,  # LoRA adapters' rank axis: replicated
    # activations
    "batch": ("data", "fsdp"),
    "seq": ("context",),
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over all devices; ``shape`` gives some axes' sizes, -1 (or omitted fsdp) takes the rest."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(shape, len(devices))
    grid = np.asarray(devices).reshape([sizes[n] for n in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_sizes(shape: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """Every mesh axis's size over ``num_devices`` (:func:`make_mesh`'s sizing, which ``plan``
    applies to a topology it has no Mesh of yet)."""
    sizes = {name: 1 for name in MESH_AXES}
    sizes["fsdp"] = -1
    for name, size in (shape or {}).items():
        if name not in MESH_AXES:
            raise MeshError(f"unknown mesh axis {name!r}; mesh axes are {MESH_AXES}")
        if int(size) != -1 and int(size) < 1:
            raise MeshError(f"mesh axis {name}={size}: sizes are positive, or -1 for the devices left")
        sizes[name] = int(size)
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"mesh {sizes} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are present")
    return sizes


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping = DEFAULT_RULES
) -> P:
    """PartitionSpec for one array; mesh axes of size 1, reused or not dividing the dim are dropped."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = []
        for axis in (rules.get(name) or ()) if name else ():
            size = mesh.shape[axis]
            if (
                size > 1
                and axis not in used
                and dim % (math.prod(mesh.shape[a] for a in mesh_axes) * size) == 0
            ):
                mesh_axes.append(axis)
                used.add(axis)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return P(*spec)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("axes")
    if axes is None or len(axes) != variable.get_value().ndim:
        raise ValueError(
            f"parameter of shape {variable.get_value().shape} has no matching logical axes: {axes}"
        )
    return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> nnx.State:
    """The NamedSharding of every variable in an (abstract or concrete) nnx state."""
    return jax.tree.map(
        lambda v: NamedSharding(mesh, logical_to_spec(_axes_of(v), v.get_value().shape, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


# ---- activation constraints -------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping] | None] = contextvars.ContextVar(
    "covenant_mesh", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Mapping = DEFAULT_RULES) -> Iterator[None]:
    """Within this context (around tracing), :func:`shard` constrains activations to ``mesh``."""
    token = _ACTIVE.set((mesh, rules) if mesh is not None else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def shard(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside a mesh context."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_sharding() -> tuple[Mesh, Mapping] | None:
    """The (mesh, rules) of the enclosing :func:`activation_sharding`, or None outside one."""
    return _ACTIVE.get()
