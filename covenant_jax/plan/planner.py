"""``plan``: checks, the compile (or the GPU formula), the search when it does not fit, and the
compiler's step time estimate when asked."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from covenant_jax.config import ModelConfig
from covenant_jax.errors import PlanError
from covenant_jax.plan.analytic import estimate_memory
from covenant_jax.plan.checks import check_mesh, mesh_shape, model_config
from covenant_jax.plan.compile import Memory, StepCompiler
from covenant_jax.plan.search import candidates, with_changes
from covenant_jax.plan.step_time import EstimateUnavailable, StepTimeEstimate, estimate_step_time
from covenant_jax.plan.topology import Topology, resolve_topology
from covenant_jax.train import program, recipe


@dataclasses.dataclass
class Attempt:
    changes: dict[str, Any]  # recipe fields changed from the recipe (empty: as written)
    mesh: dict[str, int]
    memory: Memory | None
    fits: bool | None
    compile_seconds: float = 0.0
    compiled_flops_per_device: float | None = None  # XLA's count: a loop body once
    skipped: str = ""  # why it was not compiled (e.g. arguments alone exceed HBM)
    step_time: StepTimeEstimate | None = None  # the compiler's estimate, when asked for

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["memory"] = self.memory.to_dict() if self.memory else None
        d["step_time"] = self.step_time.to_dict() if self.step_time else None
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
    step_time_unavailable: str = ""  # why no step time estimate, when one was asked for

    @property
    def fits(self) -> bool | None:
        return self.attempt.fits

    @property
    def step_time(self) -> StepTimeEstimate | None:
        """The estimate of the step that fits: the recipe's, else the suggestion's."""
        return self.attempt.step_time or (self.suggestion.step_time if self.suggestion else None)

    def to_dict(self) -> dict:
        peak = self.topology.peak_flops
        return {
            "recipe": self.recipe,
            "topology": self.topology.to_dict(),
            "model": self.model,
            "train": self.train,
            "mesh": self.attempt.mesh,
            "fits": self.fits,
            "memory_per_device": self.attempt.memory.to_dict() if self.attempt.memory else None,
            "hbm_per_device": self.topology.hbm_per_device,
            "flops": {
                "model_flops_per_step": self.model_flops_per_step,
                "model_flops_per_chip": self.model_flops_per_step / self.topology.chips,
                # XLA's cost analysis: a scan / while body is counted once, not per iteration
                "compiled_flops_per_device": self.attempt.compiled_flops_per_device,
                "step_seconds_at_100pct_mfu": self.model_flops_per_step / peak if peak else None,
            },
            "step_time_estimate": self.step_time.to_dict() if self.step_time else None,
            "step_time_unavailable": self.step_time_unavailable or None,
            "compile_seconds": self.attempt.compile_seconds,
            "warnings": self.warnings,
            "suggestion": self.suggestion.to_dict() if self.suggestion else None,
            "tried": [a.to_dict() for a in self.tried],
        }


def plan(
    cfg,
    topology: str | Topology,
    *,
    search: bool = True,
    max_candidates: int = 6,
    hbm_bytes: int | None = None,
    recipe_name: str = "",
    log: Callable[[str], None] | None = None,
    step_time: bool = False,
    compiler: StepCompiler | None = None,
) -> Plan:
    """Plans ``cfg`` (a recipe ConfigDict) on ``topology``: does its train step fit, and if not,
    which of a few changes does. ``step_time``: also estimate the fitting step's time from the
    TPU compiler's cost model (two more compiles). ``compiler``: share compiles between calls."""
    recipe.check_fields(cfg)
    topo = topology if isinstance(topology, Topology) else resolve_topology(topology)
    if hbm_bytes:
        topo = dataclasses.replace(topo, hbm_per_device=int(hbm_bytes))
    compiler = compiler or StepCompiler()
    say = log or (lambda _msg: None)
    model_cfg = model_config(cfg)
    sizes = mesh_shape(cfg, topo.num_devices)
    warnings = check_mesh(cfg, model_cfg, sizes) + _platform_warnings(cfg, topo)
    say(
        f"{'estimating' if topo.platform == 'gpu' else 'compiling'} {recipe_name or 'recipe'} for "
        f"{topo.spec or topo.name} (mesh {sizes}) ..."
    )
    tokens = cfg.data.batch_size * cfg.data.seq_len
    result = Plan(
        recipe_name,
        topo,
        _model_summary(model_cfg),
        _train_summary(cfg),
        _attempt(cfg, model_cfg, topo, {}, compiler, search=False),
        program.flops_per_token(cfg, model_cfg) * tokens,
        warnings,
    )
    fitting = cfg
    if not result.fits and search:
        fitting = _search(result, cfg, model_cfg, topo, sizes, compiler, max_candidates, say)
    if step_time:
        _estimate(result, fitting, model_cfg, topo, compiler, say)
    return result


def _attempt(
    cfg, model_cfg: ModelConfig, topo: Topology, changes: dict, compiler: StepCompiler, search: bool
) -> Attempt:
    sizes = mesh_shape(cfg, topo.num_devices)
    if topo.platform == "gpu":
        memory = estimate_memory(cfg, model_cfg, sizes)
        return Attempt(changes, sizes, memory, _fits(memory, topo))
    if search:  # skip a compile the arguments alone rule out
        too_large = state_exceeds_hbm(cfg, model_cfg, sizes, topo)
        if too_large:
            return Attempt(changes, sizes, None, False, skipped=too_large)
    step = compiler.compile(cfg, model_cfg, topo, sizes)
    flops = step.cost.get("flops", -1)
    return Attempt(
        changes, sizes, step.memory, _fits(step.memory, topo), step.seconds, flops if flops > 0 else None
    )


def state_exceeds_hbm(cfg, model_cfg: ModelConfig, sizes: dict[str, int], topo: Topology) -> str:
    """Why the state alone cannot fit a device (params, optimizer state and frozen weights: exact
    bytes from the shardings), or "" when it can."""
    memory = estimate_memory(cfg, model_cfg, sizes)
    state_bytes = memory.params + memory.opt_state + memory.frozen
    if state_bytes <= topo.hbm_per_device:
        return ""
    return (
        f"params, optimizer state and frozen weights alone are {state_bytes:,} bytes per device "
        f"> HBM {topo.hbm_per_device:,}"
    )


def _search(
    result: Plan,
    cfg,
    model_cfg: ModelConfig,
    topo: Topology,
    sizes: dict[str, int],
    compiler: StepCompiler,
    max_candidates: int,
    say: Callable[[str], None],
):
    """Tries candidates until one fits (``result.suggestion``); returns its recipe, or None."""
    for changes in candidates(cfg, model_cfg, sizes):
        if len(result.tried) >= max_candidates:
            break
        candidate = with_changes(cfg, changes)
        try:
            check_mesh(candidate, model_cfg, mesh_shape(candidate, topo.num_devices))
        except PlanError:
            continue
        say(f"  does not fit; trying {changes} ...")
        tried = _attempt(candidate, model_cfg, topo, changes, compiler, search=True)
        result.tried.append(tried)
        if tried.fits:
            result.suggestion = tried
            return candidate
    return None


def _estimate(
    result: Plan,
    cfg,
    model_cfg: ModelConfig,
    topo: Topology,
    compiler: StepCompiler,
    say: Callable[[str], None],
) -> None:
    """The compiler's step time estimate of the fitting step (``cfg``: its recipe, None: none fits)."""
    attempt = result.suggestion if result.suggestion else result.attempt
    if topo.platform == "gpu":
        result.step_time_unavailable = "a GPU target (the estimate comes from the TPU compiler)"
    elif cfg is None or not attempt.fits:
        result.step_time_unavailable = "no variant that fits was found"
    else:
        say("estimating the step time: compiling it with 1 and 2 layers, every loop unrolled ...")
        try:
            attempt.step_time = estimate_step_time(
                cfg, model_cfg, topo, attempt.mesh, compiler, result.model_flops_per_step
            )
        except EstimateUnavailable as e:
            result.step_time_unavailable = str(e)


def _fits(memory: Memory, topo: Topology) -> bool:
    return memory.peak <= topo.hbm_per_device


def _platform_warnings(cfg, topo: Topology) -> list[str]:
    if topo.platform != "gpu":
        return []
    warnings = [
        "GPU target: memory is an analytic ESTIMATE (CUDA ahead-of-time compilation needs a "
        "GPU host); params/optimizer/gradient bytes are exact, activations approximate"
    ]
    if cfg.model.attention == "splash":
        warnings.append("attention 'splash' is a TPU kernel; on GPUs use cudnn or blockwise")
    return warnings


def _model_summary(model_cfg: ModelConfig) -> dict:
    return {
        "params": model_cfg.num_params(),
        "layers": model_cfg.num_hidden_layers,
        "hidden_size": model_cfg.hidden_size,
        "vocab_size": model_cfg.vocab_size,
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "rope": model_cfg.rope.rope_type,
    }


def _train_summary(cfg) -> dict:
    return {
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.data.batch_size,
        "micro_batches": cfg.train.micro_batches,
        "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
        "remat": cfg.model.remat,
        "attention": cfg.model.attention,
        "param_dtype": cfg.model.param_dtype,
        "dtype": cfg.model.dtype,
        "loss_chunk_size": cfg.train.loss_chunk_size,
    }
