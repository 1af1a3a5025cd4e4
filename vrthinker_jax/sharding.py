"""Device meshes and the table that maps logical axis names to mesh axes (`rules_config`: a
config value, `mesh.rules` of a stage config).

Model parameters carry logical axis names (`nnx.with_partitioning(..., ('embed', 'mlp'))`, stored
as the Variable's `out_sharding` metadata). This module turns them into `NamedSharding`s for a
mesh with axes ('data', 'fsdp', 'tensor'), the maxtext/tunix convention:

* data   - pure data parallelism: params replicated, batch split;
* fsdp   - batch split *and* parameters split along their 'embed' axis (ZeRO-3 style);
* tensor - Megatron-style split of heads / MLP width / vocab.

A mesh axis is dropped for a dimension it does not divide (e.g. 2 kv heads on tensor=4), which
replicates that dimension instead of failing; `explain_shardings` lists such fallbacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, "str | Sequence[str] | None"]


def rules_config() -> ml_collections.ConfigDict:
    """The logical axis -> mesh axes table: a stage config's `mesh.rules` (each mesh block of
    `experiments/configs/common.mesh_config` carries one) and `DEFAULT_RULES`, what library
    callers without a config use. Each value is a tuple of mesh axes, tried in order: an axis
    that does not divide the dimension (or is already used by another dimension of the array)
    is dropped, () = replicated. A logical name not in the table is replicated."""
    r = ml_collections.ConfigDict()
    # rows of every batch (training micro-batches, rollout state and KV cache, frame banks)
    # over both data-parallel axes: fsdp shards the weights but, like data, splits the rows
    r.batch = ("data", "fsdp")
    # the model width of every weight over fsdp (ZeRO-3): each chip holds 1/fsdp of each matrix
    # and the step gathers a layer's weights when it runs it
    r.embed = ("fsdp",)
    # the SwiGLU hidden width over tensor (Megatron: column-split up/gate, row-split down)
    r.mlp = ("tensor",)
    # query heads over tensor: each shard attends with its own heads, no exchange inside
    # attention
    r.heads = ("tensor",)
    # key/value heads over tensor like the query heads they serve (dropped, i.e. replicated,
    # where tensor does not divide them, e.g. 2 kv heads on tensor=4)
    r.kv_heads = ("tensor",)
    # embedding / lm_head rows over tensor: the vocabulary (152k) is the largest weight dim
    r.vocab = ("tensor",)
    # per-head width stays whole: rotary embedding and the score dot product need all of it
    r.head_dim = ()
    # the stacked layer axis of scanned layers stays whole: the scan slices it per step
    r.layers = ()
    # token positions (no array names them today): a row's tokens stay on one chip
    r.seq = ()
    # the decoder's residual stream between layers when model.seq_parallel (Megatron-style
    # sequence parallelism: each tensor shard keeps 1/tensor of the tokens of the remat carries)
    r.seq_shard = ("tensor",)
    return r


def _axes(target) -> tuple[str, ...]:
    """A rule's value as a tuple of mesh axes (one name, None and a list accepted)."""
    return (target,) if isinstance(target, str) else tuple(target or ())


def freeze_rules(rules: Rules) -> ml_collections.FrozenConfigDict:
    """`rules` (a `rules_config()` ConfigDict or a plain mapping; a value may also be one axis
    name or None) as a hashable FrozenConfigDict of tuples (a jit-static setting), checking
    every mesh axis it names."""
    out = {}
    for name, target in dict(rules).items():
        axes = _axes(target)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"sharding rule {name!r}: unknown mesh axes {unknown}; expected "
                             f"some of {MESH_AXES}")
        out[str(name)] = axes
    return ml_collections.FrozenConfigDict(out)


# for callers without a stage config (the eval CLI and reward-model exports, `distributed`'s
# row helpers, tools/plan.py, tests); stage runs take theirs from `cfg.mesh.rules`
DEFAULT_RULES = freeze_rules(rules_config())


def make_mesh(
    ici: Mapping[str, int],
    dcn: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with axes MESH_AXES.

    Args:
      ici: sizes per axis inside a slice; one axis may be -1 to take the remaining devices.
      dcn: sizes per axis across slices (multi-slice TPU); the mesh axis size is ici * dcn.
      devices: defaults to all devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = dict(dcn or {})
    n_slices = math.prod(dcn.get(a, 1) for a in MESH_AXES)
    per_slice = len(devices) // n_slices
    sizes = [int(ici.get(a, 1)) for a in MESH_AXES]
    unknown = set(ici) - set(MESH_AXES)
    if unknown or set(dcn) - set(MESH_AXES):
        raise ValueError(f"mesh: unknown axes {sorted(unknown | (set(dcn) - set(MESH_AXES)))}")
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one ici axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) * n_slices != len(devices):
        raise ValueError(
            f"mesh: ici {dict(zip(MESH_AXES, sizes))} x dcn {dcn} needs "
            f"{math.prod(sizes) * n_slices} devices, have {len(devices)}"
        )
    if n_slices > 1:
        from jax.experimental import mesh_utils

        dcn_sizes = [int(dcn.get(a, 1)) for a in MESH_AXES]
        # per-slice axes such as fsdp 64 x tensor 4 on a 16x16 torus are no product of whole
        # physical axes: let the per-slice mesh split them (as the single-slice fallback does)
        grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn_sizes, devices=devices,
                                                    allow_split_physical_axes=True)
    else:
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(sizes, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def spec_for(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for one array: logical names -> mesh axes, dropping axes that don't divide."""
    if not logical:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"sharding: logical axes {tuple(logical)} do not match shape {shape}")
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = _axes(rules.get(name)) if name is not None else ()
        kept = []
        size = 1
        for ax in axes:
            n = mesh.shape[ax]
            if ax in used or n == 1 or dim % (size * n):
                continue
            kept.append(ax)
            size *= n
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _logical_of(var: nnx.Variable):
    meta = var.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree of NamedSharding with the structure of `state` (an nnx.State of Variables)."""

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, spec_for(_logical_of(var), var.value.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def value_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """Like `state_shardings` but for the pure value tree `nnx.State` flattens to under jit."""
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(lambda v, s: s, state, shardings)


def shard_state(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """Places every Variable of `state` on `mesh` according to its logical axes."""
    from vrthinker_jax import distributed

    shardings = state_shardings(state, mesh, rules)

    def put(var, sharding):  # put_value: the params may be one process's local copy
        if isinstance(var, nnx.Variable):
            return var.replace(distributed.put_value(var.value, sharding))
        return distributed.put_value(var, sharding)

    return jax.tree.map(put, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_spec(ndim: int, batch_dim: int = 0, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec that splits `batch_dim` over the batch mesh axes and replicates the rest."""
    axes = _axes(rules["batch"])
    spec: list = [None] * ndim
    spec[batch_dim] = None if not axes else axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0, rules=DEFAULT_RULES):
    return NamedSharding(mesh, batch_spec(ndim, batch_dim, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_size_multiple(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """The global batch must be a multiple of this (the product of the batch mesh axes)."""
    return math.prod(mesh.shape[a] for a in _axes(rules["batch"]))


def explain_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> list[str]:
    """Lines `path: shape logical -> spec` for every param, marking replicated fallbacks."""
    lines = []
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Variable):
            continue
        logical = _logical_of(var)
        spec = spec_for(logical, var.value.shape, mesh, rules)
        name = "/".join(str(p) for p in path)
        lines.append(f"{name}: {tuple(var.value.shape)} {logical} -> {spec}")
    return lines
