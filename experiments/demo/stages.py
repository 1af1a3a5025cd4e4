"""The demo's training stages, each a function over the library's stage entry points
(`train.sft.run_sft`, `train.rft.run_rft`, `train.grpo.run_grpo`): the pretraining phases, the
initial-frames-only baseline, cold-start SFT, RFT and GRPO. Each returns the runtime it leaves
and a dict of statistics; the benchmarks call the same functions."""

from __future__ import annotations

import json
import os

from experiments.demo import data as data_lib
from experiments.demo import pretraining


def stage_config(module, demo, tok, *, protocol: dict, steps: int, batch_size: int, lr: float,
                 seq_len: int, warmup: int = 2, sampling: dict | None = None):
    """A stage config (`experiments/configs/<stage>.py:tiny`) with the demo's model, protocol,
    data sizes and schedule, on one device."""
    import ml_collections

    from vrthinker_jax.train import runtime

    c = module.get_config("tiny")
    c.seed = int(demo.seed)
    c.model = demo.model.copy_and_resolve_references()
    runtime.align_model_config(c.model, tok)
    c.protocol = ml_collections.ConfigDict(dict(protocol))
    c.data.update(dict(batch_size=int(batch_size), frame_size=tuple(demo.frame_size),
                       seq_len=int(seq_len), max_frames=int(demo.max_frames),
                       seed=int(demo.seed), synthesis_weight=float(demo.sft.synthesis_weight)))
    c.mesh.ici = {}  # one device: the demo runs on CPU
    c.optimizer.update(dict(lr=float(lr), warmup_steps=int(min(warmup, max(steps - 1, 0))),
                            total_steps=max(int(steps), 1)))
    c.steps = int(steps)
    c.ckpt_every = 10**6  # only the final checkpoint (the demo is restarted, not resumed)
    c.log_every = 1
    c.progress = bool(demo.progress)
    if sampling is not None:
        c.sampling.update(sampling)
    return c


def sft_config(demo, tok, *, seq_len: int):
    """The tool-using model's cold-start SFT config (`demo.sft`); its runtime is the one every
    stage of that model (and the baseline's start) shares."""
    from experiments.configs import sft as sft_cfgs

    s = demo.sft
    return stage_config(sft_cfgs, demo, tok, protocol=demo.protocol.to_dict(), steps=s.steps,
                        batch_size=s.batch_size, lr=s.lr, seq_len=seq_len,
                        warmup=s.warmup_steps)


def _phases(demo, split, pcfg, train_banks, trace_banks):
    """The pretraining phases `demo.pretrain` asks for, in order: (tag, steps, batch size,
    records, their banks, segments fn or None for frame + caption items, counts)."""
    pt = demo.pretrain
    out = []
    if int(pt.steps) > 0:
        items, counts = pretraining.caption_items(split.train_pairs, split.train_captions,
                                                  float(pt.defect_share))
        out.append(("pretrain", int(pt.steps), int(pt.batch_size), items,
                    [train_banks[it["pair"]] for it in items], None, counts))
    if int(pt.reasoning_steps) > 0:
        out.append(("pretrain_reasoning", int(pt.reasoning_steps), int(pt.reasoning_batch_size),
                    split.train_traces, trace_banks, pretraining.reasoning_segments,
                    {"traces": len(split.train_traces)}))
    if int(pt.call_steps) > 0:
        items, counts = pretraining.call_items(
            split.train_pairs, pcfg.num_candidates, pcfg.max_frames_per_call,
            int(pt.call_steps) * int(pt.call_batch_size), float(pt.call_defect_share),
            int(demo.seed))
        out.append(("pretrain_calls", int(pt.call_steps), int(pt.call_batch_size), items,
                    [train_banks[it["pair"]] for it in items], None, counts))
    return out


def pretrain_stages(demo, split, d: data_lib.StageData, rt, out_dir: str, logger):
    """The pretraining both models start from (`experiments/demo/pretraining.py`), in order:
    one frame and its caption per row; the traces' text without frames (reasoning from given
    syntheses: the format is then known before SFT, whose first steps otherwise shook what
    the calls phase taught); rows of one video's frames and the verdict on them, as the
    oracle's calls show them. Returns (rt, {phase tag: stats})."""
    from experiments.configs import sft as sft_cfgs
    from vrthinker_jax.rollout import chat
    from vrthinker_jax.train import sft

    pt, vt = demo.pretrain, data_lib.tokens_per_frame(demo)
    stats = {}
    for tag, n_steps, batch_size, records, rec_banks, to_segments, counts in _phases(
            demo, split, d.pcfg, d.train_banks, d.trace_banks):
        segments = to_segments or pretraining.mixed_segments  # items: frames + text
        # the longest row: items repeat (oversampling), so each distinct one is measured once
        distinct = {json.dumps(r, sort_keys=True): r for r in records}.values()
        lengths = [chat.tokenize_segments(d.tok, segments(r, d.pcfg), vt) for r in distinct]
        ccfg = stage_config(sft_cfgs, demo, d.tok, protocol=d.proto, steps=n_steps,
                            batch_size=batch_size, lr=pt.lr,
                            seq_len=data_lib.round_up(max(len(t.ids) for t in lengths) + 4, 16),
                            warmup=pt.warmup_steps)
        ccfg.data.max_frames = max(1, max(len(t.frames) for t in lengths))
        ds = (sft.in_memory_dataset(ccfg, records, rec_banks, d.tok, rt,
                                    to_segments=to_segments) if to_segments else
              sft.frame_text_dataset(ccfg, records, rec_banks, d.tok, rt))
        rt, hist = sft.run_sft(ccfg, os.path.join(out_dir, tag), ds, rt=rt, logger=logger,
                               tag=tag)
        stats[tag] = {"steps": len(hist), "loss_first": hist[0]["loss"],
                      "loss_last": hist[-1]["loss"], **counts}
        print(f"[demo] pretraining ({tag}): loss {hist[0]['loss']:.3f} -> "
              f"{hist[-1]['loss']:.3f} over {len(hist)} steps", flush=True)
    return rt, stats


def baseline_stage(demo, d: data_lib.StageData, rt, data_dir: str, out_dir: str, logger):
    """The initial-frames-only baseline: the same starting weights, pairs and labels, SFT on
    one-turn answers under `max_turns=1` (no tool call is possible). Returns (its runtime, its
    ProtocolConfig, stats)."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import sft as sft_cfgs
    from vrthinker_jax.rollout import chat, protocol
    from vrthinker_jax.train import runtime, sft

    b, vt = demo.baseline, data_lib.tokens_per_frame(demo)
    bproto = {**d.proto, "max_turns": 1}
    bpcfg = protocol.ProtocolConfig.from_configdict(bproto)
    direct = [data_lib.direct_answer_trace(t) for t in d.train_traces]
    data_lib.write_jsonl(os.path.join(data_dir, "cot_train_initial_frames_only.jsonl"), direct)
    blen = max(len(chat.tokenize_segments(d.tok, protocol.trace_segments(t, bpcfg), vt).ids)
               for t in direct)
    bcfg = stage_config(sft_cfgs, demo, d.tok, protocol=bproto, steps=b.steps,
                        batch_size=b.batch_size, lr=b.lr,
                        seq_len=data_lib.round_up(blen + 16, 64), warmup=demo.sft.warmup_steps)
    bcfg.data.max_frames = 2 * int(demo.protocol.num_initial_frames)
    # the same starting weights as the tool-using model (the SFT half donates rt's)
    brt = runtime.setup(bcfg, d.tok, model=rt.model(jax.tree.map(jnp.copy, rt.params)))
    bds = sft.in_memory_dataset(bcfg, direct, d.trace_banks, d.tok, brt)
    brt, hist = sft.run_sft(bcfg, os.path.join(out_dir, "baseline_sft"), bds, rt=brt,
                            logger=logger, tag="baseline_sft")
    return brt, bpcfg, {"steps": len(hist), "loss_first": hist[0]["loss"],
                        "loss_last": hist[-1]["loss"]}


def sft_stage(demo, d: data_lib.StageData, cfg, rt, out_dir: str, logger):
    """Cold-start SFT (`cfg`: the SFT stage config) on the oracle traces, with `sft.call_share`
    of the rows call rows drawn afresh (rehearsal). Returns (rt, stats)."""
    from vrthinker_jax.train import sft

    s, pt = demo.sft, demo.pretrain
    rehearsal = {}
    if float(s.call_share) > 0:
        # fresh call rows among the traces (a seed apart from the call phase's rows)
        rows = int(s.steps) * int(s.batch_size)
        calls, rehearsal = pretraining.call_items(
            d.train_pairs, d.pcfg.num_candidates, d.pcfg.max_frames_per_call,
            int(round(rows * float(s.call_share))), float(pt.call_defect_share),
            int(demo.seed) + 1)
        recs, rbanks = pretraining.rehearsal_mix(
            d.train_traces, d.trace_banks, calls, [d.train_banks[it["pair"]] for it in calls],
            rows, int(demo.seed))
        ds = sft.in_memory_dataset(cfg, recs, rbanks, d.tok, rt,
                                   to_segments=pretraining.mixed_segments)
    else:
        ds = sft.in_memory_dataset(cfg, d.train_traces, d.trace_banks, d.tok, rt)
    rt, hist = sft.run_sft(cfg, os.path.join(out_dir, "sft"), ds, rt=rt, logger=logger,
                           tag="sft")
    return rt, {"steps": len(hist), "loss_first": hist[0]["loss"],
                "loss_last": hist[-1]["loss"], "traces": len(d.train_traces), **rehearsal}


def rft_stage(demo, d: data_lib.StageData, rt, out_dir: str, logger):
    """RFT (`demo.rft`): K rollouts per training pair, all-correct traces kept, SFT on them.
    Returns (rt, stats of `rft.run_rft`)."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import rft as rft_cfgs
    from vrthinker_jax.train import rft, rollouts

    r = demo.rft
    rcfg = stage_config(rft_cfgs, demo, d.tok, protocol=d.proto, steps=r.steps,
                        batch_size=r.batch_size, lr=r.lr, seq_len=d.max_len,
                        sampling={**d.sampling, "temperature": float(r.temperature)})
    rcfg.samples_per_prompt = int(r.samples_per_prompt)
    rcfg.max_prompts = min(int(r.max_prompts), len(d.train_records))
    per_batch = max(1, int(r.batch_size) // int(r.samples_per_prompt))
    prompts = rollouts.in_memory_prompts(rcfg, d.train_records, d.train_banks, per_batch)
    rt.params = jax.tree.map(jnp.copy, rt.params)  # the SFT half donates its buffers
    return rft.run_rft(rcfg, os.path.join(out_dir, "rft"), None, d.tok, rt=rt, logger=logger,
                       dataset=prompts)


def grpo_config(demo, d: data_lib.StageData):
    """The GRPO stage config with the demo's `grpo` block (the objective's options included)."""
    from experiments.configs import grpo as grpo_cfgs

    g = demo.grpo
    gcfg = stage_config(grpo_cfgs, demo, d.tok, protocol=d.proto, steps=g.steps,
                        batch_size=g.prompts_per_step, lr=g.lr, seq_len=d.max_len,
                        warmup=int(g.warmup_steps),
                        sampling={**d.sampling, "temperature": float(g.temperature)})
    gcfg.grpo.update(dict(group_size=int(g.group_size), prompts_per_step=int(g.prompts_per_step),
                          kl_coef=float(g.kl_coef), neg_adv_scale=float(g.neg_adv_scale),
                          neg_prob_cap=float(g.neg_prob_cap)))
    return gcfg


def grpo_stage(demo, d: data_lib.StageData, rt, out_dir: str, logger):
    """GRPO (`demo.grpo`) on the training prompts. Returns (rt, stats: per-step rewards)."""
    import jax
    import jax.numpy as jnp

    from vrthinker_jax.train import grpo, rollouts

    gcfg = grpo_config(demo, d)
    prompts = rollouts.in_memory_prompts(gcfg, d.train_records, d.train_banks,
                                         int(demo.grpo.prompts_per_step))
    rt.params = jax.tree.map(jnp.copy, rt.params)
    rt, ghist = grpo.run_grpo(gcfg, os.path.join(out_dir, "grpo"), None, d.tok, rt=rt,
                              logger=logger, dataset=prompts)
    return rt, {"steps": len(ghist), "reward": [h["reward"] for h in ghist],
                "reward_accuracy": [h["reward_accuracy"] for h in ghist],
                "reward_format": [h["reward_format"] for h in ghist],
                "rows_in_update": [h["rows_in_update"] for h in ghist]}
