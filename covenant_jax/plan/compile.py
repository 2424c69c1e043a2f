"""The train step compiled ahead of time for a TPU topology, and what the compiler reports of it.

The step is ``train.program``'s, the one the loop runs: the abstract state and ``[A, b, T]``
batch carry their NamedShardings on a mesh over the topology's compile-only devices, and
``make_steps(...).train_step`` is lowered inside ``activation_sharding(mesh)``. Memory per device
comes from ``memory_analysis()``; a program over HBM is refused by the compiler itself
(RESOURCE_EXHAUSTED, within seconds), and its message gives the temporaries. The cost analysis
(FLOPs, bytes, ``optimal_seconds``) is read per device. A compile may run in a child process
(``isolated``), so that a crash inside libtpu (seen once: a segfault compiling an unrolled step
for v5e:2x2) ends the child, not ``plan``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import re
import signal
import time

import jax
import numpy as np

from covenant_jax.config import ModelConfig
from covenant_jax.hardware import GiB
from covenant_jax.model.llama import ModelOptions
from covenant_jax.parallel.sharding import activation_sharding, make_mesh
from covenant_jax.plan.topology import Topology, resolve_topology
from covenant_jax.train import program

_OVER_HBM = re.compile(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")
COST_KEYS = ("flops", "bytes accessed", "optimal_seconds")
# Custom calls libtpu's cost model gives -1 s each in ``optimal_seconds`` (measured: tiny steps
# came out at exactly -N s plus a few ms, N the "ConcatBitcast" calls in the entry computation:
# layout-only joins of slices the compiler prefetched to VMEM). Counted as "uncosted_calls".
UNCOSTED_CALLS = ("ConcatBitcast",)


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
    frozen: int = 0  # of the arguments: weights read, never trained (a LoRA base, DPO's reference)
    estimate: bool = False  # True: a formula, not a compile (GPU targets)
    note: str = ""  # e.g. the compiler's out-of-memory message (temporaries then come from it)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompiledStep:
    memory: Memory
    cost: dict[str, float]  # COST_KEYS of cost_analysis() per device, uncosted_calls; {} when refused
    seconds: float  # how long compiling took

    @property
    def refused(self) -> bool:
        return bool(self.memory.note)


class StepCompiler:
    """Compiles train steps, each (recipe, model shape, topology, mesh, options) once: a fitting
    72B step takes minutes, and a search or several plans in one process meet the same one again.
    Pass one to several ``plan`` calls to share what it compiled."""

    def __init__(self):
        self._done: dict[tuple, CompiledStep] = {}

    def compile(
        self,
        cfg,
        model_cfg: ModelConfig,
        topo: Topology,
        sizes: dict[str, int],
        options: ModelOptions | None = None,
        unroll: bool = False,
        isolated: bool = False,
    ) -> CompiledStep:
        """``options`` / ``unroll``: as ``program.abstract_state`` / ``program.make_steps`` take
        them. ``isolated``: in a child process (``compile_in_child``)."""
        key = (
            cfg.to_json_best_effort(sort_keys=True),
            model_cfg,
            topo.spec,
            tuple(sorted(sizes.items())),
            options,
            unroll,
        )
        if key not in self._done:
            run = compile_in_child if isolated else compile_step
            self._done[key] = run(cfg, model_cfg, topo, sizes, options, unroll)
        return self._done[key]


def compile_step(
    cfg,
    model_cfg: ModelConfig,
    topo: Topology,
    sizes: dict[str, int],
    options: ModelOptions | None = None,
    unroll: bool = False,
) -> CompiledStep:
    """Lowers and compiles the train step for ``topo``'s devices."""
    mesh = make_mesh(sizes, devices=topo.devices)
    abstract = program.abstract_state(cfg, model_cfg, mesh, options)
    steps = program.make_steps(
        cfg,
        abstract.graphdef,
        abstract.rest,
        abstract.tx,
        abstract.schedule,
        abstract.shardings,
        mesh,
        unroll=unroll,
    )
    batch = program.abstract_batch(
        cfg.data.batch_size, cfg.data.seq_len, cfg.train.micro_batches, steps.batch_sharding, steps.fields
    )
    started = time.time()
    try:
        with activation_sharding(mesh):
            compiled = steps.train_step.lower(abstract.state, batch).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program over HBM
        found = _OVER_HBM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        return CompiledStep(_refused_memory(abstract.state, batch, found), {}, time.time() - started)
    seconds = time.time() - started
    return CompiledStep(_memory(compiled, abstract.state), _cost(compiled), seconds)


class CompileFailed(Exception):
    """A compile in a child process that returned no program: the process died or raised."""


def compile_in_child(
    cfg,
    model_cfg: ModelConfig,
    topo: Topology,
    sizes: dict[str, int],
    options: ModelOptions | None = None,
    unroll: bool = False,
) -> CompiledStep:
    """``compile_step`` in a fresh process; ``CompileFailed`` with the reason when the compiler
    crashes or raises there."""
    return in_child(_compile_here, cfg, model_cfg, topo.name, topo.spec, sizes, options, unroll)


def in_child(fn, *args):
    """``fn(*args)`` in a spawned process (forking one that runs JAX's threads is unsafe);
    ``CompileFailed`` naming the error it raised or the signal that ended it."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_run_and_send, args=(send, fn, args), daemon=True)
    child.start()
    send.close()  # the child holds the only writer: its death ends recv() with EOFError
    try:
        ok, value = receive.recv()
    except EOFError:
        child.join()
        raise CompileFailed(f"the compiling process died ({_exit_reason(child.exitcode)})") from None
    finally:
        receive.close()
    child.join()
    if not ok:
        raise CompileFailed(value)
    return value


def _run_and_send(send, fn, args) -> None:
    try:
        result = (True, fn(*args))
    except Exception as e:  # sent as one line: a JaxRuntimeError may not pickle
        first = str(e).splitlines()[0] if str(e) else ""
        result = (False, f"{type(e).__name__}: {first}")
    send.send(result)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _compile_here(
    cfg,
    model_cfg: ModelConfig,
    name: str,
    spec: str,
    sizes: dict[str, int],
    options: ModelOptions | None,
    unroll: bool,
) -> CompiledStep:
    """The child's side: the topology's devices again (devices do not cross processes)."""
    topo = dataclasses.replace(resolve_topology(spec), name=name)
    return compile_step(cfg, model_cfg, topo, sizes, options, unroll)


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _memory(compiled, state: dict) -> Memory:
    stats = compiled.memory_analysis()
    summed = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.generated_code_size_in_bytes
    )
    # The TPU runtime reserves the whole temp allocation, so the sum is what the step holds;
    # XLA's own peak (heap simulation) is taken when it is larger (seen for tiny programs).
    peak = max(summed, int(getattr(stats, "peak_memory_in_bytes", 0) or 0))
    return Memory(
        stats.argument_size_in_bytes,
        stats.output_size_in_bytes,
        stats.alias_size_in_bytes,
        stats.temp_size_in_bytes,
        stats.generated_code_size_in_bytes,
        peak,
        device_bytes(state["params"]),
        device_bytes(state["opt_state"]),
        device_bytes(state.get("frozen", {})),
    )


def _refused_memory(state: dict, batch: dict, found: re.Match) -> Memory:
    """What the compiler's out-of-memory message says: its temporaries, plus the arguments."""
    state_bytes = device_bytes(state)
    arguments = state_bytes + device_bytes(batch)
    temporaries = int(float(found.group(1)) * GiB)
    return Memory(
        arguments,
        state_bytes,
        state_bytes,
        temporaries,
        0,
        arguments + temporaries,
        device_bytes(state["params"]),
        device_bytes(state["opt_state"]),
        device_bytes(state.get("frozen", {})),
        note=f"compiler: temporaries {found.group(1)}G exceed the available HBM "
        f"{found.group(2)}G (compile stopped there)",
    )


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    found = {k: float(cost[k]) for k in COST_KEYS if cost and k in cost}
    return {**found, "uncosted_calls": float(entry_calls(compiled.as_text(), UNCOSTED_CALLS))}


def entry_calls(hlo: str, targets: tuple[str, ...]) -> int:
    """How many custom calls to ``targets`` the optimized HLO's entry computation holds."""
    start = hlo.find("\nENTRY ")
    entry = hlo[start : hlo.find("\n}", start)] if start >= 0 else ""
    return sum(entry.count(f'custom_call_target="{t}"') for t in targets)
