"""The AOT fit planner: analytic parameter / FLOP / memory math and the Markdown table on CPU
(no libtpu needed); the libtpu path compiles the tiny GRPO config for a v5e 2x2 slice (slow)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vrthinker_jax.models import config as model_config
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.tools import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


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
        assert t.chip.hbm_bytes > 0 and t.chip.peak_flops > 1e14 and t.chip.hbm_bw > 5e11
    with pytest.raises(plan.PlanError, match="unknown 'v9-8'"):
        plan.get_topology("v9-8")


def test_config_loading_and_overrides():
    cfg = plan.load_config(os.path.join(ROOT, "experiments/configs/grpo.py:7b"))
    assert cfg.stage == "grpo" and cfg.model.text.hidden_size == 3584
    plan.apply_overrides(cfg, ["optimizer.accum_steps=8", "mesh.ici.tensor=2"])
    assert cfg.optimizer.accum_steps == 8 and cfg.mesh.ici.tensor == 2
    assert plan.learner_batch(cfg) == cfg.grpo.prompts_per_step * cfg.grpo.group_size // 8
    with pytest.raises(plan.PlanError, match="no field 'nope'"):
        plan.apply_overrides(cfg, ["nope.x=1"])
    with pytest.raises(plan.PlanError, match="no such file"):
        plan.load_config("experiments/configs/missing.py:7b")


def test_unknown_program_is_refused_before_compiling():
    cfg = plan.load_config(os.path.join(ROOT, "experiments/configs/grpo.py:tiny"))
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
    cfg = plan.load_config(os.path.join(ROOT, "experiments/configs/grpo.py:tiny"))
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
def test_multislice_mesh_splits_physical_axes():
    # fsdp 64 x tensor 4 per 16x16 slice is no product of whole torus axes: the hybrid mesh
    # must split them (it raised NotImplementedError before)
    cfg = plan.load_config(os.path.join(ROOT, "experiments/configs/grpo.py:7b"))
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
    with pytest.raises(plan.PlanError) as e:
        plan.compile_or_explain(Lowered(oom), "rollout prefill", "rollout")
    msg = str(e.value)
    assert msg.startswith("rollout prefill does not fit: Ran out of memory on HBM")
    assert "(20.95G)" in msg and "grpo.rollout_batch" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="other"):  # anything else is not an HBM verdict
        plan.compile_or_explain(Lowered(ValueError("other")), "learner (grpo)", "learner")
