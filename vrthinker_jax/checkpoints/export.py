"""A reward-model export: everything `score` and `eval --checkpoint` need to run a model.

Layout of an export directory:
    reward_model.json   {"format": 1, "model": "model", "tokenizer": "tokenizer/<file>",
                         "protocol": {...ProtocolConfig fields}, "sampling": {...sampling_config},
                         "frame_size": [H, W], "info": {...free-form provenance}}
    model/              the weights: an orbax checkpoint (`save_model`) or a Hugging Face
                        directory; "model" may instead name a directory elsewhere (absolute path)
    tokenizer/<file>    a copy of the tokenizer file (tokenizer.json or sentencepiece .model)

The protocol, sampling and frame size are the ones the model was trained with: a reward model
only answers well under the prompt layout, frame numbering and frame resolution it saw.

A published checkpoint runs under a protocol preset instead (`rollout/presets.py`): its export
holds `preset.toml` (a copy of the preset), `chat_template.json` (the checkpoint's own chat
template) and the fields "preset", "preset_name" and "chat_template" in place of "protocol",
"sampling" and "frame_size"; `score` and `eval` then run the preset engine
(`rollout/preset_engine.py`). Write one with `python -m vrthinker_jax.tools.convert_hf --hf-dir
DIR --out EXPORT --preset vr-thinker`.

Write one from a trained run with `export_reward_model(dir, model=..., tokenizer_path=...,
protocol_cfg=..., sampling_cfg=..., frame_size=...)`, or from an existing checkpoint directory:

    python -m vrthinker_jax.checkpoints.export --model CKPT --tokenizer tokenizer.json --out DIR \
        [--frame-size 448,448] [--protocol '{"num_candidates": 64}'] [--sampling '{...}']
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence

import ml_collections

from vrthinker_jax.checkpoints.hf import CheckpointError

EXPORT_FILE = "reward_model.json"
PRESET_FILE = "preset.toml"
TEMPLATE_FILE = "chat_template.json"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1


class ExportError(CheckpointError):
    """A directory is not a usable reward-model export (the message names the file and field)."""


def _tokenizer_file(path: str) -> str:
    """The single tokenizer file behind `path` (a file, or a directory as `load_tokenizer`
    resolves it)."""
    from data_pipelines import tokenizer as tok_lib

    if os.path.isfile(path):
        return path
    tok_lib.load_tokenizer(path)  # raises TokenizerError naming the path if it has none
    return _resolve_dir(path)


def _resolve_dir(path: str) -> str:
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return os.path.join(path, "tokenizer.json")
    models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
    return os.path.join(path, models[0])


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _protocol_dict(protocol_cfg) -> dict:
    from vrthinker_jax.rollout import protocol

    if isinstance(protocol_cfg, protocol.ProtocolConfig):
        return dataclasses.asdict(protocol_cfg)
    return dataclasses.asdict(protocol.ProtocolConfig.from_configdict(protocol_cfg))


def export_reward_model(
    directory: str,
    *,
    tokenizer_path: str,
    protocol_cfg=None,
    sampling_cfg=None,
    frame_size: Sequence[int] | None = None,
    preset: str | None = None,
    chat_template: str | None = None,
    model=None,
    model_dir: str | None = None,
    info: dict | None = None,
    overwrite: bool = False,
) -> str:
    """Writes an export directory; returns its absolute path.

    Exactly one of `model` (a `Qwen25VL`, saved to DIR/model with `save_model`) and `model_dir`
    (an existing orbax or HF checkpoint directory: recorded relative to DIR when it lies inside
    DIR, else by absolute path, not copied) must be given. `tokenizer_path` (file or directory)
    is copied to DIR/tokenizer/. protocol_cfg: `ProtocolConfig` or its ConfigDict;
    sampling_cfg: `sampler.sampling_config()` ConfigDict or dict; frame_size: (H, W) pixels of a
    bank frame, multiples of 28. `info` (JSON-serialisable) is stored as provenance.
    preset (a shipped preset name or .toml path) + chat_template (the checkpoint's template
    source): an export that runs under that preset; protocol_cfg, sampling_cfg and frame_size
    are then not used.
    overwrite: replace an earlier export in DIR (a re-run training job) instead of raising.
    """
    from vrthinker_jax.rollout import sampler

    if (model is None) == (model_dir is None):
        raise ValueError("export_reward_model: give exactly one of model= and model_dir=")
    if preset is not None:
        return _export_preset(directory, tokenizer_path=tokenizer_path, preset=preset,
                              chat_template=chat_template, model=model, model_dir=model_dir,
                              info=info, overwrite=overwrite)
    if protocol_cfg is None or sampling_cfg is None or frame_size is None:
        raise ValueError("export_reward_model: give protocol_cfg, sampling_cfg and frame_size "
                         "(or a preset)")
    frame = [int(x) for x in frame_size]
    if len(frame) != 2 or min(frame) <= 0 or frame[0] % 28 or frame[1] % 28:
        raise ValueError(f"export_reward_model: frame_size {tuple(frame_size)} must be two "
                         "positive multiples of 28")
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, EXPORT_FILE)):
        if not overwrite:
            raise ExportError(f"{os.path.join(directory, EXPORT_FILE)}: already exists "
                              "(pass overwrite=True to replace the export)")
        os.remove(os.path.join(directory, EXPORT_FILE))
        shutil.rmtree(os.path.join(directory, TOKENIZER_DIR), ignore_errors=True)
        if model is not None:
            shutil.rmtree(os.path.join(directory, MODEL_DIR), ignore_errors=True)
    pdict = _protocol_dict(protocol_cfg)
    sdict = sampler.sampling_config(**dict(sampling_cfg)).to_dict()
    model_ref, tok_rel = _write_model_and_tokenizer(directory, model, model_dir, tokenizer_path)
    manifest = {
        "format": FORMAT,
        "model": model_ref,
        "tokenizer": tok_rel,
        "protocol": pdict,
        "sampling": _jsonable(sdict),
        "frame_size": frame,
        "info": dict(info or {}),
    }
    with open(os.path.join(directory, EXPORT_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    return directory


def _write_model_and_tokenizer(directory: str, model, model_dir, tokenizer_path):
    """Saves or references the weights and copies the tokenizer; returns their manifest
    entries (model, tokenizer)."""
    from vrthinker_jax import checkpoints

    tok_src = _tokenizer_file(tokenizer_path)
    os.makedirs(directory, exist_ok=True)
    if model is not None:
        checkpoints.save_model(model, os.path.join(directory, MODEL_DIR))
        model_ref = MODEL_DIR
    else:
        src = os.path.abspath(model_dir)
        if not (checkpoints.is_orbax_dir(src) or checkpoints.is_hf_dir(src)):
            raise ExportError(f"model_dir {model_dir}: neither an orbax checkpoint nor a Hugging "
                              "Face directory")
        rel = os.path.relpath(src, directory)
        model_ref = src if rel.startswith("..") else rel
    os.makedirs(os.path.join(directory, TOKENIZER_DIR), exist_ok=True)
    tok_rel = os.path.join(TOKENIZER_DIR, os.path.basename(tok_src))
    shutil.copyfile(tok_src, os.path.join(directory, tok_rel))
    return model_ref, tok_rel


def _export_preset(directory: str, *, tokenizer_path, preset, chat_template, model, model_dir,
                   info, overwrite) -> str:
    """An export that runs under a protocol preset (see the module docstring)."""
    from vrthinker_jax.rollout import presets, render

    loaded = presets.load(preset)  # refuses a bad preset before anything is written
    if not isinstance(loaded, presets.Preset):
        raise ValueError(f"preset {loaded.name}: the project's own protocol is exported with "
                         "protocol_cfg / sampling_cfg / frame_size (`convert_hf --preset` does it)")
    if not chat_template:
        raise ValueError("export_reward_model: a preset export needs the checkpoint's chat "
                         "template (chat_template=)")
    render.ChatTemplate(chat_template, origin="chat_template")  # refuses one that won't parse
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, EXPORT_FILE)) and not overwrite:
        raise ExportError(f"{os.path.join(directory, EXPORT_FILE)}: already exists "
                          "(pass overwrite=True to replace the export)")
    model_ref, tok_rel = _write_model_and_tokenizer(directory, model, model_dir, tokenizer_path)
    shutil.copyfile(loaded.path, os.path.join(directory, PRESET_FILE))
    with open(os.path.join(directory, TEMPLATE_FILE), "w") as f:
        json.dump({"chat_template": chat_template}, f)
    manifest = {"format": FORMAT, "model": model_ref, "tokenizer": tok_rel,
                "preset": PRESET_FILE, "preset_name": loaded.name,
                "chat_template": TEMPLATE_FILE, "info": dict(info or {})}
    with open(os.path.join(directory, EXPORT_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    return directory


def is_export_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPORT_FILE))


@dataclasses.dataclass
class RewardModel:
    """A loaded export: the model and the settings it was trained with.

    frame_size: (H, W) of a bank frame; sampling: the exported `sampling_config` (use `engine`
    to get a RolloutEngine, greedy by default).
    """

    directory: str
    model: object
    model_cfg: ml_collections.ConfigDict
    tokenizer: object
    protocol: object  # rollout.protocol.ProtocolConfig
    sampling: ml_collections.ConfigDict
    frame_size: tuple[int, int]
    info: dict
    preset: object = None  # rollout.presets.Preset of a published checkpoint's export
    template: object = None  # its rollout.render.ChatTemplate

    @property
    def initial_frames(self) -> list[int]:
        """1-based frame numbers shown in the first prompt."""
        from vrthinker_jax.rollout import protocol, release

        if self.preset is not None:
            return [i + 1 for i in release.initial_indices(self.preset)]
        return protocol.initial_frames(self.protocol)

    def engine(self, *, mesh=None, temperature: float | None = 0.0, **sampling_overrides):
        """A RolloutEngine over this model (a PresetEngine for a preset export). temperature 0
        (the default) decodes greedily, so a judgment is reproducible; None keeps the exported
        (or the preset's) temperature."""
        from vrthinker_jax.rollout import engine as engine_lib

        if self.preset is not None:
            from vrthinker_jax.rollout import preset_engine

            if mesh is not None and mesh.devices.size > 1:
                raise ValueError("a preset export runs on one device for now (no --mesh)")
            over = dict(sampling_overrides)
            if temperature is not None:
                over["temperature"] = float(temperature)
            return preset_engine.PresetEngine(self.model, self.tokenizer, self.template,
                                              self.preset, sampling=over)

        scfg = self.sampling.copy_and_resolve_references()
        if temperature is not None:
            scfg.temperature = float(temperature)
        scfg.update(sampling_overrides)
        return engine_lib.RolloutEngine(self.model, self.model_cfg, self.tokenizer,
                                        self.protocol, scfg, self.frame_size, mesh=mesh)

    def load_bank(self, video_a, video_b):
        """uint8 [2N, H, W, 3] candidate frames of a pair (paths or encoded bytes); raises
        `data_pipelines.banks.BankError` (a ValueError naming the file) for a bad video."""
        from data_pipelines import banks

        if self.preset is not None:
            from vrthinker_jax.rollout import release

            return release.pair_candidates(self.preset, video_a, video_b)
        return banks.pair_bank(video_a, video_b, self.protocol.num_candidates, self.frame_size)


def _field(manifest: dict, key: str, path: str, kind):
    if key not in manifest:
        raise ExportError(f"{path}: missing field {key!r}")
    value = manifest[key]
    if not isinstance(value, kind):
        raise ExportError(f"{path}: field {key!r} must be a {kind.__name__}, got "
                          f"{type(value).__name__}")
    return value


def read_manifest(directory: str) -> dict:
    """The parsed and checked reward_model.json of an export directory."""
    path = os.path.join(directory, EXPORT_FILE)
    if not os.path.isdir(directory):
        raise ExportError(f"{directory}: no such directory")
    if not os.path.isfile(path):
        raise ExportError(
            f"{directory}: not a reward-model export (no {EXPORT_FILE}); write one with "
            "`python -m vrthinker_jax.checkpoints.export --model CKPT --tokenizer FILE --out DIR`")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: expected a JSON object")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise ExportError(f"{path}: field 'format' is {fmt!r}; this version reads {FORMAT}")
    fields = ((("preset", str), ("chat_template", str)) if "preset" in manifest else
              (("protocol", dict), ("sampling", dict), ("frame_size", list)))
    for key, kind in (("model", str), ("tokenizer", str), *fields):
        _field(manifest, key, path, kind)
    return manifest


def load_reward_model(directory: str, *, dtype: str | None = None) -> RewardModel:
    """Loads an export directory (model, tokenizer, protocol, sampling, frame size).

    Raises ExportError (a ValueError) naming the file and field for anything missing or
    inconsistent, e.g. a tokenizer whose <|image_pad|> id differs from the model's.
    """
    from vrthinker_jax.rollout import protocol, sampler

    directory = os.path.abspath(directory)
    manifest = read_manifest(directory)
    path = os.path.join(directory, EXPORT_FILE)
    if "preset" in manifest:
        return _load_preset_export(directory, manifest, dtype)
    try:
        pcfg = protocol.ProtocolConfig.from_configdict(manifest["protocol"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: field 'protocol': {e}") from None
    sampling = dict(manifest["sampling"])
    if "prompt_buckets" in sampling:
        sampling["prompt_buckets"] = tuple(int(b) for b in sampling["prompt_buckets"])
    try:
        scfg = sampler.sampling_config(**sampling)
    except (TypeError, ValueError, KeyError) as e:
        raise ExportError(f"{path}: field 'sampling': {e}") from None
    frame = manifest["frame_size"]
    if len(frame) != 2 or not all(isinstance(x, int) and x > 0 and x % 28 == 0 for x in frame):
        raise ExportError(f"{path}: field 'frame_size' must be [H, W], positive multiples of 28; "
                          f"got {frame}")
    model, mcfg, tok = _load_model_and_tokenizer(directory, manifest, dtype)
    return RewardModel(directory=directory, model=model, model_cfg=mcfg, tokenizer=tok,
                       protocol=pcfg, sampling=scfg, frame_size=(int(frame[0]), int(frame[1])),
                       info=dict(manifest.get("info") or {}))


def _load_model_and_tokenizer(directory: str, manifest: dict, dtype):
    """(model, model config, tokenizer) of an export, checked to belong together."""
    from data_pipelines import tokenizer as tok_lib
    from vrthinker_jax import checkpoints
    from vrthinker_jax.rollout import chat

    path = os.path.join(directory, EXPORT_FILE)
    try:
        tok = tok_lib.load_tokenizer(os.path.join(directory, manifest["tokenizer"]))
    except (tok_lib.TokenizerError, OSError) as e:
        raise ExportError(f"{path}: field 'tokenizer': {e}") from None
    try:
        model, mcfg = checkpoints.load_model(os.path.join(directory, manifest["model"]),
                                             dtype=dtype)
    except FileNotFoundError as e:
        raise ExportError(f"{path}: field 'model': {e}") from None
    pad = tok.token_to_id(chat.IMAGE_PAD)
    if pad is None or int(pad) != int(mcfg.image_token_id):
        raise ExportError(
            f"{path}: tokenizer {manifest['tokenizer']} maps {chat.IMAGE_PAD} to {pad} but the "
            f"model's image_token_id is {mcfg.image_token_id}: model and tokenizer do not belong "
            "together")
    if tok.vocab_size > mcfg.text.vocab_size:
        raise ExportError(f"{path}: tokenizer vocab_size {tok.vocab_size} exceeds the model's "
                          f"text.vocab_size {mcfg.text.vocab_size}")
    return model, mcfg, tok


def _load_preset_export(directory: str, manifest: dict, dtype) -> RewardModel:
    from vrthinker_jax.rollout import presets, render

    path = os.path.join(directory, EXPORT_FILE)
    try:
        preset = presets.load(os.path.join(directory, manifest["preset"]))
        with open(os.path.join(directory, manifest["chat_template"]), encoding="utf-8") as f:
            source = json.load(f)["chat_template"]
        template = render.ChatTemplate(source, origin=os.path.join(directory,
                                                                   manifest["chat_template"]))
    except (presets.PresetError, render.TemplateError) as e:
        raise ExportError(f"{path}: {e}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: field 'chat_template': {e}") from None
    model, mcfg, tok = _load_model_and_tokenizer(directory, manifest, dtype)
    return RewardModel(directory=directory, model=model, model_cfg=mcfg, tokenizer=tok,
                       protocol=None, sampling=None, frame_size=None,
                       info=dict(manifest.get("info") or {}), preset=preset, template=template)


def content_hash(directory: str) -> str:
    """The identity of an export: "sha256:<hex>" over reward_model.json, the tokenizer file and
    every file of the model directory (wherever the manifest's "model" points), each as its path
    relative to its root, its size and its bytes, in sorted order. Two exports hash equal iff
    they would judge alike; a retrained or re-exported model does not. Reads every weight file
    once (sha256 runs at about 1 GB/s per core). Raises ExportError as `read_manifest`."""
    import hashlib

    directory = os.path.abspath(directory)
    manifest = read_manifest(directory)
    roots = [("export", os.path.join(directory, EXPORT_FILE)),
             ("tokenizer", os.path.join(directory, manifest["tokenizer"])),
             ("model", os.path.join(directory, manifest["model"]))]
    h = hashlib.sha256()
    for name, root in roots:
        if not os.path.exists(root):
            raise ExportError(f"{os.path.join(directory, EXPORT_FILE)}: field {name!r}: {root} "
                              "does not exist")
        files = [root] if os.path.isfile(root) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        for path in files:
            rel = os.path.relpath(path, root) if path != root else os.path.basename(root)
            h.update(f"{name}/{rel}\0{os.path.getsize(path)}\0".encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    """Writes an export directory around an existing checkpoint (see the module docstring)."""
    from vrthinker_jax.rollout import protocol, sampler

    p = argparse.ArgumentParser(prog="python -m vrthinker_jax.checkpoints.export",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="orbax or Hugging Face checkpoint directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json / sentencepiece .model")
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--frame-size", default="448,448", help="H,W of a bank frame (pixels)")
    p.add_argument("--protocol", default="{}", help="JSON overrides of protocol_config()")
    p.add_argument("--sampling", default="{}", help="JSON overrides of sampling_config()")
    args = p.parse_args(argv)
    try:
        frame = [int(x) for x in args.frame_size.split(",")]
        pover, sover = json.loads(args.protocol), json.loads(args.sampling)
        if "prompt_buckets" in sover:
            sover["prompt_buckets"] = tuple(sover["prompt_buckets"])
        out = export_reward_model(
            args.out, model_dir=args.model, tokenizer_path=args.tokenizer,
            protocol_cfg=protocol.protocol_config(**pover),
            sampling_cfg=sampler.sampling_config(**sover), frame_size=frame,
            info={"source_model": os.path.abspath(args.model)})
    except (ValueError, OSError, KeyError, TypeError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
