"""The predictions file: one JSON object per line, one line per evaluated example.

Row fields (`make_row` builds one, `validate_row` checks one):

    id               str, unique within a benchmark
    benchmark        str (videogen_rewardbench | genai_bench_video | mjbench_video | video_pairs)
    pred             {"TA","MQ","VQ","OA"} -> int: 1 / 2 / 0 (tie) / -1 (no answer)
    label            {"TA","MQ","VQ","OA"} -> int: 1 / 2 / 0 (tie) / -1 (no label)
    trace            [str]: the assistant turns' text, in order
    turns            int: number of assistant turns (== len(trace))
    frames_selected  [[int]]: per assistant turn, the global frame numbers its tool call returned
                     ([] for a final turn or a failed call); len == turns
    error            null, or why the example could not be evaluated (e.g. a corrupt video)
    meta             {}: free-form; `duration_s` (the pair's longer video, seconds) drives the
                     length buckets; `initial_frames` ([int]) is shown by the HTML report
    scores           optional {key: [score_video1, score_video2]} for scalar-score models
    prompt           optional str

The writer appends and flushes each row, so a killed run loses at most the row being written.
A truncated last line (the process died mid-write) is tolerated by the reader, which reports it,
and removed by the writer before it appends again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

from vrthinker_jax.rollout import protocol

LABEL_KEYS = protocol.LABEL_KEYS
BENCHMARKS = ("videogen_rewardbench", "genai_bench_video", "mjbench_video", "video_pairs")
_VALUES = (-1, 0, 1, 2)


class PredictionFormatError(ValueError):
    """A predictions file or row is malformed; the message names the file, line and field."""


def make_row(
    ex_id: str,
    benchmark: str,
    *,
    pred: dict | None = None,
    label: dict | None = None,
    trace: list[str] | None = None,
    frames_selected: list[list[int]] | None = None,
    error: str | None = None,
    meta: dict | None = None,
    scores: dict | None = None,
    prompt: str | None = None,
) -> dict:
    """A prediction row with every field present; missing judgments/labels are -1."""
    trace = list(trace or [])
    frames = [list(map(int, f)) for f in (frames_selected or [])]
    frames += [[] for _ in range(len(trace) - len(frames))]
    row = {
        "id": str(ex_id),
        "benchmark": benchmark,
        "pred": {k: int((pred or {}).get(k, -1)) for k in LABEL_KEYS},
        "label": {k: int((label or {}).get(k, -1)) for k in LABEL_KEYS},
        "trace": trace,
        "turns": len(trace),
        "frames_selected": frames,
        "error": error,
        "meta": dict(meta or {}),
    }
    if scores is not None:
        row["scores"] = {k: [float(v[0]), float(v[1])] for k, v in scores.items()}
    if prompt is not None:
        row["prompt"] = prompt
    return row


def failed_row(ex_id: str, benchmark: str, error: str, *, label=None, meta=None, prompt=None):
    """The row for an example that could not be evaluated (it is counted, not lost)."""
    if not error:
        raise ValueError(f"failed_row({ex_id!r}): error must be a non-empty reason")
    return make_row(ex_id, benchmark, label=label, error=str(error), meta=meta, prompt=prompt)


def validate_row(row, where: str = "row") -> dict:
    """Checks a row's fields and types; raises PredictionFormatError naming `where`, the field."""
    if not isinstance(row, dict):
        raise PredictionFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("id", "benchmark", "pred", "label"):
        if field not in row:
            raise PredictionFormatError(f"{where}: missing field {field!r}")
    if not isinstance(row["id"], str) or not row["id"]:
        raise PredictionFormatError(f"{where}: field 'id' must be a non-empty string")
    for field in ("pred", "label"):
        d = row[field]
        if not isinstance(d, dict):
            raise PredictionFormatError(f"{where}: field {field!r} must be an object")
        for k, v in d.items():
            if k not in LABEL_KEYS:
                raise PredictionFormatError(
                    f"{where}: field {field!r} has unknown key {k!r} (expected {LABEL_KEYS})"
                )
            if isinstance(v, bool) or v not in _VALUES:
                raise PredictionFormatError(
                    f"{where}: {field}.{k} = {v!r}, expected one of {_VALUES}"
                )
    trace = row.get("trace", [])
    if not isinstance(trace, list) or not all(isinstance(t, str) for t in trace):
        raise PredictionFormatError(f"{where}: field 'trace' must be a list of strings")
    frames = row.get("frames_selected", [])
    if not isinstance(frames, list) or not all(
        isinstance(f, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in f)
        for f in frames
    ):
        raise PredictionFormatError(
            f"{where}: field 'frames_selected' must be a list (per turn) of lists of ints"
        )
    err = row.get("error")
    if err is not None and not isinstance(err, str):
        raise PredictionFormatError(f"{where}: field 'error' must be null or a string")
    if not isinstance(row.get("meta", {}), dict):
        raise PredictionFormatError(f"{where}: field 'meta' must be an object")
    scores = row.get("scores")
    if scores is not None:
        if not isinstance(scores, dict) or not all(
            k in LABEL_KEYS and isinstance(v, list) and len(v) == 2 for k, v in scores.items()
        ):
            raise PredictionFormatError(
                f"{where}: field 'scores' must be {{key: [score_video1, score_video2]}}"
            )
    return row


@dataclasses.dataclass
class ReadResult:
    """Rows of a predictions file, in file order (duplicates kept; metrics keep the last)."""

    rows: list[dict]
    truncated_last_line: bool  # the file ended in a partial row, which was ignored
    path: str


def read_predictions(path: str, *, benchmark: str | None = None) -> ReadResult:
    """Reads a predictions JSONL file.

    A last line that is not newline-terminated and does not parse is a truncated write: ignored
    and reported via `truncated_last_line`. Any other malformed line raises
    PredictionFormatError("<path>:<line>: ..."). With `benchmark`, rows of another benchmark
    are an error too (mixing benchmarks in one score is always a mistake).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such predictions file")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # data ending in "\n" leaves an empty last element; otherwise the last line is unterminated
    unterminated = lines[-1] != b""
    if not unterminated:
        lines = lines[:-1]
    rows: list[dict] = []
    truncated = False
    for i, raw in enumerate(lines):
        lineno = i + 1
        if not raw.strip():
            continue
        is_last = i == len(lines) - 1
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            if is_last and unterminated:
                truncated = True
                continue
            raise PredictionFormatError(f"{path}:{lineno}: not valid JSON ({e})") from None
        row = validate_row(obj, where=f"{path}:{lineno}")
        if benchmark is not None and row["benchmark"] != benchmark:
            raise PredictionFormatError(
                f"{path}:{lineno}: row is for benchmark {row['benchmark']!r}, expected "
                f"{benchmark!r}"
            )
        rows.append(row)
    return ReadResult(rows, truncated, path)


def done_ids(path: str, *, include_failed: bool = True) -> set[str]:
    """Ids already in a predictions file (empty if it does not exist), for resuming.

    include_failed=False leaves out rows with an error so that a re-run retries them (the new row
    is appended and wins over the old one when scoring).
    """
    if not os.path.exists(path):
        return set()
    rows = read_predictions(path).rows
    return {r["id"] for r in rows if include_failed or not r.get("error")}


# --------------------------------------------------------------------------- run manifest

MANIFEST_FILE = "run_manifest.json"
MANIFEST_FORMAT = 1
# (dotted key, what a user calls it): the manifest fields a resumed run must share, because
# each changes the predictions; the data directory's path and its videos' stat may change
# (a copy of the release with a fixed video, then --retry-failed)
RESUME_KEYS = (
    ("benchmark", "--benchmark"),
    ("model.id", "model (--checkpoint content)"),
    ("data.annotations", "data (the release's annotation files)"),
    ("data.split", "--split"),
    ("data.builder_config", "--builder-config"),
    ("settings.temperature", "--temperature"),
    ("settings.sampling_seed", "--seed (sampling)"),
    ("settings.tools_enabled", "tools (--no-tools)"),
)


def manifest_path(predictions_path: str) -> str:
    """The run manifest beside a predictions file: what made its rows (`eval --checkpoint`)."""
    return os.path.join(os.path.dirname(os.path.abspath(predictions_path)), MANIFEST_FILE)


def read_run_manifest(path: str) -> dict | None:
    """The manifest at `path`, None when there is none; PredictionFormatError when unreadable."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise PredictionFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PredictionFormatError(f"{path}: expected a run manifest of format "
                                    f"{MANIFEST_FORMAT}")
    return manifest


def write_run_manifest(path: str, manifest: dict) -> None:
    """Writes atomically (a kill mid-write leaves the old manifest, never half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": MANIFEST_FORMAT, **manifest}, f, indent=1)
    os.replace(tmp, path)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def manifest_differences(old: dict, new: dict) -> list[str]:
    """What differs between the run that wrote the rows (`old`) and this one, one phrase per
    RESUME_KEYS field, naming both values."""
    out = []
    for key, name in RESUME_KEYS:
        a, b = _get(old, key), _get(new, key)
        if a != b:
            if key == "model.id":
                a = f"{_get(old, 'model.checkpoint')} ({a})"
                b = f"{_get(new, 'model.checkpoint')} ({b})"
            elif key == "data.annotations":
                a, b = _get(old, "data.dir"), _get(new, "data.dir")
                a, b = f"{a} ({_get(old, key)})", f"{b} ({_get(new, key)})"
            out.append(f"{name}: the rows were made with {a!s}, this run has {b!s}")
    return out


def _drop_partial_tail(path: str) -> bool:
    """Truncates the file after its last newline (a partial row from a killed run)."""
    if not os.path.exists(path):
        return False
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        # scan back for the last newline in chunks
        pos, chunk = size, 1 << 16
        cut = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            j = block.rfind(b"\n")
            if j >= 0:
                cut = start + j + 1
                break
            pos = start
        f.truncate(cut)
    return True


class PredictionWriter:
    """Appends validated rows to a predictions file, flushing after each row.

    Opening it removes a partial last line left by a killed run (`dropped_partial_line` says
    whether it did); that example is not in `done_ids` and is simply evaluated again.
    """

    def __init__(self, path: str, *, fsync: bool = False):
        self.path = path
        self.fsync = fsync  # also fsync each row (slower; for flaky preemptible machines)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self.dropped_partial_line = _drop_partial_tail(path)
        self._f = open(path, "a", encoding="utf-8")
        self.written = 0

    def write(self, row: dict) -> None:
        name = row.get("id") if isinstance(row, dict) else "?"
        validate_row(row, where=f"{self.path}: row {name!r}")
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.written += 1

    def write_all(self, rows: Iterable[dict]) -> None:
        for r in rows:
            self.write(r)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
