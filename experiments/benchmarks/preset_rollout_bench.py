"""The preset engine against the release's loop in transformers, same conversation, same machine.

Both sides run the same tiny random Qwen2.5-VL (saved as a Hugging Face directory) under the
`vr-thinker` preset, greedy, with scripted tool calls (tests/release_reference.py: a random model
never calls the tool, so each turn's text is wrapped into a well-formed turn with a call): 3
calls of 3 / 2 / 4 frames, then an answer, `--turn-tokens` generated tokens per turn. The
transformers side is the release's loop (re-render every turn with qwen-agent's messages and
the processor, strip the older tool images, `generate` on the whole prompt), one row at a time
as the release's per-request loop does; the engine runs all rows as one batch, re-prefilling
each turn only from the first changed token. Both sides produce the same tokens (the slow test
`tests/test_preset_engine.py` checks it; this bench checks it again). Each side is timed
`--repeats` times after a warm-up run; medians. Prints one JSON line; `ratio` = transformers
seconds / engine seconds.

Test-only dependencies (transformers, qwen-agent): run with the test environment.

  .venv/bin/python experiments/benchmarks/preset_rollout_bench.py --batch 4 --turn-tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="rows (pairs) per rollout")
    ap.add_argument("--turn-tokens", type=int, default=16, help="generated tokens per turn")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    from data_pipelines import tokenizer as tok_lib
    from tests import release_reference as ref
    from tests.test_tokenizer import QWEN25VL_TEMPLATE
    from vrthinker_jax import checkpoints
    from vrthinker_jax.rollout import preset_engine, render

    d = os.path.join(tempfile.mkdtemp(), "hf")
    hf = ref.tiny_release_checkpoint(d, QWEN25VL_TEMPLATE)
    preset = ref.tiny_preset(args.turn_tokens)
    model, _ = checkpoints.load_model(d)
    tok = tok_lib.load_tokenizer(d)
    engine = preset_engine.PresetEngine(model, tok, render.ChatTemplate.from_dir(d), preset,
                                        max_len=4096, buckets=(256, 1024))
    proc = ref.preset_processor(preset, os.path.join(d, "tokenizer.json"), QWEN25VL_TEMPLATE)
    rng = np.random.default_rng(0)
    cands = [rng.integers(0, 256, (96, ref.TINY_H, ref.TINY_W, 3), dtype=np.uint8)
             for _ in range(args.batch)]
    prompts = [f"pair {i}: a dog runs after a ball" for i in range(args.batch)]
    banned = list(engine.static.banned_ids) + list(range(tok.vocab_size, model.config.text
                                                         .vocab_size))

    def run_engine():
        return engine.rollout(prompts, cands, jax.random.key(0), script=ref.script)

    def run_hf():
        return [ref.release_loop(hf, proc, preset, tok, p, c, i, banned=banned)
                for i, (p, c) in enumerate(zip(prompts, cands))]

    t0 = time.perf_counter()
    trajs = run_engine()
    cold = time.perf_counter() - t0
    want = run_hf()
    same = all(len(t.generated) == len(w) and all(np.array_equal(a, b) for a, b in
                                                  zip(t.generated, w))
               for t, w in zip(trajs, want))
    compiles = engine.compile_count()
    eng_s, hf_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_engine()
        eng_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_hf()
        hf_s.append(time.perf_counter() - t0)
    engine.stats = dict.fromkeys(engine.stats, 0)
    run_engine()
    st = engine.stats
    tokens = sum(len(g) for t in trajs for g in t.generated)
    out = {
        "bench": "preset_rollout", "preset": preset.name, "batch": args.batch,
        "turns": len(trajs[0].generated), "turn_tokens": args.turn_tokens,
        "generated_tokens": tokens, "same_tokens": same,
        "engine_s": round(float(np.median(eng_s)), 3), "hf_s": round(float(np.median(hf_s)), 3),
        "ratio": round(float(np.median(hf_s) / np.median(eng_s)), 2),
        "engine_cold_s": round(cold, 2), "compiles": compiles,
        "prefilled_tokens": int(st["prefill_tokens"]), "reused_tokens": int(st["reused_tokens"]),
        "phase_s": {k: round(float(st[k]), 3) for k in ("render_s", "vision_s", "prefill_s",
                                                        "decode_s")},
        "device": jax.devices()[0].platform,
    }
    print(json.dumps(out))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
