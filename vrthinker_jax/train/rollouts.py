"""What both rollout stages (RFT and GRPO) need: the engine over the runtime's model, prompt
batches (from a manifest through Grain, or from records whose frame banks are in memory),
labels as dicts, and one batch of rollouts in engine calls of a bounded size across processes.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import schema
from vrthinker_jax.rollout import protocol
from vrthinker_jax.train import examples, runtime


def make_engine(cfg, rt: runtime.Runtime, tokenizer, params=None, sampling=None):
    """A rollout engine over the runtime's model on the 'rollout' role's mesh (the learner's
    unless `cfg.roles.rollout` names another; params are then resharded onto it), laid out by
    that mesh's sharding rules."""
    from vrthinker_jax.rollout import engine as engine_lib

    sampling = sampling if sampling is not None else cfg.sampling
    return engine_lib.RolloutEngine(
        rt.model(params), rt.model_cfg, tokenizer,
        protocol.ProtocolConfig.from_configdict(cfg.protocol),
        sampling, tuple(cfg.data.frame_size), mesh=rt.role_mesh("rollout"),
        cache_dtype=jnp.dtype(sampling.cache_dtype), rules=rt.role_rules("rollout"),
    )


def prompt_dataset(cfg, pairs, prompts_per_step: int, *, shuffle: bool | None = None
                   ) -> grain.MapDataset:
    """Prompt batches (id, prompt, bank, labels [b, 4], failed) of this process from a
    video_pairs manifest or records, through the Grain pipeline (videos decoded into
    candidate-frame banks). prompts_per_step: the global batch (all processes together)."""
    from data_pipelines import grain_pipelines

    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.batch_size = prompts_per_step
    if shuffle is not None:
        data_cfg.shuffle = shuffle
    return grain_pipelines.prompt_dataset(pairs, data_cfg,
                                          num_candidates=cfg.protocol.num_candidates)


def in_memory_prompts(cfg, records: list[dict], banks: list[np.ndarray],
                      prompts_per_step: int) -> grain.MapDataset:
    """Prompt batches from records ({id, prompt, labels}) whose banks are already in memory
    (one process: the records are not sharded)."""
    if len(records) != len(banks) or not records:
        raise ValueError(f"{len(records)} prompt records but {len(banks)} frame banks")

    def row(item):
        rec, bank = item
        return examples.prompt_row(rec["id"], rec["prompt"], bank,
                                   schema.labels_array(rec["labels"]))

    ds = grain.MapDataset.source(list(zip(records, banks)))
    if cfg.data.shuffle:
        ds = ds.shuffle(seed=int(cfg.data.seed))
    return ds.repeat(None).map(row).batch(prompts_per_step, drop_remainder=True,
                                          batch_fn=examples.collate_prompts)


def label_dict(labels_row) -> dict[str, int]:
    """int32 [4] labels (protocol.LABEL_KEYS order, -1 = unlabelled) -> {key: label}."""
    return {k: int(v) for k, v in zip(protocol.LABEL_KEYS, labels_row)}


def rollout_rows(engine, prompts: list[str], banks: np.ndarray, key: jax.Array, *,
                 total_rows: int, per_call: int) -> list:
    """This process's trajectories of a `total_rows`-row rollout batch (all processes
    together), in engine calls of `per_call` global rows: the bound on the rollout's KV cache.

    prompts, banks: this process's rows (banks uint8 [rows, 2N, H, W, 3]); each process holds
    the same share of every call; call i > 0 samples with `fold_in(key, i)`. With one call
    (per_call == total_rows) the global rows and key are those of one process; with several,
    a call holds each process's next block, which differs from one process's split."""
    if total_rows % per_call:
        raise ValueError(f"{per_call} rows per engine call must divide the {total_rows} rows "
                         "of the rollout batch")
    trajs, share = [], len(prompts) / total_rows
    for i in range(0, total_rows, per_call):
        sub = key if i == 0 else jax.random.fold_in(key, i)
        lo, hi = int(i * share), int((i + per_call) * share)
        trajs += engine.rollout(prompts[lo:hi], banks[lo:hi], sub)
    return trajs
