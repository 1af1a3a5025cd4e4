"""The AOT fit planner: analytic parameter / FLOP / memory math and the Markdown table on CPU
(no libtpu needed); the libtpu path compiles the tiny GRPO config for a v5e 2x2 slice (slow)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vrthinker_jax import cli
from vrthinker_jax.models import config as model_config
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import frame_bank, shapes
from vrthinker_jax.tools import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _load(spec: str, *overrides: str):
    """A stage config (spec relative to the repository root) with `--config.KEY=VALUE`
    overrides, loaded as the planner's CLI loads it."""
    return cli.load_config(os.path.join(ROOT, spec), list(overrides), plan.PlanError)


def _count(cfg) -> int:
    model = nnx.eval_shape(lambda: model_lib.Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_param_counts_match_the_model():
    # (eval_shape of the 7B takes ~20 s here; test_released_7b_size pins its total instead)
    cfg = model_config.get_config("tiny")
    assert plan.param_counts(cfg).total == _count(cfg)


def test_released_7b_size():
    n = plan.param_counts(model_config.get_config("7b"))
    assert n.total == 8_292_166_656  # Qwen2.5-VL-7B-Instruct: 8.29 B
    assert n.lm_head == n.embed  # untied head
    # fp32 master params + fp32 Adam moments: 12 bytes / param
    assert plan.train_state_bytes(model_config.get_config("7b"), param_bytes=4) == 12 * n.total


def test_text_forward_flops_match_xla_cost_analysis():
    # the decoder forward (no frames) of the tiny model: analytic vs XLA's HLO cost analysis,
    # dense attention and query-chunked (a loop whose body XLA counts once)
    for chunk in (0, 64):
        cfg = model_config.get_config("tiny")
        cfg.attn_query_chunk = chunk
        _check_forward_flops(cfg, attn_trips=plan.attention_trips(cfg, 256))
    assert plan.attention_trips(cfg, 256) == 4 and plan.attention_trips(cfg, 64) == 1


def _check_forward_flops(cfg, attn_trips):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.Qwen25VL(cfg,
                                                                           rngs=nnx.Rngs(0))))
    b, s = 2, 256

    def fwd(state, ids, pos, mask):
        logits, _ = nnx.merge(graphdef, state)(ids, pos, mask)
        return logits

    sds = jax.ShapeDtypeStruct
    lowered = jax.jit(fwd).lower(state, sds((b, s), jnp.int32), sds((3, b, s), jnp.int32),
                                 sds((b, s, s), jnp.bool_))
    xla = lowered.cost_analysis()["flops"]
    analytic = plan.prefill_flops(cfg, batch=b, seg_len=s, kv_len=s, frames=0,
                                  frame_size=(56, 56), attn_trips=attn_trips,
                                  logit_positions=s)["model"]  # this forward projects all
    # XLA also counts norms, rotary, softmax and the mask: a few % on top of the matmuls
    assert 1.0 <= xla / analytic < 1.25, (xla, analytic)


def test_train_and_decode_flop_formulas():
    cfg = model_config.get_config("7b")
    n = plan.param_counts(cfg)
    t = cfg.text
    one = plan.train_flops(cfg, batch=1, seq=1024, frames=0, frame_size=(448, 448), remat=False)
    mm = 6.0 * (n.text_layers_matmul + n.head_matmul) * 1024
    attn = 12.0 * t.num_hidden_layers * t.hidden_size * 1024**2
    assert one["model"] == pytest.approx(mm + attn)
    assert one["expected"] == one["model"]
    two = plan.train_flops(cfg, batch=2, seq=1024, frames=0, frame_size=(448, 448), remat=False)
    assert two["model"] == pytest.approx(2 * one["model"])
    # remat recomputes the blocks' forward (not the logits head): 8ND instead of 6ND
    rem = plan.train_flops(cfg, batch=1, seq=1024, frames=0, frame_size=(448, 448), remat=True)
    fwd_blocks = 2.0 * n.text_layers_matmul * 1024 + attn / 3
    assert rem["expected"] == pytest.approx(one["model"] + fwd_blocks)
    # frames add the vision tower: 1024 patches per 448 px frame
    assert plan.vision_patches_per_frame(cfg, (448, 448)) == 1024
    vis = plan.train_flops(cfg, batch=1, seq=1024, frames=4, frame_size=(448, 448), remat=False)
    assert vis["model"] > one["model"] + 3 * 2 * n.vision_matmul * 4 * 1024
    # one decode token: 2 x matmul params + attention over the whole cache
    dec = plan.decode_flops(cfg, batch=8, kv_len=20480)
    assert dec["model"] == pytest.approx(
        8 * (2.0 * (n.text_layers_matmul + n.head_matmul)
             + 4.0 * t.num_hidden_layers * t.hidden_size * 20480))
    # a scanned decoder is counted once by XLA: the one-layer count the planner scales from
    once = plan.decode_flops(cfg, batch=8, kv_len=20480, layers=1)
    assert once["model"] == pytest.approx(
        8 * (2.0 * (n.text_layers_matmul / 28 + n.head_matmul) + 4.0 * t.hidden_size * 20480))
    # bf16 KV cache of one 20k-slot row: 2 x 28 layers x 4 kv heads x 128 x 2 bytes per slot
    assert plan.kv_cache_bytes(cfg, batch=1, slots=20480, dtype_bytes=2) == \
        2 * 28 * 20480 * 4 * 128 * 2


def _step(**kw) -> plan.StepPlan:
    base = dict(name="learner (grpo)", shape="8 x 1024 tok", argument_bytes=4 * plan.GIB,
                output_bytes=4 * plan.GIB, alias_bytes=4 * plan.GIB, temp_bytes=8 * plan.GIB,
                code_bytes=0, hbm_bytes=16 * plan.GIB, flops_compiled=2e14,
                flops_analytic=1.6e14, flops_model=1.2e14, bytes_accessed=1e11,
                peak_flops=200e12, hbm_bw=1e12)
    base.update(kw)
    return plan.StepPlan(**base)


def test_roofline_and_memory_math():
    p = _step()
    assert p.total_bytes == 12 * plan.GIB  # donated outputs alias their arguments
    assert p.hbm_fraction == pytest.approx(0.75) and p.fits
    assert p.time_compute == pytest.approx(1.0) and p.time_memory == pytest.approx(0.1)
    assert p.step_time == pytest.approx(1.0) and p.bound == "compute"
    assert p.mfu == pytest.approx(0.6)  # 1.2e14 useful of 2e14 peak-seconds
    mem = _step(bytes_accessed=4e12)
    assert mem.bound == "memory" and mem.step_time == pytest.approx(4.0)
    assert not _step(temp_bytes=10 * plan.GIB).fits  # 14 / 16 = 87.5% > 85%


def test_markdown_table_and_suggestions():
    ok, big = _step(), _step(name="learner (grpo)", temp_bytes=40 * plan.GIB)
    dec = _step(name="rollout decode", shape="256 rows x 1 tok", temp_bytes=30 * plan.GIB)
    table = plan.markdown_table([ok, big, dec])
    lines = table.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("| step | batch | args GiB |") and lines[1].startswith("|---|")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(cells) == len(plan.TABLE_COLUMNS)
    assert cells[:7] == ["learner (grpo)", "8 x 1024 tok", "4.00", "8.00", "12.00", "75.0%",
                         "yes"]
    assert cells[9] == "1.25" and cells[10] == "1.00 s" and cells[12] == "60.0%"
    assert "**NO**" in lines[3]
    tips = plan.suggestions([ok, big, dec], {"remat": False, "accum": 2, "rollout_batch": 256,
                                             "attn_chunk": 0})
    assert len(tips) == 2
    assert "model.remat=True" in tips[0] and "optimizer.accum_steps=8" in tips[0]
    assert "model.attn_query_chunk=2048" in tips[0]
    assert tips[1].startswith("rollout decode") and "grpo.rollout_batch=64" in tips[1]
    md = plan.render_markdown({"config": "grpo:7b", "topology": "v5p-64", "mesh": "fsdp=8"},
                              [ok, big], tips[:1])
    assert md.startswith("## grpo:7b on v5p-64") and "- mesh: fsdp=8" in md
    assert "Does not fit:" in md


def test_topologies_table():
    chips = {k: t.num_chips for k, t in plan.TOPOLOGIES.items()}
    assert chips["v5p-64"] == 32 and chips["v5e-256"] == 256 and chips["v6e-64"] == 64
    assert chips["2xv5e-256"] == 512 and plan.TOPOLOGIES["2xv5e-256"].num_slices == 2
    assert plan.TOPOLOGIES["v5e-4"].jax_name == "v5e:2x2"
    for t in plan.TOPOLOGIES.values():
        assert t.chip.hbm_bytes > 0 and t.chip.peak_flops > 4e13 and t.chip.hbm_bw > 5e11
    with pytest.raises(plan.PlanError, match="unknown 'v9-8'"):
        plan.get_topology("v9-8")


def test_config_loading_and_overrides():
    cfg = _load("experiments/configs/grpo.py:7b")
    assert cfg.stage == "grpo" and cfg.model.text.hidden_size == 3584
    cfg = _load("experiments/configs/grpo.py:7b", "--config.optimizer.accum_steps=8",
                "--config.mesh.ici.tensor=2")
    assert cfg.optimizer.accum_steps == 8 and cfg.mesh.ici.tensor == 2
    assert plan.learner_batch(cfg) == cfg.grpo.prompts_per_step * cfg.grpo.group_size // 8
    with pytest.raises(plan.PlanError, match="no field 'nope'"):
        _load("experiments/configs/grpo.py:7b", "--config.nope.x=1")
    with pytest.raises(plan.PlanError, match="no such file"):
        cli.load_config("experiments/configs/missing.py:7b", [], plan.PlanError)
    with pytest.raises(plan.PlanError, match="optimizer.accum_steps must be >= 1"):
        plan.learner_batch(_load("experiments/configs/grpo.py:7b",
                                 "--config.optimizer.accum_steps=0"))


def test_config_errors_are_one_line():
    # the config file's own error, not ml_collections' wrapper around it
    with pytest.raises(plan.PlanError, match="grpo.py:huge: unknown size 'huge'; expected"):
        cli.load_config("experiments/configs/grpo.py:huge", [], plan.PlanError)


def test_cli_override_errors_are_one_line(monkeypatch, capsys):
    # a --config.KEY=VALUE naming no field, or a value its field's type rejects, is refused
    # in one line naming it before anything is compiled; so is an argument that is no override
    monkeypatch.setattr(plan, "libtpu_available", lambda: True)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for extra, msg in ((["--config.optimizer.nope=8"], "has no field 'nope' in optimizer"),
                       (["--config.optimizer.accum_steps=many"],
                        "--config.optimizer.accum_steps=many: invalid literal for int()"),
                       (["--config.optimizer.accum_steps"], "expected --config.KEY=VALUE"),
                       (["--set", "optimizer.accum_steps=8"], "unrecognized arguments: --set")):
        rc = plan.main(["--config", "experiments/configs/grpo.py:7b", "--topology", "v5p-64",
                        *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("plan: ") and msg in err[0], err


def test_override_config_in_memory():
    # the eval-rollout config is built in code: its overrides are parsed as a file config's
    cfg = plan.eval_rollout_config("tiny")
    assert cli.override_config(cfg, ["--config.sampling.prefill_chunk=1024",
                                     "--config.trajectory.video_size=(720, 1280)",
                                     "--config.sampling.cache_dtype=float32",
                                     "--config.benchmarks.mjbench_video=7"]) is cfg
    assert cfg.sampling.prefill_chunk == 1024 and cfg.trajectory.video_size == (720, 1280)
    assert cfg.sampling.cache_dtype == "float32" and cfg.benchmarks.mjbench_video == 7
    for bad, msg in ((["--config.sampling.nope=1"], "has no field 'nope' in sampling"),
                     (["--config.nope=1"], "has no field 'nope' in the top level"),
                     (["--config.trajectory.turns=x"],
                      "--config.trajectory.turns=x: invalid literal for int()"),
                     (["sampling.prefill_chunk=1"], "expected --config.KEY=VALUE")):
        with pytest.raises(plan.PlanError) as e:
            cli.override_config(cfg, bad, plan.PlanError)
        assert msg in str(e.value) and "\n" not in str(e.value), e.value


# --------------------------------------------------------------------------- the engine's shapes


def test_rows_per_engine_call():
    # RFT: data.batch_size // K prompts x K samples per call (run_rft), not batch_size x K
    rft = _load("experiments/configs/rft.py:7b")
    k = rft.samples_per_prompt
    assert plan.rows_per_call(rft) == (rft.data.batch_size // k) * k == 64
    cli.override_config(rft, ["--config.data.batch_size=18", "--config.samples_per_prompt=4"],
                        plan.PlanError)
    assert plan.rows_per_call(rft) == 16
    assert shapes.rft_prompts_per_call(rft) == 4
    # fewer rows than K: one prompt
    cli.override_config(rft, ["--config.data.batch_size=2"], plan.PlanError)
    assert plan.rows_per_call(rft) == 4
    # GRPO: grpo.rollout_batch rows, or all prompts_per_step x group_size
    grpo = _load("experiments/configs/grpo.py:7b")
    assert plan.rows_per_call(grpo) == grpo.grpo.rollout_batch == 64
    cli.override_config(grpo, ["--config.grpo.rollout_batch=0"], plan.PlanError)
    assert plan.rows_per_call(grpo) == grpo.grpo.prompts_per_step * grpo.grpo.group_size
    cli.override_config(grpo, ["--config.grpo.rollout_batch=48"], plan.PlanError)
    with pytest.raises(plan.PlanError, match="must divide"):
        plan.rows_per_call(grpo)
    assert plan.rows_per_call(_load("experiments/configs/sft.py:7b")) == 0


@pytest.fixture(scope="module")
def tiny_rft_engine(tmp_path_factory):
    """A tiny RFT config of 18 pairs per batch (4 samples each) naming a tokenizer, the
    tokenizer as the plan loads it, the config's mesh over the 8 CPU devices, and the rollout
    engine the trainer would build from them."""
    from test_rollout_helpers import make_tokenizer

    from vrthinker_jax.rollout import engine as engine_lib
    from vrthinker_jax.rollout import protocol

    tok_dir = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(tok_dir)
    cfg = _load("experiments/configs/rft.py:tiny", "--config.data.batch_size=18",
                "--config.samples_per_prompt=4", f"--config.tokenizer={tok_dir}")
    assert cfg.tokenizer == tok_dir
    cfg.model = model_config.Qwen25VLConfig.from_configdict(cfg.model)
    tok = plan.plan_tokenizer(cfg)  # as make_plan: the model's vision ids follow the tokenizer
    assert cfg.model.image_token_id == tok.token_to_id("<|image_pad|>")
    mesh = plan.mesh_for(cfg, jax.devices(), 1)
    model = model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0))
    engine = engine_lib.RolloutEngine(
        model, cfg.model, tok, protocol.ProtocolConfig.from_configdict(cfg.protocol),
        cfg.sampling, tuple(cfg.data.frame_size), mesh=mesh, cache_dtype=jnp.bfloat16)
    return cfg, tok, mesh, engine, nnx.state(model)


def test_planner_shapes_are_the_engines(tiny_rft_engine):
    cfg, tok, mesh, engine, params = tiny_rft_engine
    p = plan.rollout_programs(cfg, mesh, params, jnp.bfloat16, tokenizer=tok)
    # the RFT plan rolls out (18 // 4) x 4 rows per engine call
    assert p.rows == 16 and p.state.tokens.shape[0] == 16 and p.bank.shape[0] == 16
    assert p.shapes == engine.shapes and p.measured
    # the compiled settings: the engine's but for the tokenizer's ids and the worst-case insert
    assert p.static == dataclasses.replace(
        engine.static, kv_buckets=1, prefill_chunk=0, vocab_limit=0, banned_ids=(),
        **plan.PLAN_STOPS)
    # the state: the shapes, dtypes and shardings the engine's init produces
    want = jax.eval_shape(functools.partial(engine._init_state, p.rows), jax.random.key(0))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), p.state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), want)
    assert jax.tree.map(lambda x: x.sharding, p.state) == engine._state_shardings(p.rows)
    # the prompt insert: the segment the engine builds from real prompts, at the largest bucket
    from vrthinker_jax.rollout import chat, protocol

    toks = [chat.tokenize_segments(tok, protocol.prompt_segments(text, engine.pcfg),
                                   engine.tokens_per_frame) for text in ("a fox", "rain")]
    assert {len(t.frames) for t in toks} == {p.shapes.prompt_frames}
    seg = engine._segment(toks * 8, p.shapes.prompt_buckets[-1], p.shapes.prompt_frames,
                          np.zeros(16, np.int32))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), seg) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), p.seg)
    assert jax.tree.map(lambda x: x.sharding, p.seg) == shapes.segment_shardings(mesh)
    assert p.bank.shape == engine.shapes.bank_shape(16) and p.bank.dtype == np.uint8


def test_planner_lays_out_by_the_configs_sharding_rules(tiny_rft_engine):
    # mesh.rules is a config value: the plan's params and batches follow it, as the runtime's do
    from vrthinker_jax import sharding

    cfg, tok, mesh, _, params = tiny_rft_engine
    custom = cli.override_config(cfg.copy_and_resolve_references(),
                                 ["--config.mesh.rules.embed=('data',)"])
    rules = plan.stage_rules(custom)
    assert rules.embed == ("data",)
    got = plan.rollout_programs(custom, mesh, params, jnp.bfloat16, tokenizer=tok).params
    want = sharding.state_shardings(params, mesh, rules)
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, got)) == jax.tree.leaves(want)
    default = sharding.state_shardings(params, mesh)
    assert jax.tree.leaves(want) != jax.tree.leaves(default)  # the model width over 8 devices


def test_response_length_estimate_is_an_upper_bound(tiny_rft_engine):
    cfg, _, _, engine, _ = tiny_rft_engine
    assert plan.plan_tokenizer(cli.override_config(cfg.copy_and_resolve_references(),
                                                   ["--config.tokenizer="])) is None
    est = plan.rollout_shapes(cfg)  # no tokenizer
    assert est == dataclasses.replace(engine.shapes, response_len=est.response_len)
    assert est.response_len >= engine.resp_len


def test_unknown_program_is_refused_before_compiling():
    cfg = _load("experiments/configs/grpo.py:tiny")
    with pytest.raises(plan.PlanError, match="unknown programs"):
        plan.make_plan(cfg, plan.get_topology("v5e-4"), programs=("learner", "bogus"))


def test_cli_without_libtpu_says_install_the_tpu_extra(monkeypatch, capsys):
    monkeypatch.setattr(plan, "libtpu_available", lambda: False)
    rc = plan.main(["--config", "experiments/configs/grpo.py:7b", "--topology", "v5p-64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "tpu" in err[0] and "libtpu" in err[0]


def test_cli_bad_topology_is_one_line(capsys):
    rc = plan.main(["--config", "experiments/configs/grpo.py:7b", "--topology", "v9-8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("plan: --topology")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu installed: the real CLI would compile")
def test_cli_subprocess_without_libtpu():
    out = subprocess.run(
        [sys.executable, "-m", "vrthinker_jax.tools.plan", "--config",
         "experiments/configs/grpo.py:7b", "--topology", "v5p-64"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "tpu" in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not importable: install the tpu extra "
                    "(`bash experiments/launch/setup_env.sh tpu`) to AOT-compile for TPU")
def test_aot_plan_tiny_on_v5e_2x2():
    cfg = _load("experiments/configs/grpo.py:tiny")
    header, plans, tips = plan.make_plan(cfg, plan.get_topology("v5e-4"))
    assert header["mesh"] == "data=4, fsdp=1, tensor=1"
    assert [p.name for p in plans] == ["learner (grpo)", "rollout prefill", "rollout decode"]
    for p in plans:
        assert p.argument_bytes > 0 and p.total_bytes > 0 and p.fits, p
        # compiled FLOPs agree with the analytic count (tiny: norms/softmax weigh more)
        assert 0.9 < p.flops_compiled / p.flops_analytic < 2.0, p
        assert p.step_time > 0 and 0 < p.mfu <= 1
    assert tips == []
    assert "| learner (grpo) |" in plan.render_markdown(header, plans, tips)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not importable: install the tpu extra "
                    "(`bash experiments/launch/setup_env.sh tpu`) to AOT-compile for TPU")
def test_aot_rft_rollout_rows_on_v5e_2x2():
    # the tiny RFT config: 8 pairs per batch, 4 samples each: 2 prompts x 4 = 8 rows per call
    cfg = _load("experiments/configs/rft.py:tiny")
    _, plans, _ = plan.make_plan(cfg, plan.get_topology("v5e-4"), programs=("decode",))
    assert [p.name for p in plans] == ["rollout decode"]
    assert plans[0].shape.startswith("8 rows x 1 tok") and plans[0].fits


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not importable: install the tpu extra "
                    "(`bash experiments/launch/setup_env.sh tpu`) to AOT-compile for TPU")
def test_multislice_mesh_splits_physical_axes():
    # fsdp 64 x tensor 4 per 16x16 slice is no product of whole torus axes: the hybrid mesh
    # must split them (it raised NotImplementedError before)
    cfg = _load("experiments/configs/grpo.py:7b")
    topo = plan.get_topology("2xv5e-256")
    mesh = plan.mesh_for(cfg, plan.topology_devices(topo), topo.num_slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 64, "tensor": 4}
    # each data index holds one whole slice (the DCN axis is outermost)
    for i in range(2):
        assert len({d.slice_index for d in mesh.devices[i].flat}) == 1


def test_an_out_of_memory_compile_says_it_does_not_fit():
    class Lowered:
        def __init__(self, err):
            self.err = err

        def compile(self):
            raise self.err

    oom = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                       "required for HLO temporaries (20.95G) exceeds available HBM (15.75G).\n"
                       "trace...")
    with pytest.raises(plan.DoesNotFit) as e:  # a PlanError the CLI exits 3 for
        plan.compile_or_explain(Lowered(oom), "rollout prefill", "rollout")
    msg = str(e.value)
    assert msg.startswith("rollout prefill does not fit: Ran out of memory on HBM")
    assert "(20.95G)" in msg and "grpo.rollout_batch" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="other"):  # anything else is not an HBM verdict
        plan.compile_or_explain(Lowered(ValueError("other")), "learner (grpo)", "learner")


# --------------------------------------------------------------------------- eval rollout


def test_colab_runtimes():
    # v2-8: 4 chips of 2 TensorCores, each core its own JAX device with half the chip's HBM
    v2, v5e, v6e = (plan.get_topology(n) for n in plan.COLAB_RUNTIMES)
    assert (v2.num_chips, v2.num_devices, v2.chip.device.hbm_bytes) == (4, 8, 8 * plan.GIB)
    assert v2.chip.device.peak_flops == 23e12 and v2.chip.device.hbm_bw == 350e9
    assert (v5e.num_devices, v5e.chip.device.hbm_bytes) == (1, 16 * plan.GIB)
    assert (v6e.num_devices, v6e.chip.device.hbm_bytes) == (1, 32 * plan.GIB)
    assert v5e.host_chips == v6e.host_chips == (1, 1, 1) and v2.host_chips == ()


def test_eval_trajectory_480p():
    cfg = plan.eval_rollout_config("7b")
    patch = frame_bank.PatchSpec.from_model_config(cfg.model)
    t = plan.eval_trajectory(cfg.trajectory, patch)
    # 480x832 -> smart_resize -> 476x840: 17 x 30 merged tokens per frame; the 8-frame video
    # is 4 temporal groups
    assert t.video_hw == t.image_hw == (476, 840)
    assert (t.image_tokens, t.video_tokens) == (510, 4 * 510)
    # system + tools 310, two messages' markers, the video item, 350 tokens of task text
    assert t.prefills[0].tokens == 310 + 2 * 5 + 2 + 2040 + 350 == 2712
    assert t.prefills[0].static == 2816 and t.prefills[0].groups == 4
    # every tool response re-prefills the model's turn + the new response (8 images)
    response = 5 + 12 + 8 * (510 + 2)
    assert [p.tokens for p in t.prefills[1:]] == [300 + response] * 3
    assert all(p.groups == 8 and p.static == plan._round_up(2048 + response, 64)
               for p in t.prefills[1:])
    # the cache: the prompt, 4 turns, three responses' text and only the last one's images
    assert t.peak == 2712 + 4 * 300 + 3 * (5 + 12) + 8 * 512 == 8059
    assert (t.tool_calls, t.stop, t.generated) == (3, "answers in turn 4", 1200)
    # the preset engine's scratch is one prefill chunk (unserved rows write over their own slots)
    assert t.scratch == t.chunk == 512
    assert plan.resolve_kv_slots(cfg.sampling, t) == plan.RELEASE_KV_SLOTS
    # the first re-prefill starts at the model's (rewritten) turn 1; the next ones at the
    # previous response's first image: response 1 starts after the prompt and turn 1, its
    # images after its markers and text
    starts = [p.start for p in t.prefills[1:]]
    assert starts[0] == 2712 and starts[1] == 2712 + 300 + 5 + 12
    assert starts[2] == starts[1] + (t.prefills[2].tokens - 8 * 512)


def test_eval_trajectory_720p_hits_the_token_cap():
    cfg = plan.eval_rollout_config("7b")
    cfg.trajectory.video_size = (720, 1280)
    patch = frame_bank.PatchSpec.from_model_config(cfg.model)
    t = plan.eval_trajectory(cfg.trajectory, patch)
    assert t.image_hw == (728, 1288) and t.image_tokens == 26 * 46
    # the first response (8 x 1196 tokens) takes the row past 12*1024-200: it stops after turn 2
    assert t.tool_calls == 1 and len(t.decodes) == 2 and "token cap" in t.stop
    assert t.peak > plan.RELEASE_KV_SLOTS
    assert plan.resolve_kv_slots(cfg.sampling, t) == plan._round_up(t.peak, 256)
    cfg.sampling.kv_slots = 12288
    with pytest.raises(plan.PlanError, match="cannot hold"):
        plan.resolve_kv_slots(cfg.sampling, t)
    with pytest.raises(plan.PlanError, match="turns=5"):
        cfg.trajectory.turns = 5
        plan.eval_trajectory(cfg.trajectory, patch)


@pytest.fixture(scope="module")
def abs_7b():
    """The bf16 7B's abstract params (scan_layers: ~1 s) and its eval config."""
    cfg = plan.eval_rollout_config("7b")
    cfg.model = model_config.Qwen25VLConfig.from_configdict(cfg.model)
    return cfg, plan.abstract_eval_model(cfg.model)[1]  # cached: the CLI test reuses it


def test_param_bytes_per_device(abs_7b):
    cfg, params = abs_7b
    n = plan.param_counts(cfg.model)
    one = plan.param_bytes_per_device(params, {"data": 1, "fsdp": 1, "tensor": 1})
    assert one["all"] == 2 * n.total  # bf16: 16.58 GB = 15.44 GiB
    assert one["embed"] == 2 * n.embed and one["vision"] == 2 * n.vision
    # tensor 4 splits heads, MLP and vocab; norms, biases of unsplit axes and the patch
    # embedding stay whole; data replicates
    four = plan.param_bytes_per_device(params, {"data": 2, "fsdp": 1, "tensor": 4})
    assert one["all"] / 4 < four["all"] < 1.01 * one["all"] / 4
    assert plan.eval_mesh(cfg.mesh, cfg.model, 8) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert plan.eval_mesh(cfg.mesh, cfg.model, 1) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_bf16_7b_fits_v6e_1_not_v5e_1(abs_7b):
    cfg, params = abs_7b
    patch = frame_bank.PatchSpec.from_model_config(cfg.model)
    traj = plan.eval_trajectory(cfg.trajectory, patch)
    v5e = plan.plan_eval_runtime(cfg, plan.get_topology("v5e-1"), traj, params)
    v6e = plan.plan_eval_runtime(cfg, plan.get_topology("v6e-1"), traj, params)
    # 15.44 GiB of weights: over 85% of a v5e chip's 16 GiB, within a v6e chip's 32 GiB
    assert v5e.rows == 0 and "weights alone" in v5e.notes[0]
    assert v5e.memory["params"] > v5e.budget and math.isinf(v5e.row_s)
    assert v6e.rows >= 1 and v6e.memory["total"] <= v6e.budget
    assert v6e.memory["params"] < v6e.budget
    # one more row would not fit
    more = plan.eval_memory(cfg.model, traj, rows=v6e.rows + 1, mesh=v6e.mesh,
                            params={"all": v6e.memory["params"], "vision": 0, "embed": 0},
                            kv_slots=plan.RELEASE_KV_SLOTS, sc=cfg.sampling)
    assert more["total"] > v6e.budget
    assert v6e.benchmark_s(1000) == math.ceil(1000 / v6e.rows) * v6e.call_s


def test_eval_memory_arithmetic():
    cfg = plan.eval_rollout_config("7b")
    m, sc = cfg.model, cfg.sampling
    traj = plan.eval_trajectory(cfg.trajectory, frame_bank.PatchSpec.from_model_config(m))
    params = {"all": 10 * plan.GIB, "vision": 0, "embed": 0}
    mesh = {"data": 2, "fsdp": 1, "tensor": 4}
    mem = plan.eval_memory(m, traj, rows=4, mesh=mesh, params=params, kv_slots=12288, sc=sc)
    slots = 12288 + traj.scratch
    # 2 rows per device (data 2); the engine's cache is not split over tensor: 2 x 28 layers x
    # 4 kv heads x 128 x 2 bytes (bf16) per slot
    assert mem["kv cache"] == 2 * slots * 2 * 28 * 4 * 128 * 2
    assert mem["frame bank"] == 0  # the preset engine keeps candidates on the host
    assert mem["rollout state"] == 2 * (slots * 26 + 152064 * 4)
    # the vision tower over one frame at a time (the preset engine: one image or video group)
    # of 34 x 60 patches: float32 scores of 16 / 4 heads, float32 pixel patches, bf16 residual
    # copies and MLP
    p = 34 * 60
    per_frame = 4 * p * p * 4 + p * (4 * 1176 + 4 * 1280 * 2 + 3 * 3420 * 2 // 4)
    assert mem["vision tower"] == per_frame
    persistent = sum(mem[k] for k in ("params", "kv cache", "rollout state", "frame bank"))
    assert mem["total"] == persistent + max(mem["vision tower"], mem["prefill pass"],
                                            mem["decode step"])
    one = plan.eval_memory(m, traj, rows=4, mesh=mesh, params=params, kv_slots=12288, sc=sc,
                           frames_per_pass=1)
    assert one["vision tower"] == per_frame
    assert plan.max_eval_rows(lambda b: b <= 6, 2, 256) == 6
    assert plan.max_eval_rows(lambda b: False, 2, 256) == 0


def test_eval_roofline_decode_is_weight_reads():
    cfg = plan.eval_rollout_config("7b")
    m = model_config.Qwen25VLConfig.from_configdict(cfg.model)
    traj = plan.eval_trajectory(cfg.trajectory, frame_bank.PatchSpec.from_model_config(m))
    params = {"all": 16e9, "vision": 1e9, "embed": 1e9}
    topo = plan.get_topology("v6e-1")
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    phases = plan.eval_call_seconds(m, traj, rows=1, topo=topo, mesh=mesh, params=params,
                                    sc=cfg.sampling)
    assert list(phases) == ["prompt", "re-prefill 1", "re-prefill 2", "re-prefill 3", "decode"]
    # one row: every decode step reads the text weights and the row's cache prefix
    slot = 2 * 28 * 4 * 128 * 2
    want = sum(g * (14e9 + slot * (start + g / 2)) for start, g in traj.decodes) / 1640e9
    assert phases["decode"] == (pytest.approx(want), "memory")
    # the 2712-token prompt in 512-token passes: each pass re-reads the decoder's weights (the
    # vision tower's are read once): one row takes at least those reads (it is balanced on a
    # v6e chip), 4 rows are compute-bound
    assert phases["prompt"][0] >= (6 * 14e9 + 1e9) / 1640e9
    four = plan.eval_call_seconds(m, traj, rows=4, topo=topo, mesh=mesh, params=params,
                                  sc=cfg.sampling)
    assert four["prompt"][1] == "compute" and four["decode"][1] == "memory"


def test_eval_cli_analytic(capsys):
    rc = plan.main(["--eval-rollout", "--topology", "v5e-1,v6e-1", "--rows",
                    "mjbench_video=500"])
    out = capsys.readouterr().out
    assert rc == 3  # v5e-1 does not fit
    assert "| v5e-1 (1 device) | **no** | 0 |" in out and "| v6e-1 (1 device) | yes |" in out
    header = next(line for line in out.splitlines() if line.startswith("| runtime"))
    assert header.index("VideoGen-RewardBench (26,500 rows)") < header.index(
        "GenAI-Bench video (1,069 rows)") < header.index("MJ-Bench-Video (500 rows)")
    assert "no libtpu compile" in out
    for bad, msg in ((["--video-size", "480by832"], "--video-size"),
                     (["--rows", "nope=3"], "--rows"), (["--preset", "no-such"], "--preset"),
                     (["--config.sampling.nope=1"], "--config.sampling.nope"),
                     (["--config.trajectory.turns=four"], "--config.trajectory.turns")):
        assert plan.main(["--eval-rollout", "--topology", "v6e-1", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]
    # the CLI's overrides reach the eval config (after its shortcuts)
    assert plan.main(["--eval-rollout", "--topology", "v6e-1", "--turns", "3",
                      "--config.sampling.prefill_chunk=1024", "--config.trajectory.turns=2"]) == 0
    out = capsys.readouterr().out
    assert "prefill_chunk 1024;" in out and "2 turns x 300 generated tokens" in out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not importable: install the tpu extra "
                    "(`bash experiments/launch/setup_env.sh tpu`) to AOT-compile for TPU")
def test_eval_rollout_compiles_for_colab_runtimes():
    # libtpu describes and compiles all three Colab runtimes (the tiny model, 448 px frames)
    cfg = plan.eval_rollout_config("tiny")
    cfg.trajectory.video_size = (448, 448)
    cfg.trajectory.update(system_tokens=40, instruction_tokens=40, gen_tokens_per_turn=32,
                          max_turn_tokens=64)
    # the tiny model's batch limit is its pixel preprocessing, which the analytic model (made
    # for the 7B, where the vision tower's scores dominate) undercounts: check the compile
    # path at a small batch
    cfg.max_rows = 8
    topos = [plan.get_topology(n) for n in plan.COLAB_RUNTIMES]
    text, plans = plan.run_eval_plan(cfg, topos, compile_programs=True)
    for p in plans:
        assert p.rows > 0, p.notes
        assert [c.name for c in p.compiled] == ["prompt insert", "re-prefill insert", "decode"]
        assert all(c.total_bytes > 0 and c.fits for c in p.compiled)
    assert plans[0].mesh == {"data": 4, "fsdp": 1, "tensor": 2}  # tiny: 2 kv heads
    assert "checked by AOT-compiling" in text
