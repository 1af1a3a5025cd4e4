"""Score one pair of videos with a trained VR-Thinker reward model.

    python -m vrthinker_jax.score --checkpoint DIR --prompt TEXT --video-a A.mp4 --video-b B.mp4 \
        [--html report.html] [--json out.json] [--no-tools] [--temperature T --seed S]

DIR is a reward-model export (`vrthinker_jax.checkpoints.export`: weights, tokenizer, and the
protocol / sampling / frame size the model was trained with). Prints the judgment per dimension
(TA, MQ, VQ) and overall (OA) -- video A, video B or tie -- then the reasoning trace turn by turn
with the frames each tool call returned. --json writes the prediction row (the eval CLI's
predictions format); --html writes a self-contained report with the frames the model saw.

Decoding is greedy unless --temperature > 0. A missing or undecodable video, a directory that
is not an export, a prompt that is not UTF-8 text or that is longer than the export's largest
prompt bucket (`sampling.prompt_buckets` in its reward_model.json) prints one line
`score: error: ...` to stderr and exits with status 2.

Multi-process flags (`--coordinator_address HOST:PORT --num_processes N --process_id I`, or
`--distributed auto`; `vrthinker_jax.distributed`) let it run under the same launcher as train /
eval on a slice: one pair is one row, so every process scores it on its own first device and
process 0 alone prints and writes --json / --html.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vrthinker_jax import distributed
from vrthinker_jax.cli import CliError, OneLineParser

PROG = "python -m vrthinker_jax.score"
BENCHMARK = "score"  # the predictions row's benchmark field
_NAMES = {1: "video A", 2: "video B", 0: "tie", -1: "no answer"}


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="reward-model export directory")
    p.add_argument("--prompt", required=True, help="the text prompt both videos were made for")
    p.add_argument("--video-a", required=True, help="video 1 (A)")
    p.add_argument("--video-b", required=True, help="video 2 (B)")
    p.add_argument("--html", default=None, help="write the trace report (with frames) here")
    p.add_argument("--json", default=None, help="write the prediction row here")
    p.add_argument("--no-tools", action="store_true",
                   help="answer every select_frames call with 'tool use is disabled'")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="rng seed (only used when sampling)")
    distributed.add_arguments(p)
    return p


def score_pair(rm, prompt: str, bank, *, tools_enabled: bool = True, temperature: float = 0.0,
               seed: int = 0, meta: dict | None = None) -> dict:
    """One rollout of `rm` (export.RewardModel) on a pair -> a prediction row.

    bank: uint8 [2N, H, W, 3] (`rm.load_bank`). The row has pred {TA, MQ, VQ, OA} (1 = A,
    2 = B, 0 = tie, -1 = no answer), trace (assistant turns), frames_selected per turn, and meta
    with initial_frames, stop reason and tool errors.
    """
    import jax
    import numpy as np

    from vrthinker_jax.eval import runner

    engine = rm.engine(temperature=temperature)
    traj = engine.rollout([prompt], np.asarray(bank)[None], jax.random.key(seed),
                          tools_enabled=tools_enabled)[0]
    ex = {"id": "pair", "prompt": prompt, "meta": dict(meta or {})}
    row = runner.row_from_trajectory(ex, traj, BENCHMARK)
    row["meta"]["initial_frames"] = rm.initial_frames
    row["meta"]["tool_errors"] = list(traj.tool_errors)
    return row


def check_prompt_text(prompt: str, flag: str = "--prompt") -> None:
    """Raises CliError for text the tokenizer cannot take: bytes that are not UTF-8 reach
    Python's argv as surrogate escapes (sentencepiece then fails with a RuntimeError)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(prompt[e.start]) & 0xFF  # surrogateescape maps byte b to U+DC00 + b
        raise CliError(f"{flag}: not valid UTF-8 text (byte 0x{byte:02x} at character "
                       f"{e.start}); pass the prompt as UTF-8") from None


def check_prompt_fits(rm, prompt: str, flag: str = "--prompt") -> int:
    """The prompt's token count (system turn, text, initial frames); CliError when it exceeds
    the export's largest prompt bucket, naming the limit and the config that sets it. (A preset
    export's prompt is checked by its engine, which fails the row with the limit named.)"""
    from vrthinker_jax.rollout import chat, frame_bank, protocol

    if rm.preset is not None:
        return 0
    tpf = frame_bank.PatchSpec.from_model_config(rm.model_cfg).tokens_per_frame(*rm.frame_size)
    n = len(chat.tokenize_segments(rm.tokenizer, protocol.prompt_segments(prompt, rm.protocol),
                                   tpf).ids)
    limit = max(int(b) for b in rm.sampling.prompt_buckets)
    if n > limit:
        raise CliError(
            f"{flag}: {len(prompt)} characters make a prompt of {n} tokens, more than the "
            f"largest prompt bucket of the export ({limit} tokens): shorten the prompt, or "
            f"raise sampling.prompt_buckets (and sampling.max_len) in "
            f"{os.path.join(rm.directory, 'reward_model.json')} (`python -m "
            "vrthinker_jax.checkpoints.export ... --sampling '{\"prompt_buckets\": [...]}'`)")
    return n


def format_judgment(row: dict, pcfg) -> str:
    """The judgments and the trace as printed text."""
    from vrthinker_jax.rollout import protocol

    lines = ["Judgment:"]
    for k in protocol.LABEL_KEYS:
        name = protocol.DIMENSION_NAMES.get(k, k)
        lines.append(f"  {k} {name:<22} {_NAMES.get(row['pred'][k], row['pred'][k])}")
    stop = row["meta"].get("stop")
    calls = max(0, row["turns"] - 1)
    lines += ["", f"Trace ({row['turns']} turns, {calls} tool calls, stop: {stop}):"]
    initial = row["meta"].get("initial_frames") or []
    lines.append(f"[frames shown first] {_describe(initial, pcfg)}")
    errors = row["meta"].get("tool_errors") or []
    for i, (text, frames) in enumerate(zip(row["trace"], row["frames_selected"])):
        lines.append(f"[assistant turn {i + 1}]")
        lines.append(text.strip() or "(empty)")
        if i < len(row["trace"]) - 1:
            err = errors[i] if i < len(errors) else None
            lines.append(f"[tool] {_describe(frames, pcfg)}" + (f" (error: {err})" if err else ""))
    return "\n".join(lines)


def _describe(frames, pcfg) -> str:
    from vrthinker_jax.rollout import protocol

    if not frames:
        return "no frames"
    parts = []
    for f in frames:
        video, local = protocol.frame_video(int(f), pcfg)
        parts.append(f"{f} ({'AB'[video - 1]}:{local})")
    return "frames " + ", ".join(parts)


def _decode_pair(args, manifest: dict):
    """The pair's frames as the export's engine takes them (a bank, or a preset's candidates)."""
    from data_pipelines import banks
    from vrthinker_jax.rollout import presets, release

    if "preset" in manifest:
        preset = presets.load(os.path.join(args.checkpoint, manifest["preset"]))
        try:
            return release.pair_candidates(preset, args.video_a, args.video_b)
        except ValueError as e:  # video.VideoError names the file
            raise banks.BankError(str(e)) from None
    proto = manifest["protocol"]
    return banks.pair_bank(args.video_a, args.video_b, int(proto["num_candidates"]),
                           tuple(manifest["frame_size"]))


def _numbering(rm):
    """What `_describe` needs to name a frame's video: the frames per video."""
    if rm.preset is None:
        return rm.protocol
    from vrthinker_jax.rollout import protocol

    per = rm.preset.frames.candidates_per_video
    return protocol.ProtocolConfig(num_candidates=per, num_initial_frames=1,
                                   max_frames_per_call=1, memory_window=2)


def run(args) -> int:
    check_prompt_text(args.prompt)
    for flag, path in (("--video-a", args.video_a), ("--video-b", args.video_b)):
        if not os.path.isfile(path):
            raise CliError(f"{flag} {path}: no such file")
    if not os.path.isdir(args.checkpoint):
        raise CliError(f"--checkpoint {args.checkpoint}: no such directory")

    from data_pipelines import banks
    from vrthinker_jax.checkpoints import export
    from vrthinker_jax.eval import html_report
    from vrthinker_jax.rollout import presets

    try:
        manifest = export.read_manifest(args.checkpoint)
    except export.ExportError as e:
        raise CliError(f"--checkpoint {e}") from None
    # decode the videos before loading the weights: a bad video fails in a second
    try:
        bank = _decode_pair(args, manifest)
    except (banks.BankError, presets.PresetError) as e:
        raise CliError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise CliError(f"--checkpoint {args.checkpoint}: bad protocol / frame_size ({e})") \
            from None
    try:
        rm = export.load_reward_model(args.checkpoint)
    except (export.CheckpointError, ValueError, FileNotFoundError) as e:
        raise CliError(f"--checkpoint {e}") from None
    check_prompt_fits(rm, args.prompt)
    meta = {"video_a": os.path.abspath(args.video_a), "video_b": os.path.abspath(args.video_b),
            "checkpoint": rm.directory, "temperature": args.temperature,
            "tools_enabled": not args.no_tools,
            # what made the row, as `eval` records it in each of its rows
            "run": {"model_id": export.content_hash(rm.directory),
                    "temperature": float(args.temperature), "tools_enabled": not args.no_tools,
                    "sampling_seed": args.seed if args.temperature > 0 else None}}
    row = score_pair(rm, args.prompt, bank, tools_enabled=not args.no_tools,
                     temperature=args.temperature, seed=args.seed, meta=meta)
    if not distributed.is_writer():
        return 0
    print(format_judgment(row, _numbering(rm)))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(row, f, indent=1)
        print(f"\nJSON: {args.json}")
    if args.html:
        def frame_loader(_row, frames):
            return [bank[int(f) - 1] for f in frames]

        html_report.write_html_report([row], args.html, frame_loader,
                                      title=f"VR-Thinker judgment: {args.prompt[:80]}")
        print(f"HTML report: {args.html}")
    return 0


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        distributed.initialize_from_args(args, CliError)  # before any JAX computation
        return run(args)
    except CliError as e:
        print(f"score: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --json / --html and the like
        print(f"score: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("score: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
