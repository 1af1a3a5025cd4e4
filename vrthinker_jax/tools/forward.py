"""Run the model forward on Hugging Face processor outputs and save the logits (a logit checker).

    python -m vrthinker_jax.tools.forward --checkpoint DIR --inputs IN.npz --out OUT.npz \
        [--dtype float32]

DIR is a Hugging Face directory or a converted orbax checkpoint. IN.npz holds arrays named as the
HF processor outputs them: input_ids, attention_mask (optional), pixel_values + image_grid_thw
(optional), pixel_values_videos + video_grid_thw + second_per_grid_ts (optional);
mm_token_type_ids is accepted and ignored (it is implied by input_ids), and so is `text`
(`python -m vrthinker_jax.tools.render` writes the rendered conversation there). OUT.npz
holds `logits`, float32 [batch, seq, vocab]. Bad input: one error line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

KNOWN = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
         "video_grid_thw", "second_per_grid_ts")
IGNORED = ("mm_token_type_ids", "text")  # text: the rendered prompt `tools.render` stores


def _fail(msg: str) -> int:
    print(f"forward: error: {msg}", file=sys.stderr)
    return 2


def read_inputs(path: str) -> dict:
    """The known arrays of IN.npz as a dict; raises ValueError naming the file and field."""
    import numpy as np

    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read npz ({e})") from e
    with data:
        unknown = sorted(set(data.files) - set(KNOWN) - set(IGNORED))
        if unknown:
            raise ValueError(f"{path}: unknown arrays {unknown}; expected some of {list(KNOWN)}")
        if "input_ids" not in data.files:
            raise ValueError(f"{path}: missing array input_ids")
        # an empty visual array means "none" (`tools.render` writes empty arrays so every name
        # is present)
        out = {k: np.asarray(data[k]) for k in KNOWN if k in data.files and data[k].size}
    if out["input_ids"].ndim == 1:
        out["input_ids"] = out["input_ids"][None]
    if out["input_ids"].ndim != 2:
        raise ValueError(f"{path}: input_ids must be [batch, seq], got {out['input_ids'].shape}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vrthinker_jax.tools.forward",
                                description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF directory or orbax checkpoint")
    p.add_argument("--inputs", required=True, help="npz of HF processor outputs")
    p.add_argument("--out", required=True, help="npz to write with `logits`")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="param and compute dtype")
    args = p.parse_args(argv)

    import numpy as np

    from vrthinker_jax import checkpoints
    from vrthinker_jax.models import model as model_lib

    try:
        inputs = read_inputs(args.inputs)
        model, _ = checkpoints.load_model(args.checkpoint, dtype=args.dtype)
        logits = model_lib.forward(model, **inputs)
        np.savez(args.out, logits=logits.astype(np.float32))
    except (checkpoints.CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        return _fail(str(e))
    print(f"forward: wrote logits {tuple(logits.shape)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
