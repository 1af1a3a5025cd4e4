"""Write what a published checkpoint sees: the model inputs of a pair's prompt under a preset.

    python -m vrthinker_jax.tools.render --checkpoint HF_DIR --preset vr-thinker \
        --prompt TEXT --video-a A.mp4 --video-b B.mp4 [--turns TURNS.json] --out OUT.npz

HF_DIR is the checkpoint's Hugging Face directory (its tokenizer.json and chat template are
read; no weights). TURNS.json is a JSON list of assistant turn texts, each ending in a tool
call: OUT.npz then holds the prompt after those turns and the environment's answers (the
preset's memory rule applied). OUT.npz holds the transformers processor's names: input_ids
[1, L], pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts
(empty where there are none) and text (the rendered conversation); `python -m
vrthinker_jax.tools.forward --inputs OUT.npz` accepts it. Bad input: one error line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _fail(msg: str) -> int:
    print(f"render: error: {msg}", file=sys.stderr)
    return 2


def read_turns(path: str) -> list[str]:
    """TURNS.json -> list of turn texts; ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            turns = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read turns ({e})") from None
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{path}: expected a JSON list of assistant turn texts")
    return turns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vrthinker_jax.tools.render",
                                description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="Hugging Face directory with tokenizer.json and a chat template")
    p.add_argument("--preset", required=True, help="a shipped preset name or a .toml path")
    p.add_argument("--prompt", required=True, help="the text prompt the videos were made for")
    p.add_argument("--video-a", required=True)
    p.add_argument("--video-b", required=True)
    p.add_argument("--turns", default=None, help="JSON list of assistant turn texts")
    p.add_argument("--out", required=True, help="npz to write")
    args = p.parse_args(argv)

    import numpy as np

    from data_pipelines import tokenizer as tok_lib
    from data_pipelines import video
    from vrthinker_jax.rollout import presets, release, render

    try:
        preset = presets.load(args.preset)
        if not isinstance(preset, presets.Preset):
            raise ValueError(f"preset {preset.name} is this project's protocol, which the "
                             "rollout engine tokenizes segment by segment (rollout/chat.py); "
                             "render takes a published checkpoint's preset")
        for item in preset.unverified:
            print(f"render: warning: {preset.name}: unverified: {item}", file=sys.stderr)
        template = render.ChatTemplate.from_dir(args.checkpoint)
        tok = tok_lib.load_tokenizer(args.checkpoint)
        turns = read_turns(args.turns) if args.turns else []
        cands = release.pair_candidates(preset, args.video_a, args.video_b)
        conv, gen = release.replay(preset, args.prompt, cands, turns)
        inputs = render.render(conv, preset, template, tok, add_generation_prompt=gen)
        np.savez(args.out, **inputs.arrays())
    except (presets.PresetError, render.TemplateError, tok_lib.TokenizerError,
            video.VideoError, ValueError, OSError) as e:
        return _fail(str(e))
    print(f"render: wrote {inputs.input_ids.shape[1]} tokens, "
          f"{len(inputs.image_grid_thw)} images, {len(inputs.video_grid_thw)} videos to "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
