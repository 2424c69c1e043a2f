"""The TPU compiler's own estimate of a step's time: libtpu's cost model, made to count the step.

``cost_analysis()`` of a compiled step holds ``optimal_seconds``, the cost model's time for one
step on one device. Compiled as the loop runs it, the step is not what the model counts: a loop
body is counted once whatever its trip count (a whole scanned 72B step came out at 1/64 of its
FLOPs, and a negative time), and nothing inside a Pallas kernel is counted. So the estimate
compiles the step twice more, with 1 and 2 layers, with every loop unrolled (layers,
micro-batches, loss chunks: ``ModelOptions.scan_unroll``, ``make_steps(unroll=True)``; at most
``MAX_LOSS_CHUNKS`` loss chunks) and the attention core replaced by an elementwise stand-in
(``attention.cost_model_stand_in``), each in a child process (a libtpu crash is a reason, not the
end of ``plan``); then

    t(L) = t(1) + (L - 1) x (t(2) - t(1)) + attention core

with the attention core's FLOPs (the model FLOPs' 12·L·N·H·T per token, +4·L·N·H·T when remat
recomputes the forward) taken at 100% of the chips' peak: the cost model sees neither splash
(a Pallas kernel) nor blockwise's loops (data-dependent bounds), and causal kernels skip about
half of those FLOPs while running below peak. A cost-model estimate, never a measurement.
"""

from __future__ import annotations

import dataclasses

from covenant_jax.config import ModelConfig
from covenant_jax.model.attention import COST_MODEL_STAND_IN
from covenant_jax.plan.compile import CompiledStep, CompileFailed, StepCompiler
from covenant_jax.plan.search import with_changes
from covenant_jax.plan.topology import Topology
from covenant_jax.train.metrics import attention_flops_per_token
from covenant_jax.train.program import model_options

MAX_LOSS_CHUNKS = 8  # per micro-batch, in the estimate's unrolled compiles (``few_loss_chunks``)
SOURCE = (
    "libtpu's cost model (cost_analysis optimal_seconds) of the step with 1 and 2 layers, every "
    "loop unrolled, extrapolated to all layers, plus the attention core at 100% of peak: an "
    "ESTIMATE, not a measurement"
)


@dataclasses.dataclass
class StepTimeEstimate:
    seconds: float  # the estimated step time
    mfu: float  # model FLOPs per step / (seconds x the slice's peak FLOP/s)
    compiled_seconds: tuple[float, ...]  # optimal_seconds with 1 and 2 layers
    layers_seconds: float  # t(1) + (L - 1) x per layer: everything but the attention core
    attention_core_seconds: float  # its FLOPs at 100% of peak
    compiled_flops_per_device: float  # the cost model's FLOPs, extrapolated to L layers
    attention_core_flops_per_device: float
    compile_seconds: float
    source: str = SOURCE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class EstimateUnavailable(Exception):
    """The estimate's own compile was refused (its reason is the message)."""


def estimate_step_time(
    cfg,
    model_cfg: ModelConfig,
    topo: Topology,
    sizes: dict[str, int],
    compiler: StepCompiler,
    model_flops_per_step: float,
) -> StepTimeEstimate:
    """See the module docstring; ``EstimateUnavailable`` when the compiler refuses a program."""
    layers = model_cfg.num_hidden_layers
    steps = [
        unrolled_step(cfg, model_cfg, n, topo, sizes, compiler) for n in ((1, 2) if layers > 1 else (1,))
    ]
    compiled = [compiled_seconds(s) for s in steps]
    if min(compiled) <= 0:
        raise EstimateUnavailable(f"the cost model returned a step time of {min(compiled):.3g} s")
    core_flops = attention_core_flops(cfg, model_cfg)
    seconds = extrapolate(compiled, layers) + core_flops / topo.peak_flops
    return StepTimeEstimate(
        seconds=seconds,
        mfu=model_flops_per_step / (seconds * topo.peak_flops),
        compiled_seconds=tuple(compiled),
        layers_seconds=extrapolate(compiled, layers),
        attention_core_seconds=core_flops / topo.peak_flops,
        compiled_flops_per_device=extrapolate([s.cost["flops"] for s in steps], layers),
        attention_core_flops_per_device=core_flops / topo.num_devices,
        compile_seconds=sum(s.seconds for s in steps),
    )


def unrolled_step(
    cfg, model_cfg: ModelConfig, layers: int, topo: Topology, sizes: dict[str, int], compiler: StepCompiler
) -> CompiledStep:
    """The step with ``layers`` layers, every loop unrolled, the attention core stood in;
    compiled in a child process, so that a compiler crash is a reason, not the end of plan."""
    options = dataclasses.replace(model_options(cfg), scan_unroll=True, attention=COST_MODEL_STAND_IN)
    try:
        step = compiler.compile(
            few_loss_chunks(cfg),
            dataclasses.replace(model_cfg, num_hidden_layers=layers),
            topo,
            sizes,
            options,
            unroll=True,
            isolated=True,
        )
    except CompileFailed as e:
        raise EstimateUnavailable(f"{layers}-layer unrolled compile failed: {e}") from None
    if step.refused or "optimal_seconds" not in step.cost:
        raise EstimateUnavailable(
            f"{layers}-layer unrolled compile: "
            f"{step.memory.note or 'the compiler reported no optimal_seconds'}"
        )
    return step


def few_loss_chunks(cfg):
    """The recipe with at most ``MAX_LOSS_CHUNKS`` loss chunks per micro-batch: the same FLOPs in
    fewer, larger matmuls, so that the unrolled program stays small (the 72B SFT recipe's 1024-token
    chunks are 512 per micro-batch). The estimate's compiles hold 1 or 2 layers, so the larger
    logits fit where the recipe's layers do."""
    tokens = cfg.data.batch_size // cfg.train.micro_batches * cfg.data.seq_len
    chunk = max(cfg.train.loss_chunk_size, -(-tokens // MAX_LOSS_CHUNKS))
    return cfg if chunk == cfg.train.loss_chunk_size else with_changes(cfg, {"train.loss_chunk_size": chunk})


def compiled_seconds(step: CompiledStep) -> float:
    """The cost model's ``optimal_seconds`` with the -1 s it gives each custom call it cannot
    cost added back (``compile.UNCOSTED_CALLS``)."""
    return step.cost["optimal_seconds"] + step.cost["uncosted_calls"]


def extrapolate(values: list[float], layers: int) -> float:
    """v(1) + (layers - 1) x (v(2) - v(1)): a step is its layers plus what is outside them."""
    if len(values) == 1:
        return values[0]
    return values[0] + (layers - 1) * (values[1] - values[0])


def attention_core_flops(cfg, model_cfg: ModelConfig) -> float:
    """FLOPs per step of the attention core as the model FLOPs count it (q·k and p·v over the
    whole row, forward and backward), plus the forward again when remat recomputes it."""
    per_token = attention_flops_per_token(model_cfg, cfg.data.seq_len)
    if cfg.model.remat != "none":
        per_token *= 4 / 3
    return per_token * cfg.data.batch_size * cfg.data.seq_len
