"""Will a recipe fit a pod? Compile the real train step ahead of time for a TPU topology.

No weights are read and no TPU is needed: libtpu (``pip install -e '.[tpu]'``) describes a TPU
topology's devices and the real TPU compiler compiles for them on this host. The package, in the
order a plan runs:

- ``topology``: names (``v5p-256``, ``v5e:16x16``, ``h100:8``) -> devices, HBM, peak FLOP/s
  (from ``covenant_jax.hardware``, the table the training loop's MFU reads);
- ``checks``: the model's shape from the recipe's config.json, the mesh sized as ``make_mesh``
  sizes it, the recipe's own validation and the splits the model and splash need;
- ``compile``: ``train.program``'s step lowered on abstract state and batch and compiled; memory
  per device from ``memory_analysis()`` (or the compiler's refusal over HBM), its cost analysis;
- ``analytic``: the memory formula for GPU targets (CUDA cannot be compiled ahead of time here);
- ``search``: when it does not fit, recipe changes to try (remat, micro-batches, mesh, loss chunk);
- ``step_time``: the compiler's cost-model estimate of the step time (opt-in; an estimate, not
  a measurement);
- ``planner``: ``plan()``, which runs the above; ``report``: the text and JSON.
"""

from covenant_jax.errors import PlanError
from covenant_jax.hardware import GiB
from covenant_jax.plan.checks import check_mesh, mesh_shape, model_config
from covenant_jax.plan.compile import CompiledStep, Memory, StepCompiler
from covenant_jax.plan.planner import Attempt, Plan, plan
from covenant_jax.plan.report import report, to_json
from covenant_jax.plan.step_time import StepTimeEstimate, estimate_step_time
from covenant_jax.plan.topology import Topology, parse_topology, resolve_topology

__all__ = [
    "Attempt",
    "CompiledStep",
    "GiB",
    "Memory",
    "Plan",
    "PlanError",
    "StepCompiler",
    "StepTimeEstimate",
    "Topology",
    "check_mesh",
    "estimate_step_time",
    "mesh_shape",
    "model_config",
    "parse_topology",
    "plan",
    "report",
    "resolve_topology",
    "to_json",
]
