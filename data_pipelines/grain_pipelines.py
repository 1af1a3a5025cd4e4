"""Grain input pipelines: SFT/RFT examples from traces, GRPO/eval prompts with frame banks.

Both pipelines are `grain.MapDataset` chains over records in the common schema
(`data_pipelines/schema.py`: plain dicts, a JSONL manifest / trace file, or a TFDS data source):

  source -> seeded shuffle (reshuffled every epoch) -> [pad the epoch, finite runs only]
         -> [repeat, infinite runs] -> per-process shard (process i of P takes the i-th block
            of b = batch_size / P rows of every global batch) -> build one example (decode
            frames, tokenise) -> batch

then `make_iterator` turns it into an iterator (optionally with multiprocess workers) whose
`get_state()` is saved with a training checkpoint; `restore_iterator` resumes at the very next
batch.

The shards are blocks of global batches so that a run of P processes, each placing its rows
with `vrthinker_jax.distributed.put_rows`, trains on exactly the global batches of one process
(same rows, same order): process i's rows are global rows [i * b, (i + 1) * b) of each batch.

Nothing is dropped silently. A row whose video cannot be decoded, whose trace is invalid, or whose
conversation does not fit the static shapes stays in its batch as a failed row (`failed=True`,
a `status` code, an `error` string, weight 0, no valid token). `scan_traces` counts the
over-long traces before training starts. Finite runs pad every epoch to a multiple of
(processes x per-process batch) with rows of status PADDING, so every process yields the same
number of full batches and no real row is dropped.

Rows, failed rows and their batches are built by `vrthinker_jax.train.examples` (the one
builder, shared with the in-memory pipeline of `train/sft.py` and with GRPO's trajectory rows);
this module is the Grain side: sources, decoding videos into frames, shuffling, sharding,
batching and iterators. Sequences are padded (not packed) to `seq_len`: packing several
conversations into one row would need per-segment M-RoPE restarts and block-diagonal
visibility on top of the memory-window mask.

Candidate frame k (1-based) of a video is frame `video.sample_indices(num_frames, N)[k - 1]`;
global frame g refers to video 1's candidate g (g <= N) or video 2's candidate g - N.

Batches (per process, b = batch_size / process_count):

  sft_dataset:    the keys of `examples.collate` (tokens int32 [b, seq], positions int32
                  [3, b, seq], frames uint8 [b, max_frames, H, W, 3], frame_mask bool
                  [b, max_frames], weight float32 [b], status int32 [b], failed bool [b],
                  id / error: list[str], ...)
  prompt_dataset: the keys of `examples.collate_prompts` (bank uint8 [b, 2N, H, W, 3], labels
                  int32 [b, 4] (TA, MQ, VQ, OA), status int32 [b], failed bool [b],
                  id / prompt / error: list[str])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np

from data_pipelines import processor, schema
from data_pipelines import video as video_lib
from vrthinker_jax.rollout import chat, frame_bank, protocol
from vrthinker_jax.train import examples

log = logging.getLogger(__name__)

def data_config(**overrides) -> ml_collections.ConfigDict:
    """Knobs of both pipelines."""
    cd = ml_collections.ConfigDict()
    cd.batch_size = 8  # global batch: split evenly over processes
    cd.seed = 0  # shuffle seed; epoch e uses seed + e
    cd.shuffle = True  # shuffle rows (False keeps the source order, e.g. for evaluation)
    cd.num_epochs = -1  # passes over the data; -1 repeats forever
    cd.workers = 0  # grain worker processes building examples (0 = in the main process)
    cd.worker_buffer = 2  # batches each worker prepares ahead
    # threads building rows in each process, and batches they keep ready; grain's defaults
    # (16 threads, 500 elements) would hold hundreds of 448 px frame banks in memory
    cd.read_threads = 2
    cd.prefetch_batches = 2  # at least read_threads
    cd.frame_size = (56, 56)  # (H, W) every frame is resized to; multiples of patch * merge
    cd.seq_len = 1024  # static token length of an SFT row (padded, not packed)
    cd.max_frames = 32  # static frame slots of an SFT row (frame occurrences, in order)
    # SFT loss weight of the tokens inside <synthesis>...</synthesis> (what the model says it
    # saw in the frames) relative to the other assistant tokens; 1 = a plain token mean
    cd.synthesis_weight = 1.0
    cd.scan_traces = True  # tokenise every trace once up front to count over-long ones
    cd.process_index = -1  # this process's shard; -1 = jax.process_index()
    cd.process_count = -1  # number of shards; -1 = jax.process_count()
    cd.update(overrides)
    return cd


# --------------------------------------------------------------------------- sources


def read_records(path: str) -> list[dict]:
    """A `video_pairs` manifest (JSONL/CSV) or `vrthinker_cot` file (JSONL) as records.

    Relative video paths become absolute (relative to the file's directory); labels become a
    `labels` dict; malformed rows raise naming "file:line".
    """
    from data_pipelines.tfds_builders import common

    base = os.path.dirname(os.path.abspath(path))
    out = []
    for where, row in common.read_rows(path):
        common.require(row, where, ("id", "prompt", "video_a", "video_b"))
        rec = as_record(row, where=where)
        for key in ("video_a", "video_b"):
            if rec[key] and not os.path.isabs(rec[key]):
                rec[key] = os.path.join(base, rec[key])
        out.append(rec)
    return out


def as_record(row: Mapping, *, where: str = "record") -> dict:
    """Any supported row (schema record, stored TFDS example, manifest row, trace) -> record."""
    if "video_a_bytes" in row and not isinstance(row.get("labels"), Mapping):
        return schema.decode(row)  # a stored TFDS example
    rec = dict(row)
    src = row["labels"] if isinstance(row.get("labels"), Mapping) else row
    try:
        rec["labels"] = {
            k: schema.manifest_label(src.get(k), field=k) for k in protocol.LABEL_KEYS
        }
    except schema.LabelError as e:
        raise ValueError(f"{where}: {e}") from None
    for key in ("id", "prompt", "video_a", "video_b"):
        rec[key] = str(rec.get(key, ""))
    rec.setdefault("meta", {})
    return rec


def tfds_source(name: str, split: str, *, data_dir: str, config=None):
    """A built TFDS dataset's random-access source (elements are stored examples)."""
    from data_pipelines import tfds_builders

    return tfds_builders.data_source(name, split, data_dir=data_dir, config=config)


# --------------------------------------------------------------------------- frames


class _VideoFile:
    """A record's video as a path; embedded bytes are written to a temporary file."""

    def __init__(self, record: Mapping, key: str):
        self.data = record.get(f"{key}_bytes") or b""
        self.path = record.get(key) or ""
        self._tmp = None

    def __enter__(self) -> str:
        if self.data:
            suffix = os.path.splitext(self.path)[1] or ".mp4"
            self._tmp = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
            self._tmp.write(self.data)
            self._tmp.close()
            return self._tmp.name
        if not self.path:
            raise video_lib.VideoError("<empty path>", "record has no video path")
        return self.path

    def __exit__(self, *exc):
        if self._tmp is not None:
            os.unlink(self._tmp.name)


def resize_frames(frames: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 [n, h, w, 3] -> uint8 [n, H, W, 3], bicubic (the Qwen processor's kernel)."""
    height, width = int(size[0]), int(size[1])
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([processor.resize_uint8(f, (height, width)) for f in frames])


def candidate_frames(
    record: Mapping, key: str, num_candidates: int, size: Sequence[int],
    which: Sequence[int] | None = None,
) -> np.ndarray:
    """Candidate frames of one video of a record: uint8 [len(which) or N, H, W, 3].

    Candidate k (1-based) is frame `video.sample_indices(num_frames, N)[k - 1]`, the rule the
    rollout and the synthetic oracle use. `which`: 1-based candidate numbers to decode (default
    all N). Raises `video.VideoError` naming the file.
    """
    with _VideoFile(record, key) as path:
        if which is None:
            frames = video_lib.read_frames(path, num_frames=num_candidates)
        else:
            total = video_lib.probe(path).num_frames
            cand = video_lib.sample_indices(total, num_candidates)
            which = np.asarray(which, np.int64)
            if which.size and (which.min() < 1 or which.max() > num_candidates):
                raise IndexError(f"{path}: candidates {which.tolist()} outside 1..{num_candidates}")
            frames = video_lib.read_frames(path, cand[which - 1])
    return resize_frames(frames, size)


def pair_bank(record: Mapping, num_candidates: int, size: Sequence[int]) -> np.ndarray:
    """uint8 [2N, H, W, 3]: video 1's N candidates then video 2's (global frames 1..2N)."""
    return np.concatenate([
        candidate_frames(record, "video_a", num_candidates, size),
        candidate_frames(record, "video_b", num_candidates, size),
    ])


def occurrence_frames(
    record: Mapping, frames: Sequence[int], num_candidates: int, size: Sequence[int]
) -> np.ndarray:
    """Pixels of global frame numbers (1..2N, repeats allowed): uint8 [len(frames), H, W, 3].

    Each video is decoded once, at the distinct candidates the list needs.
    """
    out = np.zeros((len(frames), int(size[0]), int(size[1]), 3), np.uint8)
    for video, key in ((1, "video_a"), (2, "video_b")):
        offset = (video - 1) * num_candidates  # global numbering: video 2 is N+1..2N
        slots = [i for i, g in enumerate(frames) if offset < int(g) <= offset + num_candidates]
        if not slots:
            continue
        local = [int(frames[i]) - offset for i in slots]
        distinct = sorted(set(local))
        pixels = candidate_frames(record, key, num_candidates, size, which=distinct)
        where = {c: j for j, c in enumerate(distinct)}
        for i, c in zip(slots, local):
            out[i] = pixels[where[c]]
    return out


# --------------------------------------------------------------------------- SFT rows


def merged_grid(model_cfg, frame_size: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of a frame's visual tokens under the model's patch / merge sizes
    (`frame_bank.PatchSpec`); raises naming data.frame_size when they do not divide it."""
    h, w = int(frame_size[0]), int(frame_size[1])
    try:
        return frame_bank.PatchSpec.from_model_config(model_cfg).merged_grid(h, w)
    except ValueError as e:
        raise ValueError(f"data.frame_size=({h}, {w}): {e}") from None


@dataclasses.dataclass
class TraceToExample(grain.transforms.Map):
    """A trace record -> one fixed-shape SFT row (`vrthinker_jax.train.examples`: the same
    builder as the in-memory pipeline), or a failed row saying why. Only the Grain side lives
    here: reading the record and decoding the frame occurrences from its videos."""

    tokenizer: object
    pcfg: protocol.ProtocolConfig
    merged_grid: tuple[int, int]  # (rows, cols) of a frame's visual tokens after the merge
    frame_size: tuple[int, int]  # (H, W) every frame is resized to
    seq_len: int
    max_frames: int
    synthesis_weight: float  # loss weight of synthesis tokens (data.synthesis_weight)

    def map(self, record):
        shape = (*self.frame_size, 3)
        if record.get("_padding"):
            return examples.failed_example(self.seq_len, self.max_frames, shape,
                                           status=examples.PADDING)
        rid = record.get("id", "")
        rid = rid.decode("utf-8") if isinstance(rid, bytes) else str(rid)
        try:
            rec = as_record(record, where=f"trace {rid!r}")
        except (ValueError, KeyError, TypeError) as e:
            return examples.failed_example(self.seq_len, self.max_frames, shape,
                                           status=examples.INVALID_TRACE,
                                           error=f"record {rid!r}: {e}", id=rid)
        tp = examples.trace_protocol(rec, self.pcfg)

        def pixels_of(frames):
            try:
                return occurrence_frames(rec, frames, tp.num_candidates, self.frame_size)
            except (video_lib.VideoError, OSError, IndexError) as e:
                raise examples.FramesUnavailable(str(e)) from e

        return examples.example_or_failed(
            lambda: protocol.trace_segments(rec, tp), pixels_of, self.tokenizer, pcfg=self.pcfg,
            seq_len=self.seq_len, max_frames=self.max_frames, merged_grid=self.merged_grid,
            frame_shape=shape, synthesis_weight=self.synthesis_weight, id=rid)


@dataclasses.dataclass
class TraceScan:
    """What `scan_traces` found: counts per status and the first few offending ids."""

    total: int = 0
    too_long: list[str] = dataclasses.field(default_factory=list)
    invalid: list[str] = dataclasses.field(default_factory=list)
    max_tokens: int = 0
    max_frames: int = 0

    def summary(self) -> str:
        return (
            f"{self.total} traces: {len(self.too_long)} too long (first: {self.too_long[:5]}), "
            f"{len(self.invalid)} invalid (first: {self.invalid[:5]}); longest "
            f"{self.max_tokens} tokens, most frames {self.max_frames}"
        )


def scan_traces(records, tokenizer, pcfg, grid: tuple[int, int], *, seq_len: int,
                max_frames: int) -> TraceScan:
    """Tokenises every trace (no video decoding; `grid`: a frame's merged token grid) and
    counts those that will not fit."""
    scan = TraceScan()
    for i in range(len(records)):
        rec = as_record(records[i])
        scan.total += 1
        try:
            t = examples.tokenize_trace(rec, tokenizer, pcfg, grid)
        except examples.InvalidConversation:
            scan.invalid.append(rec["id"])
            continue
        scan.max_tokens = max(scan.max_tokens, len(t.ids))
        scan.max_frames = max(scan.max_frames, len(t.frames))
        if len(t.ids) > seq_len or len(t.frames) > max_frames:
            scan.too_long.append(rec["id"])
    return scan


# --------------------------------------------------------------------------- prompt rows


@dataclasses.dataclass
class PairToPrompt(grain.transforms.Map):
    """A pair record -> GRPO/eval prompt row (`examples.prompt_row`): its candidate frames
    decoded into a bank, or a failed row saying why."""

    num_candidates: int
    frame_size: tuple[int, int]

    def map(self, record):
        shape = (2 * self.num_candidates, *self.frame_size, 3)
        if record.get("_padding"):
            return examples.prompt_row("", "", np.zeros(shape, np.uint8),
                                       schema.labels_array({}), status=examples.PADDING)
        rec = as_record(record)
        labels = schema.labels_array(rec["labels"])
        try:
            bank = pair_bank(rec, self.num_candidates, self.frame_size)
        except (video_lib.VideoError, OSError, IndexError) as e:
            return examples.prompt_row(rec["id"], rec["prompt"], np.zeros(shape, np.uint8),
                                       labels, status=examples.DECODE_ERROR, error=str(e))
        return examples.prompt_row(rec["id"], rec["prompt"], bank, labels)


# --------------------------------------------------------------------------- dataset plumbing


class _PadEpochs(grain.MapDataset):
    """Each epoch of `parent` (length n) padded to `length` >= n with {"_padding": True} rows."""

    def __init__(self, parent: grain.MapDataset, length: int, num_epochs: int):
        super().__init__(parent)
        self._n = len(parent)
        self._epoch_len = length
        self._epochs = num_epochs

    def __len__(self) -> int:
        return self._epoch_len * self._epochs

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, self._epoch_len)
        if i >= self._n:
            return {"_padding": True}
        return self._parent[epoch * self._n + i]

    def __str__(self) -> str:
        return f"_PadEpochs(epoch_len={self._epoch_len})"


class _BatchBlocks(grain.MapDataset):
    """Process `index` of `count`'s rows of a stream cut into global batches of `count *
    local` rows: the `index`-th block of `local` rows of each."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, local: int):
        super().__init__(parent)
        self._index, self._count, self._local = index, count, local

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, m):
        if isinstance(m, slice):
            return self.slice(m)
        batch, row = divmod(m, self._local)
        return self._parent[(batch * self._count + self._index) * self._local + row]

    def __str__(self) -> str:
        return f"_BatchBlocks(index={self._index}, count={self._count}, local={self._local})"


def process_shard(cfg, process_index=None, process_count=None) -> tuple[int, int]:
    """(index, count) of this process: explicit args, then cfg, then jax.process_*()."""
    index = process_index if process_index is not None else cfg.process_index
    count = process_count if process_count is not None else cfg.process_count
    index = jax.process_index() if index is None or index < 0 else int(index)
    count = jax.process_count() if count is None or count < 0 else int(count)
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not in [0, process_count={count})")
    return index, count


def local_batch_size(cfg, count: int) -> int:
    if cfg.batch_size % count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by {count} processes")
    return cfg.batch_size // count


def _rows(source, cfg, *, process_index=None, process_count=None) -> grain.MapDataset:
    """Shuffled, padded (finite runs), sharded, repeated rows of this process."""
    if isinstance(source, str):
        source = read_records(source)
    if isinstance(source, tuple):
        source = list(source)
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    n = len(ds)
    if n == 0:
        raise ValueError("the data source is empty")
    index, count = process_shard(cfg, process_index, process_count)
    local = local_batch_size(cfg, count)
    if cfg.shuffle:
        ds = ds.shuffle(seed=int(cfg.seed))  # epoch e is permuted with seed + e
    if cfg.num_epochs > 0:
        block = count * local
        # every epoch a whole number of global batches: each process gets n_pad / count rows
        ds = _PadEpochs(ds, -(-n // block) * block, int(cfg.num_epochs))
    else:
        ds = ds.repeat(None)
    return ds if count == 1 else _BatchBlocks(ds, index, count, local)


def _sft_grid(cfg, tokenizer, model_cfg, tokens_per_frame, grid) -> tuple[int, int]:
    """A frame's merged token grid from cfg.frame_size and the model, checked against the
    tokenizer's image pad id and the callers' expectations."""
    h, w = (int(x) for x in cfg.frame_size)
    patch = frame_bank.PatchSpec.from_model_config(model_cfg)
    merged = merged_grid(model_cfg, (h, w))
    if tokens_per_frame is not None and int(tokens_per_frame) != merged[0] * merged[1]:
        raise ValueError(f"tokens_per_frame={tokens_per_frame} but data.frame_size=({h}, {w}) "
                         f"gives {merged[0] * merged[1]}")
    if grid is not None and tuple(int(g) for g in grid) != patch.grid_thw(h, w):
        raise ValueError(f"grid={tuple(grid)} but data.frame_size=({h}, {w}) gives "
                         f"{patch.grid_thw(h, w)}")
    pad = tokenizer.token_to_id(chat.IMAGE_PAD)
    if int(model_cfg.image_token_id) != int(pad):
        raise ValueError(f"model image_token_id={model_cfg.image_token_id} but the tokenizer's "
                         f"{chat.IMAGE_PAD} is {pad}")
    return merged


def sft_dataset(
    traces, cfg, *, tokenizer, pcfg: protocol.ProtocolConfig, model_cfg,
    process_index: int | None = None, process_count: int | None = None,
    tokens_per_frame: int | None = None, grid: Sequence[int] | None = None,
) -> grain.MapDataset:
    """SFT / RFT batches (`TraceToExample` rows, `examples.collate`) of this process.

    traces: trace records (list of dicts, a `vrthinker_cot` JSONL path, or a TFDS source).
    Per-process batch = cfg.batch_size / process_count. Visual tokens per frame and the frame
    grid follow from cfg.frame_size and the model's patch / merge sizes; `tokens_per_frame` /
    `grid`, when given (e.g. by the rollout runtime), must agree with them.
    """
    merged = _sft_grid(cfg, tokenizer, model_cfg, tokens_per_frame, grid)
    if isinstance(traces, str):
        traces = read_records(traces)
    if cfg.scan_traces:
        scan = scan_traces(traces, tokenizer, pcfg, merged, seq_len=cfg.seq_len,
                           max_frames=cfg.max_frames)
        if scan.total and len(scan.too_long) + len(scan.invalid) == scan.total:
            # fail before the model compiles: a run on these rows would learn nothing
            raise ValueError(f"sft data: every trace would be rejected: {scan.summary()}; "
                             "raise data.seq_len / data.max_frames or match the protocol")
        if scan.too_long or scan.invalid:
            log.warning("sft data: %s (kept as failed rows)", scan.summary())
    _, count = process_shard(cfg, process_index, process_count)
    ds = _rows(traces, cfg, process_index=process_index, process_count=process_count)
    size = (int(cfg.frame_size[0]), int(cfg.frame_size[1]))
    ds = ds.map(TraceToExample(tokenizer, pcfg, merged, size, int(cfg.seq_len),
                               int(cfg.max_frames), float(cfg.synthesis_weight)))
    return ds.batch(local_batch_size(cfg, count), drop_remainder=True,
                    batch_fn=examples.collate)


def prompt_dataset(
    pairs, cfg, *, num_candidates: int, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """GRPO / evaluation batches (`PairToPrompt` rows, `examples.collate_prompts`) of this
    process."""
    _, count = process_shard(cfg, process_index, process_count)
    ds = _rows(pairs, cfg, process_index=process_index, process_count=process_count)
    size = (int(cfg.frame_size[0]), int(cfg.frame_size[1]))
    ds = ds.map(PairToPrompt(int(num_candidates), size))
    return ds.batch(local_batch_size(cfg, count), drop_remainder=True,
                    batch_fn=examples.collate_prompts)


def make_iterator(ds: grain.MapDataset, cfg):
    """A checkpointable iterator; `cfg.workers` > 0 builds batches in worker processes."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(cfg.read_threads), prefetch_buffer_size=int(cfg.prefetch_batches)
    ))
    if cfg.workers > 0:
        from absl import flags

        # grain's workers read absl flags; a program not started by absl.app has not parsed them
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(cfg.workers), per_worker_buffer_size=int(cfg.worker_buffer)
        ))
    return iter(it_ds)


def iterator_state(it) -> str:
    """JSON text of the iterator's position, saved beside the training checkpoint."""
    return json.dumps(it.get_state())


def restore_iterator(it, state: str | dict) -> None:
    """Moves a fresh iterator (same pipeline and config) to a saved position."""
    it.set_state(json.loads(state) if isinstance(state, str) else state)
