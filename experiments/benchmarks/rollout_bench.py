"""Rollout engine vs transformers `generate` on CPU: tokens/s, tool calls, compile count.

Both sides run the same tiny Qwen2.5-VL weights (a random transformers model imported with
`checkpoints.hf.from_state_dict`), the same batch and greedy decoding on the protocol's first
prompt (initial frames of both videos as images). The rollout additionally serves K forced
`select_frames` calls per row (`--force-tool-calls K`: a turn that ends without a call gets a
canonical call injected), so its tokens/s includes the environment inserts; transformers just
generates the same number of new tokens per row from the first prompt.

`compiles` counts XLA compilations (jax_log_compiles) during the first, cold rollout; run with
K=1 and K=6 to see they are equal. Each side is timed `--repeats` times, alternating, and the
medians are reported (rollout_s, hf_s; per-pair ratios in ratio_runs). Prints one JSON line.

  python experiments/benchmarks/rollout_bench.py --batch 8 --force-tool-calls 6
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


class _CompileCounter(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Finished XLA compilation"):
            self.count += 1


def _tokenizer(tmpdir: str, vocab: int):
    from data_pipelines.tokenizer import load_tokenizer, train_sentencepiece
    from vrthinker_jax.rollout import protocol

    lines = [
        protocol.DEFAULT_SYSTEM_PROMPT,
        protocol.format_tool_turn("video 1 is sharper", "look again", {"TA": 1, "MQ": 2, "VQ": 0,
                                  "OA": 1}, [3, 17, 30]),
        protocol.format_final_turn("similar", "video 2 moves better", {"TA": 0, "MQ": 2, "VQ": 2,
                                   "OA": 2}),
        "After selecting frames: here are the selected frames. Frame 12: Video 1: Video 2:",
        "Prompt: a red fox runs through the snow. Each video has 16 frames.",
    ] * 20
    return load_tokenizer(train_sentencepiece(lines, tmpdir, vocab))


def _model_config(size: str, tok):
    from vrthinker_jax.models import config as model_config

    cfg = model_config.get_config("tiny")
    if size == "small":
        # a few times the tiny decoder: 4 layers of width 256
        cfg.text.hidden_size, cfg.text.num_hidden_layers = 256, 4
        cfg.text.num_attention_heads, cfg.text.num_key_value_heads = 4, 2
        cfg.text.head_dim, cfg.text.intermediate_size = 64, 704
        cfg.text.mrope_section = (8, 12, 12)
        cfg.vision.out_hidden_size = 256
    elif size != "tiny":
        raise ValueError(f"--size must be tiny or small, got {size!r}")
    cfg.image_token_id = tok.token_to_id("<|image_pad|>")
    cfg.video_token_id = tok.token_to_id("<|video_pad|>")
    cfg.vision_start_token_id = tok.token_to_id("<|vision_start|>")
    cfg.vision_end_token_id = tok.token_to_id("<|vision_end|>")
    return model_config.validate(cfg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", default="tiny", help="tiny | small")
    p.add_argument("--force-tool-calls", type=int, default=1, help="tool calls per row (K)")
    p.add_argument("--turn-tokens", type=int, default=32, help="tokens per assistant turn")
    p.add_argument("--frame", type=int, nargs=2, default=(56, 56), help="frame height width")
    p.add_argument("--max-len", type=int, default=0,
                   help="KV-cache slots per row (0 = sized for the prompt and K calls)")
    p.add_argument("--serve-fraction", type=float, default=None,
                   help="sampling.serve_fraction (default: the config's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per side, alternating (medians are reported)")
    args = p.parse_args(argv)
    if args.force_tool_calls < 0 or args.batch < 1:
        print("rollout_bench: --force-tool-calls must be >= 0 and --batch >= 1", file=sys.stderr)
        return 2

    import jax
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vrthinker_jax.checkpoints import hf
    from vrthinker_jax.models import config as model_config
    from vrthinker_jax.rollout import chat, engine, frame_bank, protocol, sampler

    k = args.force_tool_calls
    frame = tuple(args.frame)
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(tmp, 400)
    cfg = _model_config(args.size, tok)
    torch.manual_seed(0)
    hf_cfg = Qwen2_5_VLConfig(**model_config.to_hf_config(cfg))
    hf_cfg._attn_implementation = "eager"
    hf_model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    model = hf.from_state_dict(cfg, {n: t.detach().numpy() for n, t in
                                     hf_model.state_dict().items()})

    pcfg = protocol.ProtocolConfig(
        num_candidates=16, num_initial_frames=4, max_turns=max(k + 1, 2), max_frames_per_call=6,
        memory_window=20, system_prompt="Compare video 1 and video 2. Look at frames.",
    )
    turns = k + 1
    scfg = sampler.sampling_config(
        temperature=0.0, max_len=args.max_len or 4096, max_new_tokens=turns * args.turn_tokens,
        max_turn_tokens=args.turn_tokens, prompt_buckets=(256, 512),
    )
    if args.serve_fraction is not None:
        scfg.serve_fraction = args.serve_fraction
    eng = engine.RolloutEngine(model, cfg, tok, pcfg, scfg, frame)
    if not args.max_len:  # the smallest cache the conversation fits, like a sized config
        prompt = len(chat.tokenize_segments(tok, protocol.prompt_segments("x" * 60, pcfg),
                                            eng.tokens_per_frame).ids)
        need = prompt + turns * args.turn_tokens + k * eng.resp_len + 1
        # one prompt bucket that fits the prompt (rounded up to 64), like a sized config
        scfg.prompt_buckets = (int(-(-prompt // 64) * 64),)
        scfg.max_len = int(-(-max(need, scfg.prompt_buckets[0] + args.turn_tokens + 1) // 64)
                           * 64)
        eng = engine.RolloutEngine(model, cfg, tok, pcfg, scfg, frame)
    rng = np.random.default_rng(0)
    banks = rng.integers(0, 256, (args.batch, pcfg.total_frames) + frame + (3,), np.uint8)
    prompts = [f"a red fox runs through the snow, take {i}" for i in range(args.batch)]

    counter = _CompileCounter()
    logging.getLogger("jax").addHandler(counter)
    logging.getLogger("jax").propagate = False  # count, do not print
    jax.config.update("jax_log_compiles", True)
    trajs = eng.rollout(prompts, banks, jax.random.key(0), force_tool_calls=k)
    jax.config.update("jax_log_compiles", False)
    compiles = counter.count
    generated = sum(int(t.loss_mask.sum()) for t in trajs)
    tool_calls = [t.tool_calls for t in trajs]

    # transformers: same weights, batch and first prompt; greedy, same new tokens per row
    segs = protocol.prompt_segments(prompts[0], pcfg)
    t = chat.tokenize_segments(tok, segs, eng.tokens_per_frame)
    pv = np.concatenate([frame_bank.patchify_numpy(banks[i][np.asarray(t.frames) - 1],
                                                   eng.patch).reshape(-1, eng.patch.patch_dim)
                         for i in range(args.batch)])
    grid = np.asarray([eng.patch.grid_thw(*frame)] * (len(t.frames) * args.batch))
    ids = torch.as_tensor(np.tile(t.ids.astype(np.int64), (args.batch, 1)))
    kw = dict(pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(grid),
              mm_token_type_ids=(ids == cfg.image_token_id).long(), do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    per_row = max(1, generated // args.batch)

    # The two sides alternate, one timed run each per repeat, and medians are reported: the
    # machine is shared, and timing all of one side before the other lets load drift decide
    # the ratio.
    times, hf_times, runs = [], [], []
    with torch.no_grad():
        hf_model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        for r in range(args.repeats):
            eng.stats = dict.fromkeys(eng.stats, 0)
            t0 = time.perf_counter()
            trajs = eng.rollout(prompts, banks, jax.random.key(r + 1), force_tool_calls=k)
            times.append(time.perf_counter() - t0)
            runs.append({key: round(v, 3) for key, v in eng.stats.items()})
            t0 = time.perf_counter()
            out = hf_model.generate(ids, max_new_tokens=per_row, min_new_tokens=per_row, **kw)
            hf_times.append(time.perf_counter() - t0)
    hf_generated = int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    med = float(np.median(times))
    hf_med = float(np.median(hf_times))
    phases = runs[int(np.argsort(times)[len(times) // 2])]
    generated = sum(int(t.loss_mask.sum()) for t in trajs)
    tool_calls = [t.tool_calls for t in trajs]

    tokens_per_s = generated / med
    hf_tokens_per_s = hf_generated / hf_med
    print(json.dumps({
        "size": args.size, "batch": args.batch, "force_tool_calls": k,
        "tokens_per_s": round(tokens_per_s, 1), "hf_tokens_per_s": round(hf_tokens_per_s, 1),
        "ratio": round(tokens_per_s / hf_tokens_per_s, 2),
        "tool_calls": int(sum(tool_calls)), "tool_calls_per_row": sorted(set(tool_calls)),
        "compiles": compiles, "rollout_fn_compiles": eng.compile_count(),
        "generated_tokens": generated, "rollout_s": round(med, 3),
        "hf_generated_tokens": hf_generated, "hf_s": round(hf_med, 3),
        "rollout_s_runs": [round(x, 3) for x in times],
        "hf_s_runs": [round(x, 3) for x in hf_times],
        # ratio of each alternating pair (same load), for judging the noise
        "ratio_runs": [round((generated / a) / (hf_generated / h), 2)
                       for a, h in zip(times, hf_times)],
        "cache_slots": eng.static.size,
        "serve_fraction": scfg.serve_fraction, "phases": phases, "turn_tokens": args.turn_tokens,
        "devices": jax.device_count(), "backend": jax.default_backend(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
