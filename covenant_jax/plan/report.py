"""A plan as a person reads it, or as JSON."""

from __future__ import annotations

import json

from covenant_jax.hardware import GiB
from covenant_jax.plan.compile import Memory
from covenant_jax.plan.planner import Plan
from covenant_jax.plan.search import changes_text
from covenant_jax.plan.step_time import StepTimeEstimate


def report(p: Plan) -> str:
    topo = p.topology
    lines = [
        f"plan: {p.recipe or 'recipe'} on {topo.name}"
        + (f" (libtpu {topo.spec})" if topo.spec else "")
        + f": {topo.chips} chips, {topo.num_devices} devices, HBM {_gib(topo.hbm_per_device)} per device",
        f"  model:  {p.model['params'] / 1e9:.2f}B params, {p.model['layers']} layers; "
        f"seq {p.train['seq_len']} x batch {p.train['batch_size']} "
        f"({p.train['micro_batches']} micro-batches), remat {p.train['remat']}, attention {p.train['attention']}",
        "  mesh:   " + " ".join(f"{k}={v}" for k, v in p.attempt.mesh.items()),
    ]
    if p.attempt.memory:
        lines += _memory_lines(p.attempt.memory, topo.hbm_per_device)
    lines.append(f"  verdict: {({True: 'FITS', False: 'DOES NOT FIT', None: 'unknown'})[p.fits]}")
    lines += _flops_lines(p)
    if p.step_time:
        lines += _step_time_lines(
            p.step_time, p.model["layers"], "" if p.attempt.step_time else "the suggestion's "
        )
    elif p.step_time_unavailable:
        lines.append(
            f"  step time, ESTIMATE from the TPU compiler's cost model: n/a ({p.step_time_unavailable})"
        )
    if p.attempt.compile_seconds:
        lines.append(f"  compile: {p.attempt.compile_seconds:.1f} s")
    lines += [f"  warning: {w}" for w in p.warnings]
    for t in p.tried:
        status = ("fits" if t.fits else "does not fit") if not t.skipped else f"skipped: {t.skipped}"
        peak = f"peak {_gib(t.memory.peak)}" if t.memory else ""
        lines.append(f"  tried {changes_text(t.changes)}: {peak} {status}".rstrip())
    if p.fits is False:
        if p.suggestion:
            lines.append(f"  suggestion: {changes_text(p.suggestion.changes)}")
        else:
            lines.append(
                "  no candidate fits; use more chips, optim.mu_dtype=bfloat16, or a smaller batch / seq_len"
            )
    return "\n".join(lines)


def to_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=2, default=str)


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


def _memory_lines(m: Memory, hbm: int) -> list[str]:
    return [
        f"  memory per device{' (ESTIMATE)' if m.estimate else ''}:",
        f"    arguments      {_gib(m.arguments):>12}  (params {_gib(m.params)}, optimizer state {_gib(m.opt_state)}"
        + (f", frozen weights {_gib(m.frozen)}" if m.frozen else "")
        + ", batch)",
        f"    outputs        {_gib(m.outputs):>12}  ({_gib(m.aliased)} of it written into the donated state)",
        f"    temporaries    {_gib(m.temporaries):>12}",
        f"    generated code {_gib(m.generated_code):>12}",
        f"    peak           {_gib(m.peak):>12}  = {m.peak / hbm:.0%} of HBM",
    ] + ([f"    ({m.note})"] if m.note else [])


def _flops_lines(p: Plan) -> list[str]:
    d = p.to_dict()["flops"]
    flops = (
        f"  flops:  model {d['model_flops_per_step']:.3e} per step ({d['model_flops_per_chip']:.3e} per chip)"
    )
    if d["compiled_flops_per_device"]:
        flops += (
            f"; XLA cost analysis {d['compiled_flops_per_device']:.3e} per device (loop bodies counted once)"
        )
    lines = [flops]
    if d["step_seconds_at_100pct_mfu"]:
        lines.append(f"          >= {d['step_seconds_at_100pct_mfu']:.2f} s per step at 100% MFU")
    return lines


def _step_time_lines(e: StepTimeEstimate, layers: int, whose: str) -> list[str]:
    compiled = ", ".join(f"{n} layer{'s' * (n > 1)} {t:.3f} s" for n, t in enumerate(e.compiled_seconds, 1))
    return [
        f"  step time, {whose}ESTIMATE from the TPU compiler's cost model (not a measurement): "
        f"{e.seconds:.2f} s per step = {e.mfu:.0%} MFU",
        f"          cost model (optimal_seconds, every loop unrolled): {compiled} -> {layers} layers "
        f"{e.layers_seconds:.2f} s",
        f"          + attention core at 100% of peak {e.attention_core_seconds:.2f} s (the cost model "
        "cannot see into the attention kernels; compiled with a stand-in)",
        "          not counted: input pipeline and host time, how far communication overlaps compute "
        "on the real slice, the attention kernel's own speed",
    ]
