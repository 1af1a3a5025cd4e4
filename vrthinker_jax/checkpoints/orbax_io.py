"""Save / restore a `Qwen25VL` as an orbax checkpoint plus its model config as JSON.

Layout of a checkpoint directory:
    config.json   the model ConfigDict (vrthinker_jax.models.config layout)
    params/       orbax StandardCheckpointer tree of the params (pure dict of arrays)
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vrthinker_jax.models import config as config_lib
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.models.layers import dtype_of

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _to_json(cfg) -> dict:
    d = cfg.to_dict()
    d["text"]["mrope_section"] = list(d["text"]["mrope_section"])
    d["vision"]["fullatt_block_indexes"] = list(d["vision"]["fullatt_block_indexes"])
    return d


def is_orbax_dir(path: str) -> bool:
    return (os.path.isdir(os.path.join(path, PARAMS_DIR))
            and os.path.exists(os.path.join(path, CONFIG_FILE)))


def save_model(model, directory: str) -> str:
    """Write config.json and params/ under `directory` (created; params/ must not exist)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    import orbax.checkpoint as ocp

    state = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), state)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:  # every process takes part in the orbax save; one writes
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(_to_json(model.config), f, indent=2)
    return directory


def read_config(directory: str) -> ml_collections.ConfigDict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (not a vrthinker_jax model checkpoint)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    try:
        return config_lib.Qwen25VLConfig.from_configdict(raw)
    except (KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: not a model config ({e})") from e


def relayout(pure: dict, n_layers: int, to_scan: bool) -> dict:
    """Converts the 'layers' subtree between a list of per-layer dicts and one stacked dict."""
    layers = pure["layers"]
    stacked = not all(isinstance(k, int) or (isinstance(k, str) and k.isdigit())
                      for k in layers)
    if stacked == to_scan:
        return pure
    out = dict(pure)
    if to_scan:
        per = [layers[i] if i in layers else layers[str(i)] for i in range(n_layers)]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per)
    else:
        out["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n_layers)}
    return out


def load_model(directory: str, *, dtype: str | None = None, param_dtype: str | None = None,
               scan_layers: bool | None = None, remat: bool | None = None):
    """(model, cfg) from a checkpoint written by `save_model`.

    dtype / param_dtype / scan_layers / remat override the saved config (params are cast and
    re-laid-out as needed).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    saved = read_config(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir}: missing params directory")
    abs_model = nnx.eval_shape(lambda: model_lib.Qwen25VL(saved, rngs=nnx.Rngs(0)))
    target = nnx.state(abs_model, nnx.Param).to_pure_dict()
    # an explicit layout: orbax refuses to guess one for a checkpoint saved on another topology
    # (e.g. by a multi-process training run); callers reshard the params onto their mesh
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if jax.process_count() > 1:  # global arrays, replicated over every device
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          target)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            pure = ckptr.restore(params_dir, target)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ValueError(f"{params_dir}: cannot restore params for the saved config ({e})") \
                from e
    cfg = saved.copy_and_resolve_references()
    if dtype is not None:
        cfg.dtype = dtype
        cfg.param_dtype = param_dtype or dtype
    elif param_dtype is not None:
        cfg.param_dtype = param_dtype
    if scan_layers is not None:
        cfg.scan_layers = bool(scan_layers)
    if remat is not None:
        cfg.remat = bool(remat)
    config_lib.validate(cfg)
    pdt = dtype_of(cfg.param_dtype)
    pure = jax.tree.map(lambda x: jnp.asarray(x).astype(pdt), pure)
    pure = relayout(pure, cfg.text.num_hidden_layers, bool(cfg.scan_layers))
    abs_new = nnx.eval_shape(lambda: model_lib.Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abs_new)
    state.replace_by_pure_dict(pure)
    model = nnx.merge(graphdef, state)
    # catch silent shape drift between config and params
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if not isinstance(var.value, jax.Array | np.ndarray):
            raise ValueError(f"{params_dir}: parameter {path} was not restored")
    return model, model.config
