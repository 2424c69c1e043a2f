"""`plan`: the real TPU compiler (libtpu, no TPU) on a tiny model; analytic checks of its numbers."""

import dataclasses
import json
import math
import os

import pytest

from covenant_jax import plan as plan_lib
from covenant_jax.cli import load_recipe, main
from covenant_jax.errors import UserError
from covenant_jax.plan import compile as plan_compile, planner, step_time
from covenant_jax.train import program
from covenant_jax.train.metrics import attention_flops_per_token, train_flops_per_token

pytest.importorskip("libtpu", reason="plan needs libtpu: pip install -e '.[tpu]'")

# Shard shapes are multiples of the TPU's (8, 128) float32 tiles, so the compiler's argument
# bytes equal the analytic ones (no tile padding): 16 heads of 128 over tensor=2, 8 layers.
TINY = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=128,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TOPOLOGY = "v5e:2x2"  # 4 chips, 16 GiB each


RECIPE = """
from covenant_jax.train.recipe import default_config


def get_config():
    cfg = default_config()
    cfg.model.path = {path!r}
    cfg.model.attention = "naive"
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = "save_dots"
    cfg.data.seq_len, cfg.data.batch_size = 2048, 16
    cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2
    return cfg
"""


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps(TINY))
    (path / "recipe.py").write_text(RECIPE.format(path=str(path)))
    return str(path / "recipe.py")


@pytest.fixture(scope="module")
def tiny_cfg(tiny_recipe):
    return load_recipe(tiny_recipe, [])


@pytest.fixture(scope="module")
def compiler():
    """One compile per (recipe, topology, mesh) across this module's plans."""
    return plan_lib.StepCompiler()


@pytest.fixture(scope="module")
def tiny_plan(tiny_cfg, compiler):
    return plan_lib.plan(tiny_cfg, TOPOLOGY, search=False, compiler=compiler)


def _params_per_device(c: dict, fsdp: int, tensor: int) -> int:
    """Every matrix is split over fsdp (hidden) x tensor (heads / mlp / vocab); norms replicated."""
    d, f, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    n, k, h = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    matrices = 2 * v * d + layers * (d * n * h * 2 + d * k * h * 2 + 3 * d * f)
    norms = (2 * layers + 1) * d
    return matrices // (fsdp * tensor) + norms


def test_topology_names():
    assert plan_lib.parse_topology("v5p-256") == ("tpu", "v5p", "v5p:4x4x8")  # 256 cores = 128 chips
    assert plan_lib.parse_topology("v5p-512")[2] == "v5p:4x8x8"
    assert plan_lib.parse_topology("v5e-64")[2] == "v5e:8x8"
    assert plan_lib.parse_topology("v5litepod-256")[2] == "v5e:16x16"
    assert plan_lib.parse_topology("v4-128")[2] == "v4:4x4x4"
    assert plan_lib.parse_topology("v5e:16x16")[2] == "v5e:16x16"
    assert plan_lib.parse_topology("h100:8") == ("gpu", "h100", "8")
    topo = plan_lib.resolve_topology("v5p-256")
    assert (topo.chips, topo.num_devices, topo.hbm_per_device) == (128, 128, 95 * plan_lib.GiB)


@pytest.mark.parametrize(
    "name,spec,chips,devices",
    [
        ("v5e-1", "v5e:1x1", 1, 1),
        ("v6e-1", "v6e:1x1", 1, 1),
        ("v5litepod-4", "v5e:2x2", 4, 4),
        ("v5p-8", "v5p:2x2x1", 4, 4),
        ("v4-8", "v4:2x2x1", 4, 8),
        ("v6e:1x1", "v6e:1x1", 1, 1),
    ],
)
def test_small_real_slices_resolve(name, spec, chips, devices):
    """Single-chip slices (v5e-1, v6e-1) and the smallest 3D ones (v5p-8, v4-8: 2x2x1) are what
    Cloud TPU sells; libtpu takes them given a host no larger than the slice."""
    topo = plan_lib.resolve_topology(name)
    assert (topo.spec, topo.chips, topo.num_devices) == (spec, chips, devices)


@pytest.mark.parametrize("name", ["tpu9-64", "v5p-3", "v7x"])
def test_unknown_topology_is_named(name):
    with pytest.raises(plan_lib.PlanError, match=name):
        plan_lib.resolve_topology(name)


def test_tiny_plan_fits_and_arguments_are_the_state(tiny_plan, tiny_cfg):
    m = tiny_plan.attempt.memory
    assert tiny_plan.fits is True and not m.estimate
    assert min(m.arguments, m.outputs, m.temporaries, m.generated_code, m.peak) > 0
    params = 4 * _params_per_device(TINY, fsdp=2, tensor=2)  # float32
    assert m.params == params
    # AdamW: two float32 moments per parameter, plus a few scalars (count, apply_if_finite)
    assert m.opt_state == pytest.approx(2 * params, abs=256)
    rows, t = tiny_cfg.data.batch_size // 2, tiny_cfg.data.seq_len  # rows split over fsdp=2
    batch = 5 * rows * t * 4
    assert m.arguments == pytest.approx(3 * params + batch, rel=0.01)
    assert m.aliased == pytest.approx(3 * params, rel=0.01)  # the donated state is updated in place
    flops = tiny_plan.to_dict()["flops"]
    tokens = tiny_cfg.data.batch_size * tiny_cfg.data.seq_len
    assert flops["model_flops_per_step"] == pytest.approx(
        train_flops_per_token(plan_lib.model_config(tiny_cfg), tiny_cfg.data.seq_len) * tokens
    )
    assert flops["model_flops_per_chip"] == flops["model_flops_per_step"] / 4
    assert flops["compiled_flops_per_device"] > 0  # XLA's count: scan bodies once, so not comparable


def test_dpo_plan_holds_the_frozen_reference_and_the_pair_fields(tiny_cfg, compiler):
    """A DPO recipe compiles with its batch (pair_slot and chosen besides SFT's five fields) and
    its state holds the frozen reference, sharded like the params and donated with the state."""
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.train.objective = "dpo"
    cfg.data.sources = [dict(path="prefs.jsonl", format="dpo")]
    m = plan_lib.plan(cfg, TOPOLOGY, search=False, compiler=compiler).attempt.memory
    params = 4 * _params_per_device(TINY, fsdp=2, tensor=2)
    rows, t = cfg.data.batch_size // 2, cfg.data.seq_len
    assert m.arguments == pytest.approx(4 * params + 7 * rows * t * 4, rel=0.01)
    assert m.aliased == pytest.approx(4 * params, rel=0.01)
    assert m.frozen == params  # the reference, reported on its own


def test_model_flops_count_what_the_step_runs(tiny_cfg):
    """plan's and the MFU's FLOPs per token: DPO adds its in-step reference's forward (2·N and a
    third of the attention), not a precomputed one; LoRA has no base weight gradient."""
    model_cfg = plan_lib.model_config(tiny_cfg)
    seq = tiny_cfg.data.seq_len
    sft = train_flops_per_token(model_cfg, seq)
    attention = attention_flops_per_token(model_cfg, seq)
    matmul = (sft - attention) / 6
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.train.objective = "dpo"
    assert program.flops_per_token(cfg, model_cfg) == pytest.approx(sft + 2 * matmul + attention / 3)
    cfg.dpo.precompute_ref_log_probs = True
    assert program.flops_per_token(cfg, model_cfg) == sft
    cfg.model.lora.enabled = True
    lora = program.lora_config(cfg)
    assert program.flops_per_token(cfg, model_cfg) == train_flops_per_token(model_cfg, seq, lora)
    cfg.dpo.precompute_ref_log_probs = False  # LoRA-DPO: the base runs again, adapters off
    assert program.flops_per_token(cfg, model_cfg) == pytest.approx(
        train_flops_per_token(model_cfg, seq, lora) + 2 * matmul + attention / 3
    )


def test_lora_plan_counts_the_frozen_base(tiny_cfg):
    """A LoRA recipe's frozen base is held on every chip besides the adapters and their moments:
    the estimate's arguments include it, and a slice that cannot hold it is ruled out before any
    compile, naming it."""
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.model.lora.enabled = True
    cfg.model.lora.base_dtype = "bfloat16"
    m = plan_lib.plan(cfg, "h100:4").attempt.memory
    base = 2 * _params_per_device(TINY, fsdp=2, tensor=2)  # bfloat16
    assert m.frozen == base and m.params < base / 2
    assert m.arguments > m.params + m.opt_state + m.frozen
    held = m.params + m.opt_state
    model_cfg, sizes = plan_lib.model_config(cfg), {"data": 1, "fsdp": 2, "context": 1, "tensor": 2}
    small = dataclasses.replace(plan_lib.resolve_topology(TOPOLOGY), hbm_per_device=held + base // 2)
    assert "frozen weights alone are" in planner.state_exceeds_hbm(cfg, model_cfg, sizes, small)
    roomy = dataclasses.replace(small, hbm_per_device=held + base + 1)
    assert planner.state_exceeds_hbm(cfg, model_cfg, sizes, roomy) == ""


def test_not_fitting_is_detected_and_a_fix_is_suggested(tiny_plan, tiny_cfg, compiler):
    # Without remat, naive attention keeps every layer's [rows, heads, T, T] probabilities: 8
    # layers x 8 rows x 8 heads x 2048^2 x 4 bytes = 16 GiB of temporaries per chip, over the v5e's
    # 16 GiB; save_dots (the tiny recipe) fits, and its compile is tiny_plan's (the same compiler).
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.model.remat = "none"
    p = plan_lib.plan(cfg, TOPOLOGY, max_candidates=1, compiler=compiler)
    assert p.fits is False and p.attempt.memory.peak > 16 * plan_lib.GiB
    assert p.attempt.memory.temporaries > 15 * plan_lib.GiB
    assert p.suggestion is not None and p.suggestion.changes == {"model.remat": "save_dots"}
    assert p.suggestion.memory == tiny_plan.attempt.memory and p.suggestion.fits
    assert "suggestion: --config.model.remat=save_dots" in plan_lib.report(p)


def test_state_larger_than_hbm_is_ruled_out_without_compiling(tiny_plan, tiny_cfg, compiler):
    p = plan_lib.plan(tiny_cfg, TOPOLOGY, hbm_bytes=1024, compiler=compiler)  # the baseline: tiny_plan's
    assert p.fits is False and p.suggestion is None
    assert p.tried and all(t.skipped for t in p.tried)


def test_mesh_errors(tiny_cfg):
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.mesh.fsdp, cfg.mesh.tensor = 3, 1
    with pytest.raises(plan_lib.PlanError, match="4"):
        plan_lib.plan(cfg, TOPOLOGY)
    cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4
    ok = plan_lib.check_mesh(
        cfg, plan_lib.model_config(cfg), {"data": 1, "fsdp": 1, "context": 1, "tensor": 4}
    )
    assert ok == []
    cfg.mesh.fsdp, cfg.mesh.tensor = 4, 1
    cfg.data.batch_size = 6
    with pytest.raises(plan_lib.PlanError, match="data-parallel"):
        plan_lib.plan(cfg, TOPOLOGY)


def test_fused_attention_on_the_topology_devices(tiny_plan, tiny_cfg, compiler):
    """The backends' platform check reads the mesh's devices (compile-only TPUs here, on a CPU
    host): splash compiles, shard_map-ped over fsdp x tensor, without naive's [T, T] scores (one
    layer's [8 rows, 8 heads, 2048, 2048] float32 is 1 GiB; measured: 1.6 GiB of temporaries
    against naive's 3.3); cudnn is refused in one line; a context axis, before compiling."""
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.model.attention = "splash"
    p = plan_lib.plan(cfg, TOPOLOGY, search=False, compiler=compiler)
    assert p.fits and p.attempt.memory.temporaries < tiny_plan.attempt.memory.temporaries - plan_lib.GiB
    cfg.model.attention = "cudnn"
    with pytest.raises(
        UserError, match="'cudnn' needs a GPU; use 'blockwise' \\(the devices in use are 'tpu'\\)"
    ):
        plan_lib.plan(cfg, TOPOLOGY, search=False)
    cfg.model.attention = "splash"
    cfg.mesh.fsdp, cfg.mesh.context = 1, 2
    with pytest.raises(plan_lib.PlanError, match="use attention 'context'"):
        plan_lib.plan(cfg, TOPOLOGY)


def test_gpu_is_an_estimate(tiny_cfg):
    p = plan_lib.plan(tiny_cfg, "h100:4")
    m = p.attempt.memory
    assert m.estimate and p.fits is True and any("ESTIMATE" in w for w in p.warnings)
    assert m.params == 4 * _params_per_device(TINY, fsdp=2, tensor=2)
    assert "(ESTIMATE)" in plan_lib.report(p)


def test_cli_json(tiny_recipe, tiny_plan, compiler, capsys, monkeypatch):
    monkeypatch.setattr(plan_lib.planner, "StepCompiler", lambda: compiler)  # tiny_plan's compile
    rc = main(
        ["plan", tiny_recipe, "--topology", TOPOLOGY, "--json", "--no-search", "--config.train.steps=100"]
    )  # an override that changes nothing
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] is True
    assert out["topology"]["libtpu_topology"] == TOPOLOGY and out["mesh"]["fsdp"] == 2
    assert out["memory_per_device"] == tiny_plan.attempt.memory.to_dict()
    assert math.isfinite(out["flops"]["model_flops_per_step"])
    assert main(["plan", tiny_recipe, "--topology", "tpu9-64"]) == 2
    assert "tpu9-64" in capsys.readouterr().err


# ---- the compiler's step time estimate ------------------------------------------------------------

# TINY with grouped kv heads (4 q heads per kv head), 4 layers; 2 micro-batches of 2 loss chunks
# each and remat full, as the pod recipes run: every loop the estimate unrolls is there.
GQA = {**TINY, "num_key_value_heads": 4, "num_hidden_layers": 4}
ESTIMATE_OVERRIDES = [
    "--config.data.seq_len=128",
    "--config.data.batch_size=16",
    "--config.train.micro_batches=2",
    "--config.train.loss_chunk_size=512",
    "--config.model.remat=full",
]


@pytest.fixture(scope="module")
def gqa_cfg(tiny_recipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    (path / "config.json").write_text(json.dumps(GQA))
    return load_recipe(tiny_recipe, [f"--config.model.path={path}"] + ESTIMATE_OVERRIDES)


@pytest.fixture(scope="module")
def gqa_plan(gqa_cfg, compiler):
    """The plan with its estimate: the step compiled, then with 1 and 2 layers unrolled."""
    return plan_lib.plan(gqa_cfg, TOPOLOGY, search=False, step_time=True, compiler=compiler)


@pytest.fixture(scope="module")
def unrolled(gqa_plan, gqa_cfg, compiler):
    """The estimate's two compiles (1 and 2 layers), gqa_plan's (the same compiler)."""
    topo = plan_lib.resolve_topology(TOPOLOGY)
    model_cfg = plan_lib.model_config(gqa_cfg)
    sizes = plan_lib.mesh_shape(gqa_cfg, topo.num_devices)
    return [step_time.unrolled_step(gqa_cfg, model_cfg, n, topo, sizes, compiler) for n in (1, 2)]


def test_the_cost_model_counts_every_unrolled_loop(unrolled, gqa_cfg):
    """The FLOPs one layer adds are its matmuls x 8 per token (forward, remat's recompute, two
    backward): all 2 micro-batches, and the recompute kept apart from the forward (merged, it
    would be x 6; one micro-batch counted, x 4). Outside the layers, the lm head's x 8 (forward,
    the chunked loss's recompute, two backward; measured x 6.2 before the loss's recompute was
    kept apart from its forward) over both loss chunks (one counted: x 4), plus the optimizer's
    and the softmax's elementwise work (measured: 2% more)."""
    d, f, v = GQA["hidden_size"], GQA["intermediate_size"], GQA["vocab_size"]
    n, k, h = GQA["num_attention_heads"], GQA["num_key_value_heads"], GQA["head_dim"]
    tokens = gqa_cfg.data.batch_size * gqa_cfg.data.seq_len / 4  # per device of 4
    one, two = (s.cost["flops"] for s in unrolled)
    assert two - one == pytest.approx(8 * (2 * d * n * h + 2 * d * k * h + 3 * d * f) * tokens, rel=0.02)
    assert one - (two - one) == pytest.approx(8 * d * v * tokens, rel=0.05)


def test_the_estimate_grows_with_layers(unrolled):
    """The cost model's seconds, with its -1 s per uncosted call added back, are positive and a
    layer adds time (measured here: 0.50 ms, 0.84 ms; 3 layers compiled directly 1.17 ms, and
    extrapolated 1.18 ms)."""
    one, two = (step_time.compiled_seconds(s) for s in unrolled)
    assert 0 < one < two
    assert step_time.extrapolate([one, two], 3) == pytest.approx(2 * two - one)


def test_plan_reports_the_estimate_as_an_estimate(gqa_plan, gqa_cfg, unrolled):
    p = gqa_plan
    e = p.step_time
    one, two = e.compiled_seconds
    assert one == step_time.compiled_seconds(unrolled[0]) and two == step_time.compiled_seconds(unrolled[1])
    assert e.layers_seconds == pytest.approx(one + 3 * (two - one))
    assert e.attention_core_seconds == pytest.approx(
        step_time.attention_core_flops(gqa_cfg, plan_lib.model_config(gqa_cfg)) / (4 * 197e12)
    )
    assert e.seconds == pytest.approx(e.layers_seconds + e.attention_core_seconds)
    assert e.mfu == pytest.approx(p.model_flops_per_step / (e.seconds * 4 * 197e12))
    assert 0 < e.mfu < 1
    text = plan_lib.report(p)
    assert "ESTIMATE from the TPU compiler's cost model (not a measurement)" in text
    assert "not counted:" in text
    assert f"{e.mfu:.0%} MFU" in text
    assert "not a measurement" in json.loads(plan_lib.to_json(p))["step_time_estimate"]["source"]


def test_no_estimate_for_gpus(tiny_cfg):
    p = plan_lib.plan(tiny_cfg, "h100:4", step_time=True)
    assert p.step_time is None and "GPU target" in p.step_time_unavailable
    assert "step time, ESTIMATE from the TPU compiler's cost model: n/a (a GPU target" in plan_lib.report(p)


def test_a_compiler_crash_is_a_reason_not_a_number(tiny_plan, tiny_cfg, compiler, monkeypatch):
    """The estimate's compiles run in a child process: one that dies (libtpu segfaulted once on
    an unrolled v5e step) is reported as n/a with the signal, and plan goes on."""
    with pytest.raises(plan_compile.CompileFailed, match="killed by SIGABRT"):
        plan_compile.in_child(os.abort)

    def crashed(*_args):
        raise plan_compile.CompileFailed("the compiling process died (killed by SIGSEGV)")

    monkeypatch.setattr(plan_compile, "compile_in_child", crashed)
    p = plan_lib.plan(tiny_cfg, TOPOLOGY, search=False, step_time=True, compiler=compiler)  # tiny_plan's
    assert p.fits and p.step_time is None
    assert (
        "n/a (1-layer unrolled compile failed: the compiling process died (killed by SIGSEGV))"
        in plan_lib.report(p)
    )
    assert json.loads(plan_lib.to_json(p))["step_time_estimate"] is None


def test_uncosted_calls_are_read_from_the_entry_computation():
    hlo = (
        '%fused (p: f32[8]) -> f32[8] {\n  %c = custom-call(), custom_call_target="ConcatBitcast"\n}\n\n'
        'ENTRY %main (a: f32[8]) -> f32[8] {\n  %x = custom-call(), custom_call_target="ConcatBitcast"\n'
        '  %y = custom-call(), custom_call_target="ConcatBitcast"\n  %z = custom-call(), '
        'custom_call_target="AsyncCollectiveDone"\n}\n'
    )
    assert plan_compile.entry_calls(hlo, plan_compile.UNCOSTED_CALLS) == 2
