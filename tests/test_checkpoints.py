"""HF import (both layouts, sharded), orbax save/restore, export round trip, and the CLIs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_reference as R  # noqa: E402

from vrthinker_jax import checkpoints  # noqa: E402
from vrthinker_jax.checkpoints import hf as hf_io  # noqa: E402
from vrthinker_jax.checkpoints import orbax_io  # noqa: E402
from vrthinker_jax.models import config as config_lib  # noqa: E402
from vrthinker_jax.models import model as model_lib  # noqa: E402
from vrthinker_jax.tools import convert_hf, forward  # noqa: E402

IMAGE_ROWS = [[3, ("image", (1, 8, 12)), 4]]


@pytest.fixture(scope="module")
def cfg():
    return config_lib.get_config("tiny")


@pytest.fixture(scope="module")
def hf_model(cfg):
    return R.build_hf_model(cfg, seed=3)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, hf_model):
    root = tmp_path_factory.mktemp("ckpt")
    d = {"single": str(root / "hf"), "sharded": str(root / "hf_sharded"),
         "released": str(root / "hf_released"), "new_keys": str(root / "hf_new_keys"),
         "root": str(root)}
    hf_model.save_pretrained(d["single"])
    hf_model.save_pretrained(d["sharded"], max_shard_size="100KB")
    # released config.json + `visual.*`/`model.*` keys; transformers-5 config + new keys
    R.rewrite_layout(d["single"], d["released"], flat_config=True, new_keys=False)
    R.rewrite_layout(d["single"], d["new_keys"], flat_config=False, new_keys=True)
    return d


@pytest.fixture(scope="module")
def reference_params(cfg, hf_model):
    m = hf_io.from_state_dict(cfg, R.state_dict_numpy(hf_model))
    return _flat(m)


def _flat(model) -> dict:
    return {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(model, ref, scan=False):
    got = _flat(model)
    if scan:
        got = {}
        for p, v in _flat(model).items():
            if p[0] == "layers":
                for i in range(v.shape[0]):
                    got[(p[0], i) + p[1:]] = v[i]
            else:
                got[p] = v
    assert set(got) == set(ref)
    for p in ref:
        np.testing.assert_array_equal(got[p].astype(np.float32), ref[p], err_msg=str(p))


def test_sharded_directory_has_several_shards(dirs):
    shards = [f for f in os.listdir(dirs["sharded"]) if f.endswith(".safetensors")]
    assert len(shards) > 1
    assert os.path.exists(os.path.join(dirs["sharded"], hf_io.INDEX_FILE))


@pytest.mark.parametrize("kind", ["single", "sharded", "released", "new_keys"])
def test_import_matches_state_dict(dirs, reference_params, kind):
    model, cfg = hf_io.import_hf_dir(dirs[kind])
    assert cfg.text.num_hidden_layers == 2 and cfg.vision.in_channels == 3
    _assert_same_params(model, reference_params)


def test_import_scan_layers_and_bfloat16(dirs, reference_params):
    import ml_dtypes

    model, cfg = hf_io.import_hf_dir(dirs["sharded"], dtype="bfloat16", scan_layers=True)
    assert cfg.scan_layers and cfg.param_dtype == "bfloat16"
    flat = _flat(model)
    assert flat[("layers", "q_kernel")].shape[0] == 2
    assert flat[("embed_tokens",)].dtype == ml_dtypes.bfloat16
    bf = {p: v.astype(ml_dtypes.bfloat16).astype(np.float32) for p, v in reference_params.items()}
    _assert_same_params(model, bf, scan=True)


def test_hf_config_both_layouts_agree(dirs):
    a = hf_io.load_hf_config(dirs["single"])
    b = hf_io.load_hf_config(dirs["released"])
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() == config_lib.get_config("tiny").to_dict()


def test_released_configs_round_trip_through_hf_layout():
    for size in ("3b", "7b"):
        c = config_lib.get_config(size)
        assert config_lib.from_hf_config(config_lib.to_hf_config(c)).to_dict() == c.to_dict()
    assert config_lib.get_config("3b").text.tie_word_embeddings
    assert config_lib.get_config("7b").text.vocab_size == 152064


def test_saved_config_without_later_knobs_takes_the_config_defaults():
    """A checkpoint config.json from before the compute knobs existed reads with get_config's
    values for them (the one place their defaults live)."""
    d = config_lib.get_config("tiny").to_dict()
    for key in config_lib.LATER_KNOBS:
        del d[key]
    got = config_lib.Qwen25VLConfig.from_configdict(d)
    assert got.to_dict() == config_lib.get_config("tiny").to_dict()


# The released Qwen2.5-VL-7B-Instruct config.json (flat layout), abridged to what the model reads.
RELEASED_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                      "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
}


def test_released_7b_config_json_gives_the_7b_config():
    got = config_lib.from_hf_config(RELEASED_7B)
    assert got.to_dict() == config_lib.get_config("7b").to_dict()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_missing_shard(dirs):
    d = _copy(dirs["sharded"], os.path.join(dirs["root"], "missing_shard"))
    victim = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(d, victim))
    with pytest.raises(hf_io.CheckpointError, match=f"{victim}: missing shard"):
        hf_io.import_hf_dir(d)


def test_error_wrong_architecture(dirs):
    d = _copy(dirs["single"], os.path.join(dirs["root"], "wrong_arch"))
    path = os.path.join(d, "config.json")
    with open(path) as f:
        c = json.load(f)
    c["model_type"] = "llama"
    c["architectures"] = ["LlamaForCausalLM"]
    with open(path, "w") as f:
        json.dump(c, f)
    with pytest.raises(hf_io.CheckpointError, match="config.json.*not a Qwen2.5-VL.*llama"):
        hf_io.import_hf_dir(d)


def _rewrite(src, dst, edit):
    """Copy a single-file HF dir, editing its tensor dict with `edit(dict)`."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    with safe_open(os.path.join(src, "model.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_error_shape_mismatch_names_tensor(dirs):
    key = "model.language_model.layers.1.self_attn.k_proj.weight"

    def edit(t):
        t[key] = t[key][:-1]

    d = _rewrite(dirs["new_keys"], os.path.join(dirs["root"], "bad_shape"), edit)
    with pytest.raises(hf_io.CheckpointError, match=rf"model.safetensors: tensor {key} has shape"):
        hf_io.import_hf_dir(d)


def test_error_missing_and_unexpected_tensors(dirs):
    key = "visual.blocks.2.mlp.up_proj.bias"

    def drop(t):
        del t[key]

    d = _rewrite(dirs["single"], os.path.join(dirs["root"], "missing_tensor"), drop)
    with pytest.raises(hf_io.CheckpointError, match=f"missing tensors.*{key}"):
        hf_io.import_hf_dir(d)

    def add(t):
        t["model.extra.weight"] = np.zeros(3, np.float32)

    d = _rewrite(dirs["single"], os.path.join(dirs["root"], "extra_tensor"), add)
    with pytest.raises(hf_io.CheckpointError, match="unexpected tensors.*model.extra.weight"):
        hf_io.import_hf_dir(d)


def test_error_missing_config(tmp_path):
    with pytest.raises(hf_io.CheckpointError, match="config.json: missing"):
        hf_io.import_hf_dir(str(tmp_path))


def test_orbax_round_trip_with_relayout(dirs, reference_params, tmp_path):
    model, _ = hf_io.import_hf_dir(dirs["single"])
    orbax_io.save_model(model, str(tmp_path / "ox"))
    assert orbax_io.is_orbax_dir(str(tmp_path / "ox"))
    back, cfg = checkpoints.load_model(str(tmp_path / "ox"))
    _assert_same_params(back, reference_params)
    stacked, cfg2 = checkpoints.load_model(str(tmp_path / "ox"), scan_layers=True)
    assert cfg2.scan_layers
    _assert_same_params(stacked, reference_params, scan=True)


def test_export_round_trip_gives_identical_tensors(dirs, hf_model, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, _ = hf_io.import_hf_dir(dirs["released"], scan_layers=True)
    out = str(tmp_path / "exported")
    names = hf_io.export_hf_dir(model, out, max_shard_bytes=200_000)
    assert len(names) > 1 and os.path.exists(os.path.join(out, hf_io.INDEX_FILE))
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    a, b = hf_model.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), k


def test_convert_cli_and_errors(dirs, reference_params, tmp_path, capsys):
    out = str(tmp_path / "converted")
    assert convert_hf.main(["--hf-dir", dirs["sharded"], "--out", out]) == 0
    model, _ = checkpoints.load_model(out)
    _assert_same_params(model, reference_params)
    capsys.readouterr()
    rc = convert_hf.main(["--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("convert_hf: error:")
    rc = convert_hf.main(["--hf-dir", dirs["single"], "--out", out])  # params/ exists
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "already exists" in err[0]


def test_forward_cli_parity_for_hf_and_converted(dirs, hf_model, tmp_path, capsys):
    cfg = config_lib.get_config("tiny")
    inp = R.build_inputs(cfg, IMAGE_ROWS, seed=5)
    ref = R.hf_logits(hf_model, inp)
    npz = str(tmp_path / "in.npz")
    np.savez(npz, **inp)
    conv = str(tmp_path / "conv")
    assert convert_hf.main(["--hf-dir", dirs["single"], "--out", conv]) == 0
    for src in (dirs["single"], conv):
        out = str(tmp_path / "out.npz")
        assert forward.main(["--checkpoint", src, "--inputs", npz, "--out", out]) == 0
        with np.load(out) as f:
            logits = f["logits"]
        assert logits.dtype == np.float32 and logits.shape == ref.shape
        diff = float(np.abs(logits - ref).max())
        print(f"forward CLI ({os.path.basename(src)}): max |logit diff| = {diff:.3g}")
        assert diff <= 1e-4
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, tokens=inp["input_ids"])
    capsys.readouterr()
    rc = forward.main(["--checkpoint", conv, "--inputs", bad, "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown arrays ['tokens']" in err[0]


def test_forward_rejects_token_count_mismatch(cfg):
    m = model_lib.Qwen25VL(cfg, rngs=nnx.Rngs(0))
    inp = R.build_inputs(cfg, IMAGE_ROWS)
    first_pad = int(np.argmax(inp["input_ids"][0] == cfg.image_token_id))
    inp["input_ids"][0, first_pad] = 0  # one image pad token fewer than visual rows
    with pytest.raises(ValueError, match="image tokens"):
        model_lib.forward(m, **inp)
