"""What ``plan`` checks before it compiles anything: the model's shape, the mesh over the topology's
devices (``make_mesh``'s own sizing), and whether the model and batch split over that mesh (the
recipe's own validation, the tensor / fsdp splits, splash's ``shard_map``)."""

from __future__ import annotations

from jax.sharding import AbstractMesh

from covenant_jax import storage
from covenant_jax.config import ModelConfig
from covenant_jax.errors import MeshError, PlanError, UserError
from covenant_jax.model.gpu_attention import splash_partition
from covenant_jax.parallel.sharding import DEFAULT_RULES, MESH_AXES, mesh_sizes
from covenant_jax.train import recipe


def model_config(cfg) -> ModelConfig:
    """The recipe's model shape (config.json at model.path) with its RoPE override applied."""
    path = storage.path(cfg.model.path) / "config.json"  # local or gs://
    if not path.is_file():
        raise PlanError(
            f"plan reads the model's shape from {path}, which does not exist; point "
            "--config.model.path at a folder holding the model's config.json "
            "(no weights are read)"
        )
    return recipe.rope_override(ModelConfig.from_json_file(path), cfg.model)


def mesh_shape(cfg, num_devices: int) -> dict[str, int]:
    """The recipe's mesh over ``num_devices``, sized as the training run's ``make_mesh`` sizes it."""
    try:
        return mesh_sizes(cfg.mesh.to_dict(), num_devices)
    except MeshError as e:
        raise PlanError(f"the recipe's mesh does not fit the topology: {e}") from None


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A mesh of these sizes without devices (GPU targets; checks that read only the sizes)."""
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def check_mesh(cfg, model_cfg: ModelConfig, sizes: dict[str, int]) -> list[str]:
    """Errors (raised) for a mesh the model or batch cannot be split over; warnings returned."""
    t, f = sizes["tensor"], sizes["fsdp"]
    problems = [
        f"tensor={t} does not divide {what}={dim}"
        for what, dim in (
            ("num_attention_heads", model_cfg.num_attention_heads),
            ("intermediate_size", model_cfg.intermediate_size),
            ("vocab_size", model_cfg.vocab_size),
        )
        if dim % t
    ]
    if model_cfg.hidden_size % f:
        problems.append(f"fsdp={f} does not divide hidden_size={model_cfg.hidden_size}")
    try:
        recipe.validate(cfg, model_cfg, sizes["data"] * sizes["fsdp"], context=sizes["context"])
    except UserError as e:
        problems.append(str(e))
    if cfg.model.attention == "splash":  # its shard_map takes only some meshes
        try:
            splash_partition(
                abstract_mesh(sizes),
                DEFAULT_RULES,
                cfg.data.batch_size // cfg.train.micro_batches,
                model_cfg.num_attention_heads,
                model_cfg.num_key_value_heads,
            )
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise PlanError("the mesh does not fit the model / batch: " + "; ".join(problems))
    if model_cfg.num_key_value_heads % t:
        return [
            f"tensor={t} does not divide num_key_value_heads={model_cfg.num_key_value_heads}: "
            "k/v projections are replicated over the tensor axis"
        ]
    return []
