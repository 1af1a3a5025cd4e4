"""Parity of the Flax Qwen2.5-VL with transformers' implementation (tiny random model, CPU, fp32).

The HF model and the converted Flax model are built once per module; jitted functions are shared
across tests through `model.forward`'s jit cache (keyed by the static grids and shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_reference as R  # noqa: E402

from vrthinker_jax import sharding  # noqa: E402
from vrthinker_jax.checkpoints import hf as hf_io  # noqa: E402
from vrthinker_jax.models import config as config_lib  # noqa: E402
from vrthinker_jax.models import model as model_lib  # noqa: E402
from vrthinker_jax.models import rope, vision  # noqa: E402

FP32_TOL = 1e-4
# bf16 params + compute vs the fp32 reference: relative to the logits' spread.
BF16_REL_TOL = 0.02

IMAGE = ("image", (1, 8, 12))  # merged 4x6 -> 2x3 windows of 2x2 merge groups
CASES = {
    "text_only": dict(rows=[[12]]),
    "one_image": dict(rows=[[3, IMAGE, 4]]),
    # two videos of different lengths; 1/3 s per grid exercises the float32 truncation
    "two_videos": dict(rows=[[2, ("video", (2, 8, 8), 1.0), 3,
                              ("video", (4, 4, 8), 1.0 / 3.0), 2]]),
    "padded_batch_right": dict(rows=[[3, IMAGE, 4], [2, ("image", (1, 4, 4)), 1]]),
    "padded_batch_left": dict(rows=[[3, IMAGE, 4], [2, ("image", (1, 4, 4)), 1]],
                              padding="left"),
}


@pytest.fixture(scope="module")
def cfg():
    return config_lib.get_config("tiny")


@pytest.fixture(scope="module")
def hf_model(cfg):
    return R.build_hf_model(cfg, seed=0)


@pytest.fixture(scope="module")
def state_dict(hf_model):
    return R.state_dict_numpy(hf_model)


@pytest.fixture(scope="module")
def model(cfg, state_dict):
    return hf_io.from_state_dict(cfg, state_dict)


@functools.cache
def _inputs(name):
    c = CASES[name]
    return R.build_inputs(config_lib.get_config("tiny"), c["rows"], seed=1,
                          padding=c.get("padding", "right"))


@pytest.fixture(scope="module")
def reference(hf_model):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = R.hf_logits(hf_model, _inputs(name))
        return cache[name]

    return get


def test_tiny_config_exercises_windows_and_full_attention(cfg):
    vc = cfg.vision
    plan = vision.vision_plan((IMAGE[1],), vc.spatial_merge_size, vc.window_size, vc.patch_size)
    assert plan.window.idx.shape[0] == 6  # more than one window
    assert plan.full.idx.shape[0] == 1
    assert 0 < min(vc.fullatt_block_indexes) and max(vc.fullatt_block_indexes) < vc.depth - 1
    assert not np.array_equal(plan.perm, np.arange(plan.perm.size))  # windows reorder patches


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(model, reference, name):
    inp = _inputs(name)
    out = model_lib.forward(model, **inp)
    ref = reference(name)
    assert out.dtype == np.float32 and out.shape == ref.shape
    diff = float(np.abs(out - ref).max())
    print(f"{name}: max |logit diff| = {diff:.3g}")
    assert diff <= FP32_TOL


@pytest.mark.parametrize("name", ["two_videos", "padded_batch_left"])
def test_query_chunked_attention_matches_transformers(cfg, state_dict, reference, name):
    # chunks of 7 query rows: several chunks, the last one padded (no case is a multiple of 7)
    c = config_lib.get_config("tiny")
    c.attn_query_chunk = 7
    inp = _inputs(name)
    assert inp["input_ids"].shape[1] % 7
    out = model_lib.forward(hf_io.from_state_dict(c, state_dict), **inp)
    diff = float(np.abs(out - reference(name)).max())
    print(f"{name} chunked: max |logit diff| = {diff:.3g}")
    assert diff <= FP32_TOL


@pytest.mark.parametrize("name", ["one_image", "two_videos", "padded_batch_right",
                                  "padded_batch_left", "text_only"])
def test_get_rope_index_matches_transformers(cfg, hf_model, name):
    import torch

    inp = _inputs(name)
    ids = inp["input_ids"]
    mm = np.zeros_like(ids)
    mm[ids == cfg.image_token_id] = 1
    mm[ids == cfg.video_token_id] = 2

    def t(k, dtype=torch.long):
        return None if k not in inp else torch.from_numpy(np.asarray(inp[k])).to(dtype)

    ref_pos, ref_delta = hf_model.model.get_rope_index(
        t("input_ids"), torch.from_numpy(mm), image_grid_thw=t("image_grid_thw"),
        video_grid_thw=t("video_grid_thw"),
        second_per_grid_ts=t("second_per_grid_ts", torch.float32),
        attention_mask=t("attention_mask"))
    pos, delta = rope.get_rope_index(cfg, ids, inp.get("image_grid_thw"),
                                     inp.get("video_grid_thw"), inp.get("second_per_grid_ts"),
                                     inp["attention_mask"])
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_rope_positions_of_a_segment_continue_from_start(cfg):
    inp = _inputs("one_image")
    ids = inp["input_ids"][0]
    full, _ = rope.get_rope_index(cfg, ids[None], inp["image_grid_thw"])
    cut = 2
    head, nxt = rope.rope_positions(ids[:cut], None, None, None, cfg)
    tail, end = rope.rope_positions(ids[cut:], inp["image_grid_thw"], None, None, cfg, start=nxt)
    np.testing.assert_array_equal(np.concatenate([head, tail], 1), full[:, 0])
    assert end == full.max() + 1


def _jit_call(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def call(state, ids, pos, mask, embeds, cache, index):
        m = nnx.merge(graphdef, state)
        return m(ids, pos, mask, inputs_embeds=embeds, cache=cache, cache_index=index)

    return functools.partial(call, state)


def _multimodal_embeds(model, inp):
    """Token embeddings with the image rows merged in, [b, s, hidden] (jitted)."""
    grid = tuple(tuple(int(x) for x in g) for g in inp["image_grid_thw"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, pix):
        m = nnx.merge(graphdef, state)
        vis = m.encode_vision(pix, grid)
        return model_lib.merge_visual_embeds(m.embed(ids), ids, vis, m.config.image_token_id)

    return run(state, jnp.asarray(inp["input_ids"], jnp.int32), jnp.asarray(inp["pixel_values"]))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kv_cache_prefill_then_decode_matches_full_forward(cfg, state_dict, model, reference,
                                                           scan):
    m = model
    if scan:
        c = config_lib.get_config("tiny")
        c.scan_layers = True
        m = hf_io.from_state_dict(c, state_dict)
    inp = _inputs("padded_batch_left")
    ids = inp["input_ids"].astype(np.int32)
    b, s = ids.shape
    pos, mask = model_lib.prepare_inputs(m.config, ids, inp["attention_mask"],
                                         inp["image_grid_thw"])
    embeds = _multimodal_embeds(m, inp)
    call = _jit_call(m)
    full, none = call(ids, pos, mask, embeds, None, None)
    assert none is None
    ref = reference("padded_batch_left")
    valid = inp["attention_mask"] == 1
    assert float(np.abs(np.asarray(full) - ref)[valid].max()) <= FP32_TOL

    max_len = s + 3
    prefill = s - 4  # the last 4 tokens are decoded one at a time
    cache = model_lib.init_cache(m.config, b, max_len, jnp.float32)
    cmask = np.zeros((b, s, max_len), bool)
    cmask[:, :, :s] = mask
    logits, cache = call(ids[:, :prefill], pos[:, :, :prefill], cmask[:, :prefill],
                         embeds[:, :prefill], cache, np.zeros(b, np.int32))
    got = [np.asarray(logits)]
    for i in range(prefill, s):
        step, cache = call(ids[:, i:i + 1], pos[:, :, i:i + 1], cmask[:, i:i + 1],
                           embeds[:, i:i + 1], cache, np.full(b, i, np.int32))
        got.append(np.asarray(step))
    got = np.concatenate(got, axis=1)
    diff = float(np.abs(got - np.asarray(full))[valid].max())
    print(f"kv cache (scan={scan}): max |logit diff| vs full forward = {diff:.3g}")
    assert diff <= FP32_TOL


def test_bfloat16_runs_and_stays_close(cfg, state_dict, reference):
    c = config_lib.get_config("tiny")
    c.dtype = c.param_dtype = "bfloat16"
    m = hf_io.from_state_dict(c, state_dict)
    assert m.embed_tokens.value.dtype == jnp.bfloat16
    inp = _inputs("one_image")
    out = model_lib.forward(m, **inp)
    ref = reference("one_image")
    assert out.dtype == np.float32 and np.isfinite(out).all()
    rel = float(np.abs(out - ref).max() / (ref.max() - ref.min()))
    print(f"bf16: max |logit diff| = {np.abs(out - ref).max():.3g}, / logit range = {rel:.3g}")
    assert rel <= BF16_REL_TOL


def test_every_param_has_logical_axes(cfg):
    for scan in (False, True):
        c = config_lib.get_config("tiny")
        c.scan_layers = scan
        _, state = hf_io.abstract_model(c)
        for path, var in nnx.to_flat_state(state):
            axes = sharding._logical_of(var)
            assert axes is not None and len(axes) == len(var.value.shape), path
            assert all(a is None or a in sharding.DEFAULT_RULES for a in axes), (path, axes)
            if scan and path[0] == "layers":
                assert axes[0] == "layers"


def test_same_size_frames_pack_without_padding(cfg):
    vc = cfg.vision
    grids = ((1, 8, 8),) * 5
    plan = vision.vision_plan(grids, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    assert plan.window.valid.all() and plan.full.valid.all()
    assert plan.full.idx.shape == (5, 64)


def test_merge_visual_embeds_fills_pad_positions_in_order():
    emb = jnp.zeros((2, 4, 3))
    ids = jnp.array([[1, 9, 9, 2], [9, 3, 8, 4]])
    vis = jnp.arange(12.0).reshape(4, 3) + 1
    out = np.asarray(model_lib.merge_visual_embeds(emb, ids, vis, (8, 9)))
    np.testing.assert_array_equal(out[0, 1], vis[0])
    np.testing.assert_array_equal(out[0, 2], vis[1])
    np.testing.assert_array_equal(out[1, 0], vis[2])
    np.testing.assert_array_equal(out[1, 2], vis[3])
    assert not out[0, 0].any() and not out[1, 3].any()


@pytest.mark.slow
def test_remat_and_scan_give_same_gradients(state_dict):
    """Gradients through vision + decoder agree for (plain) and (remat + scan_layers)."""
    inp = _inputs("one_image")
    grid = tuple(tuple(int(x) for x in g) for g in inp["image_grid_thw"])
    ids = jnp.asarray(inp["input_ids"], jnp.int32)
    pix = jnp.asarray(inp["pixel_values"])
    grads = []
    for flag in (False, True):
        c = config_lib.get_config("tiny")
        c.remat = c.scan_layers = flag
        pos, mask = model_lib.prepare_inputs(c, inp["input_ids"], None, inp["image_grid_thw"])

        def loss(m, pos=pos, mask=mask):
            vis = m.encode_vision(pix, grid)
            emb = model_lib.merge_visual_embeds(m.embed(ids), ids, vis, m.config.image_token_id)
            logits, _ = m(ids, jnp.asarray(pos), jnp.asarray(mask), inputs_embeds=emb)
            return jnp.mean(logits ** 2)

        g = nnx.jit(nnx.grad(loss))(hf_io.from_state_dict(c, state_dict))
        q = np.asarray(g["layers"]["q_kernel"][...][1] if flag else g["layers"][1]["q_kernel"][...])
        grads.append((np.asarray(g["visual"]["blocks"][0]["qkv_kernel"][...]), q))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_get_rope_index_random_layouts_match_transformers(cfg, hf_model):
    """Random mixes of text, images and videos (several per row), left or right padding."""
    import torch

    rng = np.random.default_rng(7)
    for case in range(25):
        rows = []
        for _ in range(int(rng.integers(1, 4))):
            row = []
            for _ in range(int(rng.integers(1, 5))):
                kind = rng.integers(0, 3)
                h, w = 2 * rng.integers(1, 5, 2)
                if kind == 0:
                    row.append(int(rng.integers(1, 6)))
                elif kind == 1:
                    row.append(("image", (1, int(h), int(w))))
                else:
                    secs = float(rng.choice([0.25, 1 / 3, 0.5, 1.0, 2.0, 0.7]))
                    row.append(("video", (int(rng.integers(1, 7)), int(h), int(w)), secs))
            rows.append(row)
        inp = R.build_inputs(cfg, rows, seed=case, padding=("left", "right")[case % 2])
        ids = inp["input_ids"]
        mm = np.zeros_like(ids)
        mm[ids == cfg.image_token_id] = 1
        mm[ids == cfg.video_token_id] = 2

        def t(k, dtype=torch.long, inp=inp):
            return None if k not in inp else torch.from_numpy(np.asarray(inp[k])).to(dtype)

        ref_pos, ref_delta = hf_model.model.get_rope_index(
            t("input_ids"), torch.from_numpy(mm), image_grid_thw=t("image_grid_thw"),
            video_grid_thw=t("video_grid_thw"),
            second_per_grid_ts=t("second_per_grid_ts", torch.float32),
            attention_mask=t("attention_mask"))
        pos, delta = rope.get_rope_index(cfg, ids, inp.get("image_grid_thw"),
                                         inp.get("video_grid_thw"),
                                         inp.get("second_per_grid_ts"), inp["attention_mask"])
        np.testing.assert_array_equal(pos, ref_pos.numpy(), err_msg=f"case {case}: {rows}")
        np.testing.assert_array_equal(delta, ref_delta.numpy(), err_msg=f"case {case}")
