"""Video decoding with PyAV: probing, uniform / fps sampling, keyframe seeking, rotation.

Frames are identified by their presentation timestamp (pts), never by counting decoded frames:
the demuxer is read once (packets only, no decoding) to list every frame's pts in presentation
order and where the keyframes are. "Frame i" is the i-th pts of that list, which keeps variable
frame rate videos and B-frame reordering correct, and makes the two decoding strategies agree
frame for frame:

* ``seek=True``: for each wanted frame, jump to the keyframe at or before it (when it lies beyond
  what has been decoded so far) and decode forward only as far as that frame.
* ``seek=False``: decode the whole stream once and keep the wanted frames.

Only wanted frames are converted to RGB. Rotation metadata (the display matrix) is applied, so
returned frames are upright as a player would show them. Every failure (not a file, not a video,
no frames, truncated data, corrupt stream, or sizes beyond the configured guard) raises
:class:`VideoError` naming the file and the reason.
"""

from __future__ import annotations

import dataclasses
import fractions
import io
import math
import os
from collections.abc import Sequence

import av
import ml_collections
import numpy as np


class VideoError(ValueError):
    """A video could not be read. The message is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def video_config(**overrides) -> ml_collections.ConfigDict:
    """Guards against absurd inputs (a decoded frame bank must fit in host memory)."""
    cd = ml_collections.ConfigDict()
    cd.max_pixels = 8192 * 8192  # largest width * height per frame accepted
    cd.max_frames = 200_000  # most frames a video may declare / contain
    cd.max_output_bytes = 8 * 2**30  # most bytes one read_frames call may return
    cd.update(overrides)
    return cd


@dataclasses.dataclass(frozen=True)
class VideoLimits:
    """See :func:`video_config` for the meaning of each limit."""

    max_pixels: int = 8192 * 8192
    max_frames: int = 200_000
    max_output_bytes: int = 8 * 2**30

    @classmethod
    def from_config(cls, cd: ml_collections.ConfigDict | dict | None) -> VideoLimits:
        return cls() if cd is None else cls(**dict(cd))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` finds. `width`/`height` are as displayed (after rotation)."""

    num_frames: int
    fps: float  # average frame rate: num_frames / duration_s
    duration_s: float
    width: int
    height: int
    rotation: int  # counter-clockwise degrees applied to decoded frames: 0, 90, 180 or 270


@dataclasses.dataclass(frozen=True)
class _Index:
    """Per-frame timing, in presentation order. pts in stream time_base units."""

    pts: np.ndarray  # int64 [num_frames], strictly increasing
    end_pts: int  # pts just after the last frame (last pts + its duration)
    key_pts: np.ndarray  # int64 [num_keyframes], pts of keyframes, increasing
    key_dts: np.ndarray  # int64 [num_keyframes], their decode timestamps (<= pts)
    time_base: fractions.Fraction


def _limits(limits: VideoLimits | ml_collections.ConfigDict | dict | None) -> VideoLimits:
    if isinstance(limits, VideoLimits):
        return limits
    return VideoLimits.from_config(limits)


def _open(source) -> tuple[object, str]:
    """(container, name for messages). `source`: a path, or the encoded file's bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        path = f"<{len(source)} bytes of video>"
        if len(source) == 0:
            raise VideoError(path, "empty (0 bytes)")
        target = io.BytesIO(bytes(source))
    else:
        path = target = os.fspath(source)
        if not os.path.exists(path):
            raise VideoError(path, "no such file")
        if os.path.isdir(path):
            raise VideoError(path, "is a directory, not a video file")
        if os.path.getsize(path) == 0:
            raise VideoError(path, "empty file (0 bytes)")
    try:
        container = av.open(target, mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(
            path, f"cannot open as a video container: corrupt, truncated or not a video "
            f"({_reason(e)})"
        ) from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoError(path, f"no video stream (streams: {', '.join(kinds)})")
    return container, path


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.strip() or type(e).__name__


def _check_size(path: str, width: int, height: int, limits: VideoLimits) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(path, f"invalid frame size {width}x{height}")
    if width * height > limits.max_pixels:
        raise VideoError(
            path, f"frame size {width}x{height} exceeds the max_pixels guard ({limits.max_pixels})"
        )


def _build_index(path: str, container, stream, limits: VideoLimits) -> _Index:
    """Demux (no decoding) to list every frame's pts and the keyframes."""
    declared = int(stream.frames or 0)
    if declared > limits.max_frames:
        raise VideoError(
            path, f"declares {declared} frames, over the max_frames guard ({limits.max_frames})"
        )
    _check_size(path, stream.codec_context.width, stream.codec_context.height, limits)
    pts: list[int] = []
    ends: list[int] = []
    packets = 0  # including packets the container marks as discarded (edit lists)
    keys: list[tuple[int, int]] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            packets += 1
            if packet.is_discard:
                continue
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None:
                raise VideoError(path, "video packets carry no timestamps")
            pts.append(int(t))
            ends.append(int(t) + int(packet.duration or 0))
            if packet.is_keyframe:
                keys.append((int(t), int(packet.dts if packet.dts is not None else t)))
            if len(pts) > limits.max_frames:
                raise VideoError(
                    path, f"more than {limits.max_frames} frames (the max_frames guard)"
                )
    except av.error.FFmpegError as e:
        raise VideoError(
            path, f"corrupt or truncated stream while demuxing ({_reason(e)})"
        ) from None
    if not pts:
        raise VideoError(path, "the video stream has zero frames")
    if declared and packets < declared:
        raise VideoError(
            path, f"truncated: the header declares {declared} frames but only {packets} are "
            "present in the file"
        )
    order = np.argsort(pts, kind="stable")
    pts_arr = np.asarray(pts, np.int64)[order]
    if np.any(np.diff(pts_arr) == 0):
        # duplicate timestamps would make frames unaddressable; keep the first of each
        pts_arr = np.unique(pts_arr)
    if not keys:
        raise VideoError(path, "no keyframe in the video stream; it cannot be decoded")
    keys.sort()
    end = max(ends)
    if end <= pts_arr[-1]:
        step = int(np.median(np.diff(pts_arr))) if len(pts_arr) > 1 else 1
        end = int(pts_arr[-1]) + max(step, 1)
    return _Index(
        pts=pts_arr,
        end_pts=int(end),
        key_pts=np.asarray([k[0] for k in keys], np.int64),
        key_dts=np.asarray([k[1] for k in keys], np.int64),
        time_base=stream.time_base or fractions.Fraction(1, 1),
    )


def _rotation_of(frame) -> int:
    try:
        rot = int(round(frame.rotation or 0))
    except (AttributeError, ValueError, TypeError):
        rot = 0
    return (round(rot / 90) * 90) % 360


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """Decoded frame -> uint8 [H, W, 3] upright (rotation applied)."""
    if size is not None and (frame.width, frame.height) != size:
        # a mid-stream resolution change: keep every frame at the first frame's size
        rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
    else:
        rgb = frame.to_ndarray(format="rgb24")
    k = _rotation_of(frame) // 90
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def probe(
    path: str | os.PathLike | bytes,
    *,
    limits: VideoLimits | ml_collections.ConfigDict | None = None,
) -> VideoInfo:
    """Frame count, fps, duration, displayed size and rotation of a video file.

    Reads the packets (no decoding) and decodes a single frame for the rotation metadata.
    """
    lim = _limits(limits)
    container, path = _open(path)
    try:
        stream = container.streams.video[0]
        index = _build_index(path, container, stream, lim)
        rotation = 0
        try:
            container.seek(int(index.key_dts[0]), stream=stream, backward=True)
            for frame in container.decode(stream):
                rotation = _rotation_of(frame)
                break
        except av.error.FFmpegError as e:
            raise VideoError(path, f"corrupt stream: cannot decode ({_reason(e)})") from None
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation in (90, 270):
            width, height = height, width
        duration = float((index.end_pts - index.pts[0]) * index.time_base)
        n = len(index.pts)
        return VideoInfo(
            num_frames=n,
            fps=n / duration if duration > 0 else 0.0,
            duration_s=duration,
            width=width,
            height=height,
            rotation=rotation,
        )
    finally:
        container.close()


def sample_indices(num_frames: int, n: int) -> np.ndarray:
    """int64 [n]: 0-based frame numbers at the centres of `n` equal parts of the video.

    floor((i + 0.5) * num_frames / n); when n > num_frames frames repeat (a short video still
    yields n frames). Same rule as the rollout's candidate frames.
    """
    if num_frames <= 0:
        raise ValueError(f"sample_indices: num_frames must be positive, got {num_frames}")
    if n <= 0:
        raise ValueError(f"sample_indices: n must be positive, got {n}")
    return np.floor((np.arange(n) + 0.5) * num_frames / n).astype(np.int64)


def _fps_indices(index: _Index, fps: float) -> np.ndarray:
    """Frames shown at times (k + 0.5) / fps, k = 0.. over the duration (timestamps, VFR-safe)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    duration = float((index.end_pts - index.pts[0]) * index.time_base)
    count = max(1, int(math.floor(duration * fps + 1e-9)))
    times = (np.arange(count) + 0.5) / fps
    # compare in stream ticks; a frame starting exactly at a sample time counts as shown then
    ticks = times / float(index.time_base) + 1e-6
    shown = np.searchsorted(index.pts - index.pts[0], ticks, side="right") - 1
    return np.clip(shown, 0, len(index.pts) - 1).astype(np.int64)


def _decode_all(container, stream, index: _Index, wanted, size) -> dict[int, np.ndarray]:
    """Decode the whole stream once; keep frames whose pts is in `wanted`."""
    got: dict[int, np.ndarray] = {}
    stream.codec_context.skip_frame = "DEFAULT"  # every frame decoded (after a seeking attempt)
    container.seek(int(index.key_dts[0]), stream=stream, backward=True)
    for frame in container.decode(stream):
        if frame.pts in wanted and frame.pts not in got:
            got[frame.pts] = _to_rgb(frame, size)
    return got


def _decode_packets(container, stream, wanted: set[int] | None):
    """Decoded frames from the current demux position. With `wanted`, packets of other frames
    are decoded with skip_frame=NONREF: a non-reference frame nobody wants is never decoded
    (nothing else depends on it), which is most B-frames."""
    cc = stream.codec_context
    try:
        for packet in container.demux(stream):
            if wanted is not None:
                skip = packet.pts is not None and packet.pts not in wanted
                cc.skip_frame = "NONREF" if skip else "DEFAULT"
            yield from packet.decode()
    finally:
        cc.skip_frame = "DEFAULT"


def _decode_seeking(container, stream, index: _Index, targets: np.ndarray, size):
    """Decode only up to each target, jumping to its keyframe when that skips work.

    targets: int64 pts, increasing and unique. Returns pts -> frame, or None when a seek landed
    after its target (an index the demuxer does not honour), so the caller can fall back.
    """
    got: dict[int, np.ndarray] = {}
    wanted = {int(t) for t in targets}
    frames = None  # the current decode generator
    last = None  # pts of the last decoded frame
    for target in targets:
        k = int(np.searchsorted(index.key_pts, target, side="right")) - 1
        k = max(k, 0)
        key = int(index.key_pts[k])
        if frames is None or last is None or key > last:
            # seek by the keyframe's pts: demuxers with edit lists (mp4 + B-frames) map a
            # seek to its dts onto the previous keyframe
            container.seek(key, stream=stream, backward=True)
            frames = _decode_packets(container, stream, wanted)
            last = None
        found = False
        for frame in frames:
            if frame.pts is None:
                continue
            if frame.pts > target:
                return None
            last = frame.pts
            if frame.pts == target:
                got[int(target)] = _to_rgb(frame, size)
                found = True
                break
        if not found:
            break  # stream ended early: reported by the caller as truncated
    return got


def read_frames(
    path: str | os.PathLike | bytes,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    seek: bool = True,
    limits: VideoLimits | ml_collections.ConfigDict | None = None,
) -> np.ndarray:
    """Decode frames of a video (a path, or the encoded file's bytes): uint8 [n, H, W, 3] RGB,
    upright.

    Exactly one of
      indices: 0-based frame numbers in presentation order (repeats allowed, any order);
      num_frames: that many frames at the centres of equal parts (:func:`sample_indices`);
      fps: frames shown at times (k + 0.5) / fps seconds (timestamps, so VFR-correct).
    seek: jump to keyframes and decode only as far as needed (True) or decode every frame
      (False); both return identical frames.
    """
    chosen = sum(x is not None for x in (indices, num_frames, fps))
    if chosen != 1:
        raise ValueError("read_frames: pass exactly one of indices, num_frames, fps")
    lim = _limits(limits)
    container, path = _open(path)
    try:
        stream = container.streams.video[0]
        # single-threaded decoding: loaders run one decoder per worker process, and frame
        # threads add a pipeline refill after every seek (measured slower on 2 cores)
        stream.thread_type = "NONE"
        index = _build_index(path, container, stream, lim)
        n_total = len(index.pts)
        if num_frames is not None:
            idx = sample_indices(n_total, int(num_frames))
        elif fps is not None:
            idx = _fps_indices(index, float(fps))
        else:
            idx = np.asarray(indices, np.int64).reshape(-1)
            if idx.size == 0:
                raise ValueError(f"{path}: read_frames got an empty list of indices")
            bad = idx[(idx < 0) | (idx >= n_total)]
            if bad.size:
                raise IndexError(
                    f"{path}: frame indices {bad[:5].tolist()} out of range 0..{n_total - 1}"
                )
        width, height = stream.codec_context.width, stream.codec_context.height
        if idx.size * width * height * 3 > lim.max_output_bytes:
            raise VideoError(
                path, f"{idx.size} frames of {width}x{height} exceed the max_output_bytes guard "
                f"({lim.max_output_bytes})"
            )
        size = (width, height)
        want_pts = np.unique(index.pts[idx])
        wanted = {int(p): i for i, p in enumerate(want_pts)}
        try:
            got = None
            if seek:
                got = _decode_seeking(container, stream, index, want_pts, size)
            if got is None:
                got = _decode_all(container, stream, index, wanted, size)
        except av.error.FFmpegError as e:
            raise VideoError(path, f"corrupt stream: decoding failed ({_reason(e)})") from None
        missing = [p for p in wanted if p not in got]
        if missing:
            first = int(np.searchsorted(index.pts, missing[0]))
            raise VideoError(
                path, f"truncated or corrupt: frame {first} (of {n_total}) could not be decoded"
            )
        return np.stack([got[int(p)] for p in index.pts[idx]])
    finally:
        container.close()


def write_video(
    path: str,
    frames: np.ndarray,
    fps: float = 8.0,
    *,
    codec: str = "libx264",
    gop: int = 16,
    crf: int = 18,
    qp: int | None = None,
    preset: str = "ultrafast",
    timestamps_s: Sequence[float] | None = None,
    rotation: int = 0,
) -> None:
    """Encode uint8 [n, H, W, 3] RGB frames to a file (H and W even for yuv420p).

    timestamps_s: per-frame presentation times in seconds for a variable frame rate video
      (millisecond resolution); default constant `fps`.
    rotation: counter-clockwise display rotation stored as metadata (pixels are not rotated).
    qp: a constant quantiser instead of `crf`'s rate control (which codes identical frames
      differently depending on the frames before them).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: write_video wants uint8 [n, H, W, 3], got {frames.dtype} "
                         f"{frames.shape}")
    n, height, width, _ = frames.shape
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        quality = {"crf": str(crf)} if qp is None else {"qp": str(qp)}
        stream.options = {**quality, "preset": preset}
        if rotation:
            stream.set_display_rotation(rotation)
        if timestamps_s is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
            if len(timestamps_s) != n:
                raise ValueError(f"{path}: {len(timestamps_s)} timestamps for {n} frames")
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            if timestamps_s is not None:
                frame.pts = int(round(timestamps_s[i] * 1000))
                frame.time_base = fractions.Fraction(1, 1000)
            else:
                frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
