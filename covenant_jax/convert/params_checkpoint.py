"""The converted-model folder: an Orbax checkpoint of the parameters plus the HF side files.

Layout::

    CKPT_DIR/params/          Orbax PyTree checkpoint (nested dict of arrays, our param paths)
    CKPT_DIR/config.json      the HF config (the model's shape; untouched fields survive)
    CKPT_DIR/covenant.json    {"param_dtype": ...}
    CKPT_DIR/tokenizer*, chat_template.jinja, generation_config.json   copied from the source

Restores go straight onto the target shardings. Conversion writes and reads this folder a
slice at a time instead (``param_store``); the format is the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from covenant_jax import storage
from covenant_jax.config import ModelConfig
from covenant_jax.model.llama import Llama, ModelOptions, abstract_model
from covenant_jax.parallel.sharding import DEFAULT_RULES, make_mesh, state_shardings
from covenant_jax.errors import CheckpointError

PARAMS = "params"
META = "covenant.json"


def is_params_checkpoint(path: str | Path) -> bool:
    path = storage.path(path)
    return (path / PARAMS).is_dir() and (path / META).is_file()


def write_meta(cfg: ModelConfig, param_dtype: str, out_dir: Path) -> None:
    """config.json and covenant.json (process 0)."""
    if jax.process_index() == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        (out_dir / META).write_text(json.dumps({"param_dtype": param_dtype}) + "\n")


def read_meta(ckpt_dir: str | Path) -> tuple[ModelConfig, str]:
    ckpt_dir = storage.path(ckpt_dir)
    if not is_params_checkpoint(ckpt_dir):
        raise CheckpointError(
            f"{ckpt_dir}: not a converted checkpoint (it needs {PARAMS}/ and {META}, as "
            "`covenant-jax convert hf-to-jax` writes them); an HF folder is read directly"
        )
    cfg = ModelConfig.from_json_file(ckpt_dir / "config.json")
    return cfg, json.loads((ckpt_dir / META).read_text())["param_dtype"]


def _restore(ckpt_dir: Path, abstract_pure: dict) -> dict:
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_pure)
    args = ocp.args.PyTreeRestore(item=abstract_pure, restore_args=restore_args)
    return ocp.PyTreeCheckpointer().restore(storage.path(ckpt_dir) / PARAMS, args=args)


def _abstract_params(cfg: ModelConfig, opts: ModelOptions, mesh: Mesh, rules: Mapping):
    graphdef, params, rest = nnx.split(abstract_model(cfg, opts), nnx.Param, ...)
    shardings = state_shardings(params, mesh, rules)
    abstract = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s),
        params,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return graphdef, params, rest, abstract


def load_params_checkpoint(
    ckpt_dir: str | Path,
    opts: ModelOptions | None = None,
    mesh: Mesh | None = None,
    rules: Mapping = DEFAULT_RULES,
) -> Llama:
    """Restores a converted folder onto ``mesh`` (stored dtype unless ``opts`` says otherwise)."""
    cfg, stored_dtype = read_meta(ckpt_dir)
    opts = opts or ModelOptions(param_dtype=stored_dtype, dtype=stored_dtype)
    graphdef, params, rest, abstract = _abstract_params(cfg, opts, mesh or make_mesh(), rules)
    stored = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, stored_dtype, sharding=a.sharding), nnx.to_pure_dict(abstract)
    )
    restored = _restore(ckpt_dir, stored)
    restored = jax.tree.map(lambda x: x.astype(opts.param_dtype), restored)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)
