"""What every stage sets up the same way: mesh, model, params on the mesh, logging.

Roles (actor, reference, rollout) map to named meshes by config, tunix-style (`cfg.roles`,
`cfg.meshes`). By default all roles share the `main` mesh; then the rollout reads the learner's
parameter arrays directly (no copy, no host round trip) and the reference is a second set of
arrays laid out the same way. A role on another mesh (e.g. disjoint devices) gets the params
resharded onto it device to device (`jax.device_put`), once per rollout batch for the rollout.
Each mesh block carries its sharding rules (`mesh.rules`, `meshes.<name>.rules`: logical axis ->
mesh axes, `sharding.rules_config`); a role's arrays are laid out by its mesh's rules.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from vrthinker_jax import sharding
from vrthinker_jax.rollout import chat, frame_bank
from vrthinker_jax.train import steps


@dataclasses.dataclass
class Runtime:
    """mesh (None = one device, no explicit shardings); graphdef + params: the split model;
    spec: static step settings (its `rules` are `rules`); merged_grid: (rows, cols) of one
    frame's visual tokens; rules: the actor mesh's sharding rules (`cfg.mesh.rules`, frozen)."""

    mesh: Mesh | None
    model_cfg: ml_collections.ConfigDict
    graphdef: object
    params: nnx.State
    spec: steps.StepSpec
    merged_grid: tuple[int, int]
    # role -> its mesh ('actor' is `mesh`); roles not configured share `mesh`
    role_meshes: dict = dataclasses.field(default_factory=dict)
    rules: ml_collections.FrozenConfigDict = sharding.DEFAULT_RULES
    # role -> the sharding rules of its mesh; roles not configured use `rules`
    rules_by_role: dict = dataclasses.field(default_factory=dict)

    def role_mesh(self, role: str) -> Mesh | None:
        return self.role_meshes.get(role, self.mesh)

    def role_rules(self, role: str) -> ml_collections.FrozenConfigDict:
        return self.rules_by_role.get(role, self.rules)

    @property
    def tokens_per_frame(self) -> int:
        return self.merged_grid[0] * self.merged_grid[1]

    def model(self, params=None) -> nnx.Module:
        """A model object carrying `params` (default: the runtime's)."""
        return nnx.merge(self.graphdef, self.params if params is None else params)


def make_mesh(mesh_cfg: ml_collections.ConfigDict) -> Mesh | None:
    """cfg.mesh (a `common.mesh_config`) -> Mesh, or None for `mesh.ici` empty (plain
    single-device jit). `mesh.devices` = (start, stop) builds it over that range of
    jax.devices()."""
    if not mesh_cfg.ici:
        return None
    devices = None
    rng = tuple(mesh_cfg.devices)
    if rng:
        if len(rng) != 2 or not 0 <= rng[0] < rng[1] <= jax.device_count():
            raise ValueError(f"mesh.devices: expected (start, stop) within the "
                             f"{jax.device_count()} devices, got {rng}")
        devices = jax.devices()[rng[0]:rng[1]]
    return sharding.make_mesh(dict(mesh_cfg.ici), dict(mesh_cfg.dcn), devices)


def role_mesh_configs(cfg: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """role -> its mesh block from `cfg.roles` (role -> mesh name; 'main' is `cfg.mesh`, others
    `cfg.meshes.<name>`). The actor (learner) must be on 'main'."""
    if cfg.roles.actor != "main":
        raise ValueError(f"roles.actor must be 'main' (the learner's mesh), got "
                         f"{cfg.roles.actor!r}")
    out = {}
    for role, name in cfg.roles.items():
        if name != "main" and name not in cfg.meshes:
            raise ValueError(f"roles.{role}={name!r}: no mesh config `meshes.{name}`")
        out[role] = cfg.mesh if name == "main" else cfg.meshes[name]
    return out


def make_role_meshes(cfg: ml_collections.ConfigDict) -> dict[str, Mesh | None]:
    """role -> Mesh from `cfg.roles` (`role_mesh_configs`); roles naming one mesh share it."""
    configs = role_mesh_configs(cfg)
    built = {"main": make_mesh(cfg.mesh)}
    out = {}
    for role, name in cfg.roles.items():
        if name not in built:
            built[name] = make_mesh(configs[role])
            if built[name] is None:
                raise ValueError(f"meshes.{name}: set its ici sizes")
        out[role] = built[name]
    if any(m is None for m in out.values()) and any(m is not None for m in out.values()):
        raise ValueError("roles: give `mesh` ici sizes when another role has its own mesh")
    return out


def make_role_rules(cfg: ml_collections.ConfigDict) -> dict[str, ml_collections.FrozenConfigDict]:
    """role -> the sharding rules of its mesh block (`mesh.rules`, `meshes.<name>.rules`),
    frozen (`sharding.freeze_rules`: hashable, mesh axes checked)."""
    return {role: sharding.freeze_rules(m.rules) for role, m in role_mesh_configs(cfg).items()}


def align_model_config(model_cfg: ml_collections.ConfigDict, tokenizer) -> None:
    """Sets the model's vision token ids from the tokenizer (the tiny model is trained with the
    project's own tokenizer, whose ids differ from Qwen's); checks the vocabulary fits."""
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                         f"text.vocab_size={model_cfg.text.vocab_size}")
    model_cfg.image_token_id = int(tokenizer.token_to_id(chat.IMAGE_PAD))
    model_cfg.video_token_id = int(tokenizer.token_to_id("<|video_pad|>"))
    model_cfg.vision_start_token_id = int(tokenizer.token_to_id(chat.VISION_START))
    model_cfg.vision_end_token_id = int(tokenizer.token_to_id(chat.VISION_END))


def build_model(cfg: ml_collections.ConfigDict) -> nnx.Module:
    """The model of `cfg.model`, randomly initialised with `cfg.seed` (`setup` then reads
    `cfg.init_params` into it, already laid out on the mesh)."""
    from vrthinker_jax.models import model as model_lib

    return model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(int(cfg.seed)))


def setup(cfg: ml_collections.ConfigDict, tokenizer, *, model: nnx.Module | None = None
          ) -> Runtime:
    """Mesh, model (built unless given) with params placed on the mesh, step spec."""
    role_meshes = make_role_meshes(cfg)
    mesh = role_meshes["actor"]
    rules_by_role = make_role_rules(cfg)
    rules = rules_by_role["actor"]
    # a given model keeps its weights; a built one takes `cfg.init_params` if set (the
    # previous stage's `export_params`; "" = keep the random init)
    init_params = cfg.init_params if model is None else ""
    model = build_model(cfg) if model is None else model
    mcfg = model.config
    pad = tokenizer.token_to_id(chat.IMAGE_PAD)
    if int(mcfg.image_token_id) != int(pad):
        raise ValueError(
            f"model image_token_id={mcfg.image_token_id} but the tokenizer maps "
            f"{chat.IMAGE_PAD} to {pad}: model and tokenizer do not belong together"
        )
    if tokenizer.vocab_size > mcfg.text.vocab_size:
        raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                         f"text.vocab_size={mcfg.text.vocab_size}")
    graphdef, params = nnx.split(model)
    if mesh is not None:
        params = sharding.shard_state(params, mesh, rules)
    if init_params:  # read into the mesh layout: every process reads only its shards
        params = load_params(init_params, params)
    patch = frame_bank.PatchSpec.from_model_config(mcfg)
    h, w = cfg.data.frame_size
    return Runtime(
        mesh=mesh, model_cfg=mcfg, graphdef=graphdef, params=params,
        spec=steps.StepSpec(patch, rules=rules), merged_grid=patch.merged_grid(int(h), int(w)),
        role_meshes=role_meshes, rules=rules, rules_by_role=rules_by_role,
    )


class NothingLearnedError(ValueError):
    """A training run whose loss never had a token to learn from (every example rejected)."""


def check_run_counts(cfg: ml_collections.ConfigDict, tag: str) -> None:
    """Refuses nonsense counts before any work: a run of `steps <= 0` would write an untrained
    export, and `log_every` / `ckpt_every` of 0 divide by zero mid-run."""
    for key in ("steps", "ckpt_every", "log_every"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{tag}: config field {key}={value!r}: expected a positive integer")
    batch = cfg.data.batch_size
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{tag}: config field data.batch_size={batch!r}: expected a positive "
                         "integer")


# --------------------------------------------------------------------------- params export


def export_params(directory: str, params: nnx.State) -> str:
    """Writes the params alone (orbax, pure-dict tree) for the next stage / evaluation."""
    directory = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, nnx.to_pure_dict(params), force=True)
    return directory


def load_params(directory: str, params_like: nnx.State) -> nnx.State:
    """Reads `export_params` output into the structure / shardings of `params_like`."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"init_params: {directory} is not a directory")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params_like))
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(os.path.abspath(directory), abstract)
    out = jax.tree.map(lambda x: x, params_like)
    nnx.replace_by_pure_dict(out, pure)
    return out


# --------------------------------------------------------------------------- logging


class TrainLogger:
    """TensorBoard event file (scalars, text, images) plus `metrics.jsonl`, no TensorFlow."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._writer = EventFileWriter(logdir)
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def rewind(self, tag: str, step: int) -> None:
        """Drops `tag`'s metrics.jsonl lines of steps >= `step`: a resumed run redoes the steps
        after its last checkpoint, and each step must be logged once. Other tags' lines (one
        logger may serve several stages) are kept."""
        path = os.path.join(self.logdir, "metrics.jsonl")
        self._jsonl.close()
        with open(path) as f:
            lines = f.readlines()
        prefix = f"{tag}/"

        def replayed(line: str) -> bool:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill mid-write
                return True
            keys = [k for k in rec if k != "step"]
            return (rec.get("step", -1) >= step and bool(keys)
                    and all(k.startswith(prefix) for k in keys))

        kept = [ln for ln in lines if ln.strip() and not replayed(ln)]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(ln if ln.endswith("\n") else ln + "\n" for ln in kept)
        os.replace(tmp, path)
        self._jsonl = open(path, "a")  # noqa: SIM115

    def _emit(self, step: int, value) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[value])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        for tag, v in values.items():
            self._emit(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(v)))
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v)
                                                             for k, v in values.items()}}) + "\n")
        self._jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        from tensorboard.plugins.text import summary_v2

        self._writer.add_event(self._event(step, summary_v2.text_pb(tag, text)))

    def image(self, step: int, tag: str, pixels: np.ndarray) -> None:
        """pixels uint8 [H, W, 3], stored as PNG."""
        from PIL import Image
        from tensorboard.compat.proto import summary_pb2

        buf = io.BytesIO()
        Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format="PNG")
        img = summary_pb2.Summary.Image(height=pixels.shape[0], width=pixels.shape[1],
                                        colorspace=3, encoded_image_string=buf.getvalue())
        self._emit(step, summary_pb2.Summary.Value(tag=tag, image=img))

    @staticmethod
    def _event(step, summary):
        from tensorboard.compat.proto import event_pb2

        return event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        self._jsonl.close()
