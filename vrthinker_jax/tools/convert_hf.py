"""Convert a Hugging Face Qwen2.5-VL directory into an orbax model checkpoint.

    python -m vrthinker_jax.tools.convert_hf --hf-dir DIR --out DIR [--dtype bfloat16] \
        [--preset vr-thinker]

Tensors are streamed one at a time and cast to --dtype as they are read. With --preset (a
shipped preset name or a .toml path, `vrthinker_jax/presets/`), --out becomes a reward-model
export that runs the checkpoint under that preset: the weights in OUT/model, the HF directory's
tokenizer.json and chat template, and the preset (`score` / `eval --checkpoint OUT` take it).
On bad input prints one error line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys


def _fail(msg: str) -> int:
    print(f"convert_hf: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vrthinker_jax.tools.convert_hf",
                                description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True, help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="output orbax checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameter (and compute) dtype of the converted checkpoint")
    p.add_argument("--scan-layers", action="store_true",
                   help="store decoder layers stacked (the scan_layers model layout)")
    p.add_argument("--preset", default=None,
                   help="write a reward-model export that runs under this protocol preset")
    args = p.parse_args(argv)

    from data_pipelines import tokenizer as tok_lib
    from vrthinker_jax.checkpoints import export, hf, orbax_io
    from vrthinker_jax.rollout import presets, render

    target = os.path.join(args.out, export.MODEL_DIR) if args.preset else args.out
    if os.path.exists(os.path.join(target, orbax_io.PARAMS_DIR)):
        return _fail(f"{os.path.join(target, orbax_io.PARAMS_DIR)}: already exists")
    try:
        template, preset = None, None
        if args.preset:  # check what the export needs before the long conversion
            preset = presets.load(args.preset)
            if isinstance(preset, presets.Preset):
                template = render.find_chat_template(args.hf_dir)
            tok_lib.load_tokenizer(args.hf_dir)
        model, cfg = hf.import_hf_dir(args.hf_dir, dtype=args.dtype,
                                      scan_layers=args.scan_layers, progress=True)
        orbax_io.save_model(model, target)
        info = {"source_model": os.path.abspath(args.hf_dir)}
        if isinstance(preset, presets.ProjectPreset):  # the project's own protocol
            export.export_reward_model(
                args.out, model_dir=target, tokenizer_path=args.hf_dir,
                protocol_cfg=preset.protocol, sampling_cfg=preset.sampling,
                frame_size=preset.frame_size, info={**info, "preset": preset.name})
        elif preset is not None:
            export.export_reward_model(
                args.out, model_dir=target, tokenizer_path=args.hf_dir, preset=args.preset,
                chat_template=template, info=info)
    except (hf.CheckpointError, presets.PresetError, render.TemplateError, FileNotFoundError,
            ValueError, OSError) as e:
        return _fail(str(e))
    print(f"convert_hf: wrote {args.out} ({cfg.text.num_hidden_layers} decoder layers, "
          f"{args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
