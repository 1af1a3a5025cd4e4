"""Pieces shared by the stage configs: model size, protocol, data, mesh, optimizer per size.

Sizes: `tiny` (CPU, random weights, synthetic data), `3b`, `7b` (TPU pods, release protocol).
Every value can be overridden on the command line, e.g. `--config.optimizer.lr=2e-5`,
`--config.mesh.ici.tensor=4`, `--config.mesh.dcn.data=2` (multi-slice),
`--config.mesh.rules.embed="('fsdp', 'tensor')"` (how arrays split over the mesh axes).
"""

from __future__ import annotations

import ml_collections

from data_pipelines.grain_pipelines import data_config
from vrthinker_jax import sharding
from vrthinker_jax.models import config as model_config
from vrthinker_jax.rollout.protocol import protocol_config
from vrthinker_jax.rollout.sampler import sampling_config
from vrthinker_jax.train.steps import optimizer_config

SIZES = ("tiny", "3b", "7b", "demo")
# sizes that run on CPU: "tiny", and "demo" = tiny with the demo's model, protocol and frame
# size (`demo_base`), so `train.py` trains on a demo run's data and tokenizer as they are
CPU_SIZES = ("tiny", "demo")


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    return size


def tiny_protocol() -> ml_collections.ConfigDict:
    # 16 candidates per video, 4 initial each, 56 px frames (4 tokens each): the synthetic
    # needle traces (3 tool calls, 26 frames) take up to ~1.8k tokens with the tiny tokenizer;
    # the same protocol as the synthetic needle data (data_pipelines/synthetic.default_protocol)
    return protocol_config(
        num_candidates=16, num_initial_frames=4, max_turns=4, max_frames_per_call=6,
        memory_window=20,
    )


def mesh_config(ici: dict, dcn: dict | None = None, devices=()) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # which of this process's devices the mesh uses: (start, stop) into jax.devices(), () = all;
    # disjoint ranges put roles on separate devices (cfg.roles, cfg.meshes)
    m.devices = tuple(devices)
    # devices per mesh axis inside a slice ('data', 'fsdp', 'tensor'); one may be -1 (the rest)
    m.ici = ml_collections.ConfigDict(ici)
    # slices per mesh axis (multi-slice TPU over DCN); the axis size is ici * dcn
    m.dcn = ml_collections.ConfigDict(dcn or {"data": 1, "fsdp": 1, "tensor": 1})
    # logical axis name -> tuple of mesh axes, for the arrays on this mesh (params, optimizer
    # state, batches, rollout state): each rule and why in `vrthinker_jax.sharding.rules_config`;
    # e.g. `--config.mesh.rules.embed="('fsdp', 'tensor')"`; () = replicated
    m.rules = sharding.rules_config()
    return m


def demo_base() -> ml_collections.ConfigDict:
    """The tiny config with `experiments/configs/demo.py`'s model, protocol, frame size and
    frame slots: the data (`<demo out>/data/cot_train.jsonl`, `train.jsonl`) and tokenizer
    (`<demo out>/tokenizer`) of a demo run fit it without overrides."""
    from experiments.configs import demo

    d = demo.get_config("default")
    c = base("tiny")
    c.size = "demo"
    c.model = d.model.copy_and_resolve_references()
    c.protocol = protocol_config(**d.protocol.to_dict())
    c.data.frame_size = tuple(d.frame_size)
    c.data.max_frames = int(d.max_frames)
    return c


def base(size: str) -> ml_collections.ConfigDict:
    size = check_size(size)
    if size == "demo":
        return demo_base()
    c = ml_collections.ConfigDict()
    c.size = size
    c.seed = 0  # model init and training RNG
    c.model = model_config.get_config(size)
    c.init_params = ""  # params dir from a previous stage (`<workdir>/params`); "" = random init
    c.tokenizer = ""  # tokenizer.json (Qwen) or sentencepiece .model
    c.train_data = ""  # training file (stage specific, see the stage config)
    if size == "tiny":
        c.protocol = tiny_protocol()
        c.data = data_config(batch_size=8, frame_size=(56, 56), seq_len=2048, max_frames=26)
        # 8 simulated or real devices split the batch; params are small enough to replicate
        c.mesh = mesh_config({"data": -1, "fsdp": 1, "tensor": 1})
        c.optimizer = optimizer_config(lr=1e-3, warmup_steps=20, total_steps=400, b2=0.98)
    else:
        c.protocol = protocol_config()  # release: 128 candidates, 4 initial, 6 turns, 12 per call
        # 448 px frames -> 256 tokens each; 8 initial + 5 calls x 12 = 68 frames -> ~18k tokens
        c.data = data_config(batch_size=64, frame_size=(448, 448), seq_len=20480, max_frames=68)
        # a v5p-128 / v6e-256 slice: ZeRO-3 over fsdp, heads/MLP over tensor
        c.mesh = mesh_config({"data": 1, "fsdp": -1, "tensor": 4 if size == "7b" else 2})
        c.model.dtype = "bfloat16"  # compute
        c.model.param_dtype = "float32"  # master weights (optimizer state follows: fp32)
        c.model.remat = True
        c.model.scan_layers = True
        # 20k-token rows: float32 scores per layer would be [heads, 20k, 20k]; chunked they stay
        # [heads, 2048, 20k] (tools/plan.py checks the fit)
        c.model.attn_query_chunk = 2048
        c.model.lm_head_chunk = 2048
        c.model.seq_parallel = True
        c.optimizer = optimizer_config(lr=1e-6, warmup_steps=20, total_steps=2000,
                                       weight_decay=0.01)
    c.steps = 300 if size == "tiny" else 2000  # micro-steps (batches) to train
    c.log_every = 10  # steps between TensorBoard scalar writes
    c.ckpt_every = 50 if size == "tiny" else 200  # steps between checkpoints
    c.keep_checkpoints = 3  # newest checkpoints kept
    c.progress = True  # tqdm progress bar with ETA
    # roles -> meshes (tunix-style): all share the one mesh unless a config maps them elsewhere:
    # a role named to another mesh uses `meshes.<name>` (a mesh_config; e.g. the learner on
    # devices 0-3 and rollout + reference on 4-7), and the actor's mesh must be `main`; a role's
    # arrays are laid out by its mesh block's `rules`
    c.roles = ml_collections.ConfigDict(dict(actor="main", reference="main", rollout="main"))
    c.meshes = ml_collections.ConfigDict()
    return c


def rollout_sampling(size: str) -> ml_collections.ConfigDict:
    """The sampling block of the stages that roll out while training (rft, grpo): temperature
    1 (the rollouts are the policy's own samples) and static shapes for the size."""
    c = sampling_config(temperature=1.0)
    if size in CPU_SIZES:
        c.update(dict(max_len=2304, max_new_tokens=1024, max_turn_tokens=256,
                      prompt_buckets=(512, 1024)))
    else:
        c.update(dict(max_len=20480, max_new_tokens=3072, max_turn_tokens=768,
                      prompt_buckets=(3072, 4096),
                      # one prefill pass: a TPU prefill is compute-bound (chunks re-read the
                      # weights), and it is what tools/plan.py compiles
                      prefill_chunk=0))
    return c

