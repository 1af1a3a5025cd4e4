"""Roles on their own meshes (tunix-style `cfg.roles` / `cfg.meshes`): the learner on devices
0-3, the rollout and the frozen reference on devices 4-7 of the 8 simulated CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from test_train_support import (
    ByteTokenizer,
    make_bank,
    make_batch,
    make_trace,
    stage_config,
)

from experiments.configs import common
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.train import grpo, rollouts, runtime, steps


def split_config():
    cfg, pcfg = stage_config("grpo")
    cfg.mesh = common.mesh_config({"data": 2, "fsdp": 2, "tensor": 1}, devices=(0, 4))
    cfg.meshes.gen = common.mesh_config({"data": 4, "fsdp": 1, "tensor": 1}, devices=(4, 8))
    cfg.roles.rollout = "gen"
    cfg.roles.reference = "gen"
    return cfg, pcfg


def _devices(mesh):
    return sorted(d.id for d in mesh.devices.flat)


def test_role_meshes_take_their_device_ranges():
    cfg, _ = split_config()
    meshes = runtime.make_role_meshes(cfg)
    assert _devices(meshes["actor"]) == [0, 1, 2, 3]
    assert _devices(meshes["rollout"]) == [4, 5, 6, 7]
    assert meshes["reference"] is meshes["rollout"]  # one mesh per name


@pytest.mark.parametrize("change, match", [
    (lambda c: c.roles.update(actor="gen"), "roles.actor must be 'main'"),
    (lambda c: c.roles.update(rollout="nope"), "no mesh config `meshes.nope`"),
    (lambda c: c.meshes.gen.update(devices=(4, 9)), r"mesh.devices: .*\(4, 9\)"),
])
def test_role_mesh_errors_name_the_field(change, match):
    cfg, _ = split_config()
    change(cfg)
    with pytest.raises(ValueError, match=match):
        runtime.make_role_meshes(cfg)


def test_mesh_rules_from_the_config_lay_out_the_params_and_the_rollout():
    """`mesh.rules` (the config's logical axis -> mesh axes table) is what `runtime.setup` lays
    the params out by, and the rollout engine's copy: a non-default rule changes a parameter's
    sharding."""
    tok = ByteTokenizer()
    cfg, _ = stage_config("grpo")
    cfg.mesh = common.mesh_config({"data": 2, "fsdp": 2, "tensor": 2})
    model = model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0))

    def spec(params):
        return params["embed_tokens"].value.sharding.spec  # [vocab, embed]

    assert spec(runtime.setup(cfg, tok, model=model).params) == PartitionSpec("tensor", "fsdp")
    cfg.mesh.rules.vocab = ()
    cfg.mesh.rules.embed = ("fsdp", "tensor")
    rt = runtime.setup(cfg, tok, model=model)
    want = PartitionSpec(None, ("fsdp", "tensor"))
    assert spec(rt.params) == want
    assert rt.rules.vocab == () and rt.spec.rules == rt.rules
    assert spec(rollouts.make_engine(cfg, rt, tok).params) == want


def test_each_role_takes_its_meshs_rules():
    cfg, _ = split_config()
    cfg.meshes.gen.rules.batch = ("data",)
    rules = runtime.make_role_rules(cfg)
    assert rules["actor"].batch == ("data", "fsdp") and rules["rollout"].batch == ("data",)
    assert rules["reference"] == rules["rollout"]
    cfg.mesh.rules.embed = ("fsdp", "model")
    with pytest.raises(ValueError, match=r"sharding rule 'embed': unknown mesh axes \['model'\]"):
        runtime.make_role_rules(cfg)


def test_reference_on_its_own_mesh_gives_the_learners_log_probs():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    cfg, pcfg = split_config()
    host = make_batch(rng, pcfg, tok)
    model = model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0))
    rt = runtime.setup(cfg, tok, model=model)
    ref = grpo.reference_params(rt)
    leaf = jax.tree.leaves(ref)[0]
    assert sorted(d.id for d in leaf.sharding.device_set) == [4, 5, 6, 7]
    fn = jax.jit(lambda p, b: steps.sequence_logprobs(p, b, graphdef=rt.graphdef, spec=rt.spec))
    batch = steps.put_batch(host, rt.mesh, rt.rules)
    got = grpo.reference_logprobs(fn, ref, host, batch, rt)
    assert sorted(d.id for d in got.sharding.device_set) == [0, 1, 2, 3]  # the learner's
    want = fn(rt.params, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles the rollout engine on the rollout mesh and the learner
def test_run_grpo_with_rollout_and_reference_on_their_own_devices(tmp_path, monkeypatch):
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    cfg, pcfg = split_config()
    cfg.grpo.update(dict(group_size=2, prompts_per_step=2))
    cfg.sampling.update(dict(max_len=768, max_new_tokens=48, max_turn_tokens=24,
                             prompt_buckets=(256,)))
    cfg.steps = 1
    recs = [make_trace(rng, pcfg, i) for i in range(4)]
    banks = [make_bank(rng, pcfg) for _ in recs]
    rt = runtime.setup(cfg, tok, model=model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0)))
    engines = []
    real = rollouts.make_engine
    monkeypatch.setattr(rollouts, "make_engine", lambda *a, **k: engines.append(real(*a, **k))
                        or engines[-1])
    rt, hist = grpo.run_grpo(cfg, str(tmp_path / "w"), None, tok, rt=rt,
                             dataset=rollouts.in_memory_prompts(cfg, recs, banks, 2))
    assert len(hist) == 1 and np.isfinite(hist[0]["reward"])
    assert _devices(engines[0].mesh) == [4, 5, 6, 7]
    assert sorted(d.id for d in jax.tree.leaves(engines[0].params)[0].sharding.device_set) \
        == [4, 5, 6, 7]
    assert sorted(d.id for d in jax.tree.leaves(rt.params)[0].sharding.device_set) == [0, 1, 2, 3]
