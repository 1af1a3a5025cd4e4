"""Synthetic "needle" video preference pairs: the project's embedded default data.

Each pair shows one coloured shape moving across a textured background, for a prompt such as
"a red square moves right". The two videos are rendered from the same scene; in most pairs one of
them carries a short defect localised in time:

* VQ (visual quality): a burst of heavy noise or blur, or a dropout (a block of the frame lost
  to black, as a broken decode shows it);
* MQ (motion quality): the object teleports sideways, stalls (shows a stale position), or smears
  (a streak of its colour across the frame along its motion);
* TA (text alignment): the object has the wrong colour or the wrong shape for the prompt, or is
  missing from the frame.

Dropout, smear and missing are visible in one frame on its own (no other frame, video or prompt
needed to see that the frame is wrong), and so is a colour change to a colour that no prompt
names (`defect_colours`): the demo's default is colour / smear / dropout, each in a colour no
clean frame has, since its tiny vision tower learns those from scratch in a few hundred steps
while noise, blur and a comparison of two frames were never learned (README, "Demo").

The defect sits strictly between two of the initial frames the model is shown
(`protocol.initial_frame_indices`), with `margin_frames` clean frames on both sides, and covers at
least one candidate frame that the oracle's scan visits, so it can only be found by calling
`select_frames`. Labels: the defect's dimension and OA go to the clean video; the other dimensions
tie (0). Some pairs have no defect at all (every label 0).

Outputs under --out: `videos/*.mp4`, `train.jsonl` / `heldout.jsonl` (`video_pairs` manifests),
`cot_train.jsonl` / `cot_heldout.jsonl` (oracle `vrthinker_cot` traces: a systematic scan of the
frames between the initial ones with `select_frames`, video 1's then video 2's, a verdict on each
call's frames, then the correct answer: `oracle_turns`),
`captions_train.jsonl` / `captions_heldout.jsonl` (a caption of every candidate frame: what the
object looks like, where it is, any frame-wide effect), `corpus.txt` (text for training the tiny
sentencepiece) and `info.json`.

    python -m data_pipelines.synthetic --out /tmp/needle --num-pairs 200 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import ml_collections
import numpy as np

from data_pipelines import video as video_lib
from vrthinker_jax.rollout import protocol

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 60, 230),
    "yellow": (235, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 40, 190),
    "cyan": (0, 220, 220),
    "magenta": (255, 0, 255),
    "black": (0, 0, 0),
}
# the prompts' colours unless `colours` says otherwise (the others are kept for defects)
PROMPT_COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
DEFECT_KINDS = {"VQ": ("noise", "blur", "dropout"), "MQ": ("teleport", "stall", "smear"),
                "TA": ("colour", "shape", "missing")}


def synthetic_config(**overrides) -> ml_collections.ConfigDict:
    cd = ml_collections.ConfigDict()
    cd.size = 64  # frame height and width (pixels, even for yuv420p)
    cd.frames = 32  # frames per video
    cd.fps = 8.0  # frame rate written to the mp4
    cd.object_size = 16  # side of the moving shape's bounding box (pixels)
    cd.defect_min_frames = 2  # shortest defect (frames)
    cd.defect_max_frames = 4  # longest defect (frames)
    cd.margin_frames = 1  # clean frames kept between a defect and the nearest initial frame
    cd.tie_fraction = 0.15  # share of pairs with no defect (all labels 0)
    cd.heldout_fraction = 0.2  # share of pairs in the heldout split
    cd.noise_sigma = 60.0  # std of the VQ noise burst (uint8 levels)
    cd.blur_radius = 3  # half-width of the VQ box blur (pixels)
    cd.teleport_px = 16  # sideways jump of an MQ teleport (pixels)
    cd.stall_frames = 6  # an MQ stall shows the object where it was this many frames earlier
    # colours the prompts draw the object in (names of COLOURS)
    cd.colours = PROMPT_COLOURS
    # colours a TA colour defect turns the object into: () = any other prompt colour; colours
    # no prompt uses make the defect visible in one frame on its own
    cd.defect_colours = ()
    # an MQ smear: a band through the object's centre along its motion, across the whole
    # frame, this fraction of the object's side thick, in the object's colour ("") or a named
    # one (one no prompt uses makes the smear visible in any part of it)
    cd.smear_thickness = 0.5
    cd.smear_colour = ""
    # a VQ dropout: the frame's corner square farthest from the object's centre is lost to a
    # flat block of `dropout_colour` (black, or the magenta of a broken decode); its side as a
    # fraction of the frame's
    cd.dropout_fraction = 0.5
    cd.dropout_colour = "black"
    cd.texture_contrast = 50  # amplitude of the background checker (uint8 levels)
    # x264 constant quantiser (lower = closer to the rendered frames)
    cd.qp = 18
    # keyframe interval of the written mp4s. 1 (every frame coded on its own, at a constant
    # quantiser) keeps the frames outside a defect bit-identical to the clean video's: with
    # inter frames (8) and crf rate control the defect leaked into its neighbours, the initial
    # frames included (up to 22 levels), and a model shown only those scored above chance
    cd.gop = 1
    # defect kinds drawn per dimension (a subset of DEFECT_KINDS' kinds)
    cd.defect_kinds = ml_collections.ConfigDict({k: v for k, v in DEFECT_KINDS.items()})
    # frame captions (`captions_<split>.jsonl`): the object's centre is named by its cell on a
    # caption_grid x caption_grid grid over the frame
    cd.caption_grid = 8
    unknown = sorted(set(overrides) - set(cd.keys()))
    if unknown:  # e.g. a removed option (oracle_text, oracle_scan) from an old config
        raise ValueError(f"synthetic: unknown config field(s) {unknown}; known: "
                         f"{sorted(cd.keys())}")
    cd.update(overrides)
    return cd


def default_protocol() -> protocol.ProtocolConfig:
    """The tiny embedded protocol (experiments/configs/common.py: tiny_protocol)."""
    return protocol.ProtocolConfig(
        num_candidates=16, num_initial_frames=4, max_turns=4, max_frames_per_call=6,
        memory_window=20,
    )


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    direction: str
    lane: float  # position across the motion direction, 0..1
    background: tuple[int, int, int]
    texture_phase: int

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


@dataclasses.dataclass(frozen=True)
class Defect:
    dimension: str  # "TA", "MQ" or "VQ"
    kind: str  # see DEFECT_KINDS
    video: int  # 1 or 2: the video that has it
    start: int  # first defective frame (0-based)
    stop: int  # one past the last defective frame
    alt: str = ""  # the wrong colour / shape for TA defects
    sign: int = 1  # teleport side

    @property
    def frames(self) -> list[int]:
        return list(range(self.start, self.stop))


# --------------------------------------------------------------------------- frame geometry


@dataclasses.dataclass(frozen=True)
class Layout:
    """Candidate frames, initial frames and the oracle's scan for one (video length, protocol)."""

    candidate_frames: np.ndarray  # int64 [N]: 0-based video frame of per-video candidate c - 1
    initial: list[int]  # per-video 1-based candidate numbers shown first
    scan: list[int]  # per-video candidate numbers the oracle scans, in order
    per_call: int  # candidates per select_frames call, all of one video
    gaps: list[tuple[int, int]]  # inclusive ranges of video frames a defect may occupy

    def candidates_in(self, frames) -> list[int]:
        fs = set(int(f) for f in frames)
        return [c + 1 for c, f in enumerate(self.candidate_frames) if int(f) in fs]


def make_layout(num_frames: int, pcfg: protocol.ProtocolConfig, margin: int) -> Layout:
    """The scan covers every gap candidate if the calls can hold them (else every k-th): half
    the calls for each video, max_frames_per_call frames each."""
    n = pcfg.num_candidates
    cand = video_lib.sample_indices(num_frames, n)
    initial = protocol.initial_frame_indices(n, pcfg.num_initial_frames)
    init_frames = [int(cand[c - 1]) for c in initial]
    gaps = []
    for a, b in zip(init_frames, init_frames[1:], strict=False):
        lo, hi = a + margin + 1, b - margin - 1
        if lo <= hi:
            gaps.append((lo, hi))
    gap_cands = [
        c + 1 for c, f in enumerate(cand)
        if (c + 1) not in initial and any(lo <= f <= hi for lo, hi in gaps)
    ]
    per_call = pcfg.max_frames_per_call
    budget = pcfg.max_tool_calls // 2 * per_call
    if not gap_cands:
        raise ValueError(
            f"synthetic: no candidate frame lies between initial frames with a margin of {margin} "
            f"(frames={num_frames}, num_candidates={n}, num_initial_frames="
            f"{pcfg.num_initial_frames})"
        )
    if budget == 0:
        raise ValueError(
            f"synthetic: the oracle cannot scan with max_tool_calls={pcfg.max_tool_calls} and "
            f"max_frames_per_call={pcfg.max_frames_per_call} (it needs a call per video)"
        )
    stride = math.ceil(len(gap_cands) / budget)
    return Layout(cand, initial, gap_cands[::stride], per_call, gaps)


def layout_for(cfg, pcfg: protocol.ProtocolConfig) -> Layout:
    """The layout a dataset of synthetic config `cfg` is generated with."""
    return make_layout(cfg.frames, pcfg, cfg.margin_frames)


# --------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        r = size / 2
        return (yy - r) ** 2 + (xx - r) ** 2 <= r * r
    if shape == "triangle":  # right-angled, lower-left half: far from both other shapes
        return xx <= yy
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, cfg) -> np.ndarray:
    s = cfg.size
    yy, xx = np.mgrid[0:s, 0:s]
    checker = (((yy + scene.texture_phase) // 8 + xx // 8) % 2) * 2 - 1
    grad = (yy + xx) / (2 * s) * 40 - 20
    bg = np.asarray(scene.background, np.float64)[None, None] + (
        checker * cfg.texture_contrast / 2 + grad
    )[..., None]
    return np.clip(bg, 0, 255)


def _positions(scene: Scene, cfg) -> np.ndarray:
    """float [F, 2] top-left corner (y, x) of the object in each frame."""
    s, o, f = cfg.size, cfg.object_size, cfg.frames
    pad = 2
    dy, dx = DIRECTIONS[scene.direction]
    t = np.linspace(0.0, 1.0, f)
    along = pad + t * (s - o - 2 * pad)
    across = np.full(f, pad + scene.lane * (s - o - 2 * pad))
    if dy == 0:
        x = along if dx > 0 else (s - o) - along
        return np.stack([across, x], 1)
    y = along if dy > 0 else (s - o) - along
    return np.stack([y, across], 1)


def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    k = 2 * r + 1
    padded = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    c = np.cumsum(np.cumsum(padded, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0), (0, 0)))
    h, w = img.shape[:2]
    return (c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k)


# defect kinds drawn as an effect on the frame rather than a change of the object's state
FRAME_EFFECTS = ("noise", "blur", "dropout", "smear", "missing")


@dataclasses.dataclass(frozen=True)
class FrameState:
    """What one rendered frame shows: the object as drawn and the frame-wide effect."""

    colour: str
    shape: str
    top_left: tuple[float, float]  # (y, x) of the object's bounding box, pixels
    # "noise" | "blur" | "dropout" | "smear" | "missing" (the object is not drawn) | "" (none)
    effect: str


def frame_state(scene: Scene, cfg, defect: Defect | None, t: int, pos: np.ndarray) -> FrameState:
    """The state of frame t (0-based) of the scene with `defect` applied (None = clean);
    pos: `_positions(scene, cfg)`. One place for the defects' effects: `render` draws it,
    `frame_caption` describes it."""
    o = cfg.object_size
    dy, dx = DIRECTIONS[scene.direction]
    colour, shape, p, effect = scene.colour, scene.shape, pos[t], ""
    bad = defect is not None and defect.start <= t < defect.stop
    if bad and defect.kind == "colour":
        colour = defect.alt
    elif bad and defect.kind == "shape":
        shape = defect.alt
    elif bad and defect.kind == "teleport":
        side = np.asarray([dx, dy], np.float64) * defect.sign * cfg.teleport_px
        if np.any(p + side < 0) or np.any(p + side > cfg.size - o):
            side = -side  # jump the way that stays in the frame (a clipped jump is smaller)
        p = np.clip(p + side, 0, cfg.size - o)
    elif bad and defect.kind == "stall":
        p = pos[max(0, t - cfg.stall_frames)]
    elif bad and defect.kind in FRAME_EFFECTS:
        effect = defect.kind
    return FrameState(colour, shape, (float(p[0]), float(p[1])), effect)


def render(scene: Scene, cfg, defect: Defect | None, rng: np.random.Generator) -> np.ndarray:
    """uint8 [F, S, S, 3]: the scene, with `defect` applied (None = clean)."""
    bg = _background(scene, cfg)
    pos = _positions(scene, cfg)
    o = cfg.object_size
    out = np.empty((cfg.frames, cfg.size, cfg.size, 3), np.uint8)
    for t in range(cfg.frames):
        fs = frame_state(scene, cfg, defect, t, pos)
        frame = bg.copy()
        y, x = (int(round(v)) for v in fs.top_left)
        if fs.effect == "smear":
            _smear(frame, scene, cfg, y, x, COLOURS[cfg.smear_colour or fs.colour])
        if fs.effect != "missing":
            mask = _shape_mask(fs.shape, o)
            frame[y:y + o, x:x + o][mask] = COLOURS[fs.colour]
        if fs.effect == "noise":
            frame = frame + rng.normal(0.0, cfg.noise_sigma, frame.shape)
        elif fs.effect == "blur":
            frame = _box_blur(frame, cfg.blur_radius)
        elif fs.effect == "dropout":
            _dropout(frame, cfg, y + o / 2, x + o / 2, COLOURS[cfg.dropout_colour])
        out[t] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
    return out


def _smear(frame: np.ndarray, scene: Scene, cfg, y: int, x: int, colour) -> None:
    """In place: a band of `colour` through the object's centre along its motion, across the
    whole frame, smear_thickness x object_size thick (float [S, S, 3] frame)."""
    o = cfg.object_size
    h = max(1, int(round(cfg.smear_thickness * o)))
    dy, _ = DIRECTIONS[scene.direction]
    if dy == 0:  # horizontal motion: a horizontal band
        top = y + (o - h) // 2
        frame[top:top + h, :] = colour
    else:
        left = x + (o - h) // 2
        frame[:, left:left + h] = colour


def _dropout(frame: np.ndarray, cfg, cy: float, cx: float, colour) -> None:
    """In place: the corner square (dropout_fraction x the frame's side) farthest from the
    object's centre (cy, cx) turns `colour`."""
    s = cfg.size
    d = max(1, int(round(cfg.dropout_fraction * s)))
    top = 0 if cy >= s / 2 else s - d
    left = 0 if cx >= s / 2 else s - d
    frame[top:top + d, left:left + d] = colour


def frame_caption(scene: Scene, cfg, defect: Defect | None, t: int) -> str:
    """A short caption of frame t (0-based): the object's colour, shape and where its centre
    is on a `caption_grid` x `caption_grid` grid (row, column from the top left), and any
    frame-wide effect. The demo's visual pretraining trains on these (a pretrained VLM starts
    out knowing how to see; the tiny random one does not)."""
    fs = frame_state(scene, cfg, defect, t, _positions(scene, cfg))
    if fs.effect == "missing":
        return "No object."
    g = int(cfg.caption_grid)
    cy, cx = (v + cfg.object_size / 2 for v in fs.top_left)
    row, col = (min(g - 1, int(v * g / cfg.size)) for v in (cy, cx))
    return (f"A {fs.colour} {fs.shape} at row {row}, column {col}; "
            f"{EFFECT_CAPTION[fs.effect]}.")


EFFECT_CAPTION = {"": "clean", "noise": "heavy noise", "blur": "blurred", "dropout": "dropout",
                   "smear": "smear"}


# --------------------------------------------------------------------------- pairs


def _sample_scene(rng: np.random.Generator, cfg) -> Scene:
    colours = list(cfg.colours)
    return Scene(
        colour=colours[rng.integers(len(colours))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        direction=list(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
        lane=float(rng.uniform(0.1, 0.9)),
        background=tuple(int(v) for v in rng.integers(60, 140, 3)),
        texture_phase=int(rng.integers(8)),
    )


def _sample_defect(rng, scene: Scene, layout: Layout, cfg) -> Defect:
    dim = ("TA", "MQ", "VQ")[rng.integers(3)]
    kinds = tuple(cfg.defect_kinds[dim])
    kind = kinds[rng.integers(len(kinds))]
    # a scanned candidate the defect must cover, then a span around it inside its gap
    options = []
    for c in layout.scan:
        f = int(layout.candidate_frames[c - 1])
        for lo, hi in layout.gaps:
            if lo <= f <= hi:
                options.append((f, lo, hi))
    f, lo, hi = options[rng.integers(len(options))]
    longest = min(cfg.defect_max_frames, hi - lo + 1)
    length = int(rng.integers(min(cfg.defect_min_frames, longest), longest + 1))
    first = max(lo, f - length + 1)
    last = min(f, hi - length + 1)
    start = int(rng.integers(first, last + 1))
    alt = ""
    if kind == "colour":
        alts = list(cfg.defect_colours) or [
            c for c in cfg.colours if c != scene.colour]
        alt = alts[rng.integers(len(alts))]
    elif kind == "shape":
        alt = [s for s in SHAPES if s != scene.shape][rng.integers(len(SHAPES) - 1)]
    return Defect(dim, kind, int(rng.integers(1, 3)), start, start + length, alt,
                  int(rng.choice([-1, 1])))


def labels_for(defect: Defect | None) -> dict[str, int]:
    """Defect dimension and OA: the clean video wins; everything else ties."""
    labels = {k: 0 for k in protocol.LABEL_KEYS}
    if defect is not None:
        clean = 3 - defect.video
        labels[defect.dimension] = clean
        labels["OA"] = clean
    return labels


# one word per defect kind: what the oracle's verdicts and its final think name
KIND_WORD = {"noise": "noise", "blur": "blur", "teleport": "jump", "stall": "stall",
             "colour": "colour", "shape": "shape", "dropout": "dropout", "smear": "smear",
             "missing": "missing"}


def video_verdict(video: int, kind: str | None) -> str:
    """The oracle's verdict on frames of one video: the defect kind they show (None = none):
    "Video 2: smear." / "Video 2: clean."."""
    return f"Video {video}: {'clean' if kind is None else KIND_WORD[kind]}."


def _scan_calls(layout: Layout, n: int) -> list[tuple[int, list[int], list[int]]]:
    """(video, per-video candidates, global frame numbers) of each select_frames call: video 1's
    scanned candidates, then video 2's, `layout.per_call` a call (`make_layout` sized the scan
    so that these calls fit max_tool_calls)."""
    pieces = [layout.scan[i:i + layout.per_call]
              for i in range(0, len(layout.scan), layout.per_call)]
    return [(v, p, [(v - 1) * n + c for c in p]) for v in (1, 2) for p in pieces]


def _final_think(defect: Defect | None, said: dict[int, str]) -> str:
    """Both videos' verdicts again, then the decision right after them: each step of the answer
    depends on text just written (a tiny model learned the tie case only so). `said`: video ->
    the word its calls gave ("clean" or the defect's `KIND_WORD`)."""
    both = ", ".join(f"video {v} {w}" for v, w in sorted(said.items()))
    return both[0].upper() + both[1:] + (
        ": a tie." if defect is None else
        f": {defect.dimension} and OA go to video {3 - defect.video}.")


def oracle_turns(defect: Defect | None, layout: Layout,
                 pcfg: protocol.ProtocolConfig) -> list[dict]:
    """The oracle trace of a pair with `defect` (None = none): every call of the scan
    (`_scan_calls`), each followed by a verdict on that call's frames alone (`video_verdict`),
    then the final turn with `labels_for(defect)`.

    One video per call: the verdict is about the frames just returned, of one video, and the
    demo's defects show in one frame on their own. Verdicts over both videos at once failed:
    one per call (the SFT verdicts ignored the pixels), a caption per frame (the model copied
    video 1's captions for video 2), one per moment of both videos (which video is off cannot
    be told from two frames for a colour change or a jump). Every call is made even after the
    defect was seen: stopping there lets a small model predict the verdict from the number of
    calls so far instead of looking."""
    hits = set(layout.candidates_in(defect.frames)) if defect is not None else set()
    labels = labels_for(defect)
    tie = {k: 0 for k in protocol.LABEL_KEYS}
    turns: list[dict] = []
    said: dict[int, str] = {}
    synthesis, found = "Initial frames: clean.", False
    for video, cands, frames in _scan_calls(layout, pcfg.num_candidates):
        # the recommendation so far: the clean video once the defect has been seen
        turns.append({"role": "assistant", "content": protocol.format_tool_turn(
            synthesis, f"Check video {video}.", labels if found else tie, frames)})
        turns.append({"role": "tool", "frames": frames})
        shown = bool(hits & set(cands)) and video == defect.video
        synthesis = video_verdict(video, defect.kind if shown else None)
        # a later clean call of the same video must not undo a defect an earlier one showed
        if shown or video not in said:
            said[video] = KIND_WORD[defect.kind] if shown else "clean"
        found = found or shown
    turns.append({"role": "assistant", "content": protocol.format_final_turn(
        synthesis, _final_think(defect, said), labels)})
    return turns


@dataclasses.dataclass
class Pair:
    id: str
    scene: Scene
    defect: Defect | None
    labels: dict[str, int]


def make_pair(index: int, seed: int, cfg, layout: Layout) -> tuple[Pair, np.ndarray, np.ndarray]:
    """Pair `index` of a dataset (independent of the others: own rng from (seed, index))."""
    rng = np.random.default_rng([seed, index])
    scene = _sample_scene(rng, cfg)
    defect = None if rng.uniform() < cfg.tie_fraction else _sample_defect(rng, scene, layout, cfg)
    clean = render(scene, cfg, None, rng)
    bad = render(scene, cfg, defect, rng) if defect is not None else clean
    a, b = (clean, bad) if defect is None or defect.video == 2 else (bad, clean)
    pair = Pair(f"needle-{seed}-{index:05d}", scene, defect, labels_for(defect))
    return pair, a, b


def pair_captions(pair: Pair, cfg, layout: Layout) -> list[str]:
    """Captions of the pair's 2N candidate frames in global frame order (video 1's candidates,
    then video 2's), each as rendered: the defect only in its own video."""
    out = []
    for video in (1, 2):
        d = pair.defect if pair.defect is not None and pair.defect.video == video else None
        out += [frame_caption(pair.scene, cfg, d, int(t)) for t in layout.candidate_frames]
    return out


def _meta(pair: Pair, layout: Layout, cfg, split: str, n: int) -> dict:
    meta = {"split": split, "num_frames": cfg.frames, "fps": cfg.fps,
            "scene": dataclasses.asdict(pair.scene), "defect": None}
    if pair.defect is not None:
        d = pair.defect
        cands = layout.candidates_in(d.frames)
        offset = 0 if d.video == 1 else n
        meta["defect"] = {
            "dimension": d.dimension, "kind": d.kind, "video": d.video, "alt": d.alt,
            "frames": d.frames,  # 0-based video frames that carry the defect
            "candidates": cands,  # per-video 1-based candidate numbers showing it
            "global_frames": [offset + c for c in cands],  # protocol frame numbers
        }
    return meta


def generate(
    out_dir: str, num_pairs: int, seed: int, cfg: ml_collections.ConfigDict | None = None,
    pcfg: protocol.ProtocolConfig | None = None,
) -> dict:
    """Writes the dataset (see the module docstring); returns counts and paths."""
    cfg = synthetic_config() if cfg is None else cfg
    pcfg = default_protocol() if pcfg is None else pcfg
    if num_pairs <= 0:
        raise ValueError(f"synthetic: --num-pairs must be positive, got {num_pairs}")
    if cfg.size % 2 or cfg.size < cfg.object_size + 4:
        raise ValueError(f"synthetic: size {cfg.size} must be even and hold the object")
    for dim, kinds in dict(cfg.defect_kinds).items():
        if dim not in DEFECT_KINDS or not kinds or set(kinds) - set(DEFECT_KINDS[dim]):
            raise ValueError(f"synthetic: defect_kinds[{dim!r}] = {tuple(kinds or ())} must be "
                             f"a non-empty subset of {DEFECT_KINDS.get(dim, ())}")
    named = {"colours": tuple(cfg.colours),
             "defect_colours": tuple(cfg.defect_colours),
             "smear_colour": tuple(c for c in [cfg.smear_colour] if c),
             "dropout_colour": (cfg.dropout_colour,)}
    for field, names in named.items():
        if set(names) - set(COLOURS):
            raise ValueError(f"synthetic: {field} = {names} must name colours of {tuple(COLOURS)}")
    if len(named["colours"]) < (1 if named["defect_colours"] else 2):
        raise ValueError(f"synthetic: colours = {named['colours']} needs a second colour for "
                         "colour defects (or set defect_colours)")
    layout = layout_for(cfg, pcfg)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    order = np.random.default_rng([seed, 1 << 30]).permutation(num_pairs)
    n_held = int(round(cfg.heldout_fraction * num_pairs))
    heldout = set(int(i) for i in order[:n_held])
    rows = {"train": [], "heldout": []}
    traces = {"train": [], "heldout": []}
    captions = {"train": [], "heldout": []}
    for i in range(num_pairs):
        pair, a, b = make_pair(i, seed, cfg, layout)
        split = "heldout" if i in heldout else "train"
        rel_a, rel_b = f"videos/{pair.id}_a.mp4", f"videos/{pair.id}_b.mp4"
        for rel, frames in ((rel_a, a), (rel_b, b)):
            video_lib.write_video(os.path.join(out_dir, rel), frames, cfg.fps, gop=cfg.gop,
                                  qp=cfg.qp)
        prompt = pair.scene.prompt
        rows[split].append({
            "id": pair.id, "prompt": prompt, "video_a": rel_a, "video_b": rel_b, **pair.labels,
            "meta": _meta(pair, layout, cfg, split, pcfg.num_candidates),
        })
        traces[split].append({
            "id": pair.id, "prompt": prompt, "video_a": rel_a, "video_b": rel_b,
            "labels": dict(pair.labels), "num_candidates": pcfg.num_candidates,
            "turns": oracle_turns(pair.defect, layout, pcfg),
        })
        captions[split].append({"id": pair.id, "captions": pair_captions(pair, cfg, layout)})
    paths = {}
    for split in ("train", "heldout"):
        paths[split] = _write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), rows[split])
        paths[f"cot_{split}"] = _write_jsonl(os.path.join(out_dir, f"cot_{split}.jsonl"),
                                             traces[split])
        paths[f"captions_{split}"] = _write_jsonl(
            os.path.join(out_dir, f"captions_{split}.jsonl"), captions[split])
    lines = text_corpus(traces["train"] + traces["heldout"], pcfg)
    lines += list(dict.fromkeys(c for r in captions["train"] + captions["heldout"]
                                for c in r["captions"]))
    paths["corpus"] = os.path.join(out_dir, "corpus.txt")
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line.replace("\n", "\\n") + "\n")
    info = {
        "num_pairs": num_pairs, "seed": seed, "train": len(rows["train"]),
        "heldout": len(rows["heldout"]),
        "ties": sum(r["OA"] == 0 for r in rows["train"] + rows["heldout"]),
        "config": cfg.to_dict(), "protocol": dataclasses.asdict(pcfg), "paths": paths,
    }
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def text_corpus(traces: list[dict], pcfg: protocol.ProtocolConfig) -> list[str]:
    """Every text the model reads or writes in these conversations (system prompt, prompts,
    tool responses, assistant turns), one string per segment, for training a tokenizer."""
    out: list[str] = [pcfg.system_prompt, protocol.LAST_TURN_NOTE]
    for trace in traces:
        for seg in protocol.trace_segments(trace, pcfg):
            if isinstance(seg, protocol.Text) and seg.text:
                out.append(seg.text)
    return list(dict.fromkeys(out))


def read_corpus(path: str) -> list[str]:
    """corpus.txt -> texts (newlines inside a text are stored escaped as a literal \\n)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-pairs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    p.add_argument("--frames", type=int, default=32, help="frames per video")
    p.add_argument("--num-candidates", type=int, default=16)
    p.add_argument("--num-initial-frames", type=int, default=4)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-frames-per-call", type=int, default=6)
    p.add_argument("--tokenizer-vocab", type=int, default=0,
                   help="also train a sentencepiece of this size into OUT/tokenizer (0 = no)")
    args = p.parse_args(argv)
    try:
        cfg = synthetic_config(size=args.size, frames=args.frames)
        pcfg = protocol.ProtocolConfig(
            num_candidates=args.num_candidates, num_initial_frames=args.num_initial_frames,
            max_turns=args.max_turns, max_frames_per_call=args.max_frames_per_call,
            memory_window=max(20, 2 * args.num_initial_frames, args.max_frames_per_call),
        )
        start = time.time()
        info = generate(args.out, args.num_pairs, args.seed, cfg, pcfg)
        if args.tokenizer_vocab:
            from data_pipelines import tokenizer as tok_lib

            info["paths"]["tokenizer"] = tok_lib.train_sentencepiece(
                read_corpus(info["paths"]["corpus"]), os.path.join(args.out, "tokenizer"),
                args.tokenizer_vocab,
            )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "pairs": info["num_pairs"], "train": info["train"],
                      "heldout": info["heldout"], "ties": info["ties"],
                      "seconds": round(time.time() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
