"""The compiled SFT step on the tiny model: loss falls, non-finite steps are skipped, a step
sharded over 8 simulated devices equals the single-device step; optimizer plumbing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from test_train_support import (
    OPT,
    ByteTokenizer,
    make_batch,
    tiny_protocol,
)

from vrthinker_jax import sharding
from vrthinker_jax.models import config as model_config
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import frame_bank
from vrthinker_jax.train import steps


def copy_tree(t):
    return jax.tree.map(jnp.copy, t)


@pytest.fixture(scope="module")
def setup():
    # memory window 4 = the 4 initial frames: the tool call's 2 frames evict 2 of them
    pcfg = tiny_protocol(memory_window=4)
    rng = np.random.default_rng(0)
    tok = ByteTokenizer()
    batch = make_batch(rng, pcfg, tok)
    assert (batch["visible_until"] < np.iinfo(np.int32).max).any(), "no eviction exercised"
    cfg = model_config.get_config("tiny")
    graphdef, params = nnx.split(model_lib.Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    spec = steps.StepSpec(frame_bank.PatchSpec.from_model_config(cfg))
    state = steps.init_train_state(params, steps.make_optimizer(OPT))
    dev = steps.put_batch(batch, None, None)
    fn = steps.step_fn("sft", graphdef=graphdef, spec=spec, optimizer=OPT, state=state,
                       batch_like=dev)
    return dict(batch=batch, dev=dev, graphdef=graphdef, spec=spec, state=state, fn=fn)


def test_sft_loss_falls_on_a_fixed_batch(setup):
    state = copy_tree(setup["state"])
    losses = []
    for _ in range(12):
        state, m = setup["fn"](state, setup["dev"])
        losses.append(float(m["loss"]))
        assert int(m["skipped"]) == 0
    assert losses[0] > 5.0  # ~log(512) at init
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state.step) == 12 and int(state.nonfinite) == 0


def test_nonfinite_step_is_skipped_and_counted(setup):
    s0 = copy_tree(setup["state"])
    bad = dict(setup["dev"])
    bad["weight"] = jnp.asarray([np.nan, 1.0, 1.0, 1.0], jnp.float32)
    s1, m = setup["fn"](copy_tree(s0), bad)
    assert int(m["skipped"]) == 1 and int(m["nonfinite_total"]) == 1
    assert not np.isfinite(float(m["loss"]))
    assert int(s1.step) == 1 and int(s1.nonfinite) == 1
    for a, b in zip(jax.tree.leaves((s0.params, s0.opt_state)),
                    jax.tree.leaves((s1.params, s1.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the next good step is the one an untouched state would have taken
    s_after_skip, m1 = setup["fn"](s1, setup["dev"])
    s_clean, m2 = setup["fn"](copy_tree(s0), setup["dev"])
    assert int(m1["skipped"]) == 0 and int(m1["nonfinite_total"]) == 1
    assert float(m1["loss"]) == float(m2["loss"])
    for a, b in zip(jax.tree.leaves(s_after_skip.params), jax.tree.leaves(s_clean.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # a second (SPMD) compile: ~60-90 s on 2 busy cores
def test_sharded_step_equals_single_device_step(setup):
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s0 = setup["state"]
    single, m1 = setup["fn"](copy_tree(s0), setup["dev"])
    placed = steps.place_state(copy_tree(s0), mesh, sharding.DEFAULT_RULES)
    dev = steps.put_batch(setup["batch"], mesh, sharding.DEFAULT_RULES)
    fn = steps.step_fn("sft", graphdef=setup["graphdef"], spec=setup["spec"], optimizer=OPT,
                       state=placed, batch_like=dev, mesh=mesh)
    sharded, m2 = fn(placed, dev)
    # params really are split: an ('embed', 'mlp') kernel over fsdp x tensor
    specs = {x.sharding.spec for x in jax.tree.leaves(sharded.params)}
    assert PartitionSpec("fsdp", "tensor") in specs, specs
    assert dev["tokens"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves((single.params, single.opt_state)),
                    jax.tree.leaves((sharded.params, sharded.opt_state))):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # two more compiles
def test_sharded_step_with_the_7b_memory_settings_equals_single_device(setup):
    # the knobs the 7B learner ships with (remat, sequence-parallel residual stream, chunked
    # loss head) change the layout and the schedule of the computation, not its result
    cfg = model_config.get_config("tiny")
    cfg.remat, cfg.seq_parallel, cfg.lm_head_chunk = True, True, 16
    graphdef, params = nnx.split(model_lib.Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    s0 = steps.init_train_state(params, steps.make_optimizer(OPT))
    one = steps.step_fn("sft", graphdef=graphdef, spec=setup["spec"], optimizer=OPT, state=s0,
                        batch_like=setup["dev"])
    single, m1 = one(copy_tree(s0), setup["dev"])
    _, m0 = setup["fn"](copy_tree(setup["state"]), setup["dev"])  # the plain model, same init
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-5)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    placed = steps.place_state(copy_tree(s0), mesh, sharding.DEFAULT_RULES)
    dev = steps.put_batch(setup["batch"], mesh, sharding.DEFAULT_RULES)
    fn = steps.step_fn("sft", graphdef=graphdef, spec=setup["spec"], optimizer=OPT,
                       state=placed, batch_like=dev, mesh=mesh)
    sharded, m2 = fn(placed, dev)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                                   rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ optimizer (no model)


def _quadratic_run(cfg, n_steps, dtype=jnp.float32):
    params = {"w": jnp.ones((4,), dtype)}
    tx = steps.make_optimizer(cfg)
    state = steps.init_train_state(params, tx)

    def loss_fn(p, x):
        return jnp.sum((p["w"].astype(jnp.float32) * x) ** 2)

    @jax.jit
    def step(state, x):
        loss, g = jax.value_and_grad(loss_fn)(state.params, x)
        return steps.apply_gradients(tx, state, g, loss)

    out = []
    for i in range(n_steps):
        state, m = step(state, jnp.full((4,), 1.0 + i, jnp.float32))
        out.append(np.asarray(state.params["w"], np.float32).copy())
    return state, out


def test_lr_schedule_warmup_then_cosine():
    cfg = steps.optimizer_config(lr=1.0, warmup_steps=4, total_steps=20, end_lr_ratio=0.1)
    assert steps.lr_at(cfg, 0) == 0.0
    assert steps.lr_at(cfg, 2) == pytest.approx(0.5)
    assert steps.lr_at(cfg, 4) == pytest.approx(1.0)
    assert steps.lr_at(cfg, 20) == pytest.approx(0.1)
    acc = steps.optimizer_config(lr=1.0, warmup_steps=4, total_steps=20, accum_steps=2)
    assert steps.lr_at(acc, 5) == steps.lr_at(cfg, 2)


def test_gradient_accumulation_updates_every_k_micro_steps():
    cfg = steps.optimizer_config(lr=0.1, warmup_steps=0, total_steps=10, accum_steps=3)
    _, ws = _quadratic_run(cfg, 6)
    assert np.array_equal(ws[0], np.ones(4)) and np.array_equal(ws[1], np.ones(4))
    assert not np.array_equal(ws[2], ws[1])
    assert np.array_equal(ws[3], ws[2]) and np.array_equal(ws[4], ws[2])
    assert not np.array_equal(ws[5], ws[4])


def test_fp32_optimizer_state_for_bf16_params():
    cfg = steps.optimizer_config(lr=0.1, warmup_steps=0, total_steps=10, state_dtype="float32")
    state, ws = _quadratic_run(cfg, 2, dtype=jnp.bfloat16)
    assert state.params["w"].dtype == jnp.bfloat16
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 1]
    assert moments and all(x.dtype == jnp.float32 for x in moments)
    param_cfg = steps.optimizer_config(lr=0.1, warmup_steps=0, total_steps=10,
                                       state_dtype="param")
    state2, _ = _quadratic_run(param_cfg, 1, dtype=jnp.bfloat16)
    assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state2.opt_state))


def test_bad_optimizer_settings_are_named():
    with pytest.raises(ValueError, match="state_dtype"):
        steps.make_optimizer(steps.optimizer_config(state_dtype="fp8"))
    with pytest.raises(ValueError, match="accum_steps"):
        steps.make_optimizer(steps.optimizer_config(accum_steps=0))
    assert isinstance(steps.make_optimizer(steps.optimizer_config(grad_clip=0)),
                      optax.GradientTransformation)
