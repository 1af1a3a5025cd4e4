"""Shared pieces of the pair-dataset builders: row readers, video path resolution, the missing-
video report, and the `PairBuilder` base class (array_record, manual directory, no TensorFlow).

Row readers yield `(where, row)` with `where` = "file:line" (JSONL, CSV), "file[item i]" (JSON
list) or "file[row i]" (parquet), so a malformed row's error names the file and the line.

Supported annotation formats: JSONL (`.jsonl`), JSON (`.json`, a list of objects or an object
holding one list under "data" / "rows" / "examples"), CSV (`.csv`, header row) and parquet
(`.parquet`, via pyarrow, which `tensorflow-datasets` already depends on).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import schema

log = logging.getLogger(__name__)

ROW_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
MISSING_POLICIES = ("keep", "skip", "error")
REPORT_FIRST = 5  # how many missing paths a report names


class RowError(ValueError):
    """A malformed annotation row; the message starts with "file:line:"."""


# --------------------------------------------------------------------------- readers


def read_rows(path: str) -> Iterator[tuple[str, dict]]:
    """Rows of an annotation file as dicts, each with where it came from ("file:line")."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        yield from _read_jsonl(path)
    elif ext == ".json":
        yield from _read_json(path)
    elif ext == ".csv":
        yield from _read_csv(path)
    elif ext == ".parquet":
        yield from _read_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported annotation format {ext!r}; expected {ROW_FORMATS}")


def _utf8_text(path: str) -> str:
    """The file's text; RowError naming the line of the first byte that is not UTF-8 (the csv
    and json readers would only say "codec can't decode byte", with no file or line)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RowError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the "
                       "file as UTF-8") from None


def _read_jsonl(path: str):
    with io.StringIO(_utf8_text(path)) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                kind = type(row).__name__
                raise RowError(f"{path}:{line_no}: expected a JSON object, got {kind}")
            yield f"{path}:{line_no}", row


def _read_json(path: str):
    text = _utf8_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # some releases name JSONL files .json: fall back to one object per line
        if e.lineno > 1 and text.lstrip().startswith("{"):
            yield from _read_jsonl(path)
            return
        raise RowError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):
        lists = [k for k in ("data", "rows", "examples") if isinstance(data.get(k), list)]
        if not lists:
            raise RowError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise RowError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise RowError(f"{path}[item {i}]: expected a JSON object, got {type(row).__name__}")
        yield f"{path}[item {i}]", row


def _read_csv(path: str):
    with io.StringIO(_utf8_text(path), newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise RowError(f"{path}:1: empty CSV (no header row)")
        # pandas writes an unnamed index column; drop it
        for row in reader:
            line_no = reader.line_num
            if None in row:
                raise RowError(f"{path}:{line_no}: more fields than the header has")
            yield f"{path}:{line_no}", {k: v for k, v in row.items() if k and k.strip()}


def _read_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - tensorflow-datasets depends on pyarrow
        raise ValueError(f"{path}: reading parquet needs pyarrow") from None
    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}[row {i}]", row


def require(row: Mapping, where: str, fields: Sequence[str]) -> None:
    """Raises RowError naming the row and the missing fields."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise RowError(f"{where}: missing field(s) {missing}; row has {sorted(row)}")


def find_files(root: str, stems: Sequence[str], exts: Sequence[str] = ROW_FORMATS) -> list[str]:
    """Files under `root` (top level and one level down) named `<stem><ext>` or `<stem>-*<ext>`
    (Hugging Face shard names such as `test-00000-of-00001.parquet`), sorted."""
    found = []
    dirs = [root] + sorted(
        os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
    )
    for d in dirs:
        for name in sorted(os.listdir(d)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in exts:
                continue
            if any(stem == s or re.fullmatch(re.escape(s) + r"-\d+-of-\d+", stem) for s in stems):
                found.append(os.path.join(d, name))
    return found


def split_name(stem: str) -> str:
    """A file stem as a TFDS split name (letters, digits, underscore)."""
    name = re.sub(r"\W+", "_", stem).strip("_")
    if not name:
        raise ValueError(f"cannot make a split name from {stem!r}")
    return name


# --------------------------------------------------------------------------- videos


class VideoResolver:
    """Maps a release's video reference (relative path, absolute path, URL) to a local file.

    Tried in order: the path as given (absolute, or relative to each root), the URL's path
    (and its suffixes) relative to each root, then - for URLs and bare file names only - the one
    file with that base name anywhere under the first root (Hugging Face releases reference
    videos by URL; users download them into the manual dir in whatever folders).
    """

    def __init__(self, roots: Sequence[str]):
        self.roots = [os.path.abspath(r) for r in roots if r]
        self._by_name: dict[str, list[str]] | None = None

    def _index(self) -> dict[str, list[str]]:
        if self._by_name is None:
            self._by_name = {}
            if self.roots:
                for d, _, names in os.walk(self.roots[0]):
                    for n in names:
                        self._by_name.setdefault(n, []).append(os.path.join(d, n))
        return self._by_name

    def resolve(self, ref: str) -> str | None:
        ref = str(ref).strip()
        if not ref:
            return None
        candidates = []
        parsed = urllib.parse.urlparse(ref)
        if parsed.scheme in ("http", "https", "gs", "s3", "hf"):
            rel = urllib.parse.unquote(parsed.path).lstrip("/")
            parts = rel.split("/")
            # try every suffix of the URL path: .../resolve/main/videos/x.mp4 -> videos/x.mp4
            candidates += ["/".join(parts[i:]) for i in range(len(parts))]
        else:
            candidates.append(ref)
        for c in candidates:
            if os.path.isabs(c):
                if os.path.isfile(c):
                    return c
                continue
            for root in self.roots:
                p = os.path.join(root, c)
                if os.path.isfile(p):
                    return os.path.abspath(p)
        is_url = len(candidates) > 1 or parsed.scheme != ""
        if not (is_url or os.path.dirname(ref) == ""):
            # a relative path with folders names its place: a same-named file elsewhere (e.g.
            # another model's folder) is not it
            return None
        hits = self._index().get(os.path.basename(candidates[-1]), [])
        return hits[0] if len(hits) == 1 else None


@dataclasses.dataclass
class MissingReport:
    """Counts examples whose video files are missing, per split."""

    dataset: str
    split: str
    policy: str
    examples: int = 0  # rows read
    missing_examples: int = 0  # rows with at least one missing video
    missing_files: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "examples": self.examples,
            "missing_examples": self.missing_examples,
            "missing_files": len(self.missing_files),
            "first_missing": self.missing_files[:REPORT_FIRST],
            "policy": self.policy,
        }

    def summary(self) -> str:
        first = ", ".join(self.missing_files[:REPORT_FIRST])
        action = {"keep": "kept, flagged in meta.missing_videos", "skip": "skipped"}.get(
            self.policy, self.policy
        )
        return (
            f"{self.dataset}[{self.split}]: {self.missing_examples} of {self.examples} examples "
            f"reference missing video files ({len(self.missing_files)} files; {action}); "
            f"first: {first}"
        )


# --------------------------------------------------------------------------- builder base


@dataclasses.dataclass(eq=False)
class PairConfig(tfds.core.BuilderConfig):
    """Build options shared by every pair builder.

    embed_videos: store the encoded video files in `video_*_bytes` (self-contained dataset)
      instead of only their paths.
    missing: what to do with an example whose video file is not found: "keep" (stored, listed
      in its meta["missing_videos"]; the pipelines then report it as a decode failure), "skip"
      (not stored) or "error" (stop the build). Every policy counts and logs them, and the
      counts go into the dataset's metadata (`builder.info.metadata["missing_videos"]`).
    """

    embed_videos: bool = False
    missing: str = "keep"


def standard_configs(cls=PairConfig, **extra) -> list:
    return [
        cls(name="paths", description="video paths only", **extra),
        cls(name="embedded", description="encoded video files embedded", embed_videos=True,
            **extra),
    ]


class PairBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the pair builders. Subclasses implement `_split_sources` and `_row_to_pair`.

    `_split_sources(manual_dir) -> {split: [annotation files]}`;
    `_row_to_pair(row, where, split, index, resolver) -> dict` with schema fields (video_a/b as
    the release's references), or None to leave the row out on purpose (e.g. a label-less row
    the builder documents as excluded; those are counted too).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = standard_configs()
    DEFAULT_CONFIG_NAME = "paths"
    SOURCE = ""  # schema `source` value

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup needs the `importlib_resources` backport (not a dependency here) for
        # builders defined in a package; the module file is all it needs (checksums lookup).
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=schema.features(),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_sources(self, manual_dir: str) -> dict[str, list[str]]:
        raise NotImplementedError

    def _row_to_pair(self, row, where, split, index, resolver) -> dict | None:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        sources = self._split_sources(manual_dir)
        if not sources:
            raise ValueError(
                f"{self.name}: no annotation files found in {manual_dir}.\n"
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        return {
            split: self._generate_examples(split=split, files=files, manual_dir=manual_dir)
            for split, files in sources.items()
        }

    def _generate_examples(self, split: str, files: Sequence[str], manual_dir: str):
        cfg = self.builder_config
        if cfg.missing not in MISSING_POLICIES:
            raise ValueError(f"{self.name}: missing={cfg.missing!r}; expected {MISSING_POLICIES}")
        report = MissingReport(self.name, split, cfg.missing)
        excluded = 0
        index = 0
        for path in files:
            resolver = VideoResolver([os.path.dirname(os.path.abspath(path)), manual_dir])
            for where, row in read_rows(path):
                pair = self._row_to_pair(row, where, split, index, resolver)
                index += 1
                if pair is None:
                    excluded += 1
                    continue
                report.examples += 1
                example = self._finish(pair, where, resolver, report)
                if example is not None:
                    yield f"{split}/{index:09d}", example
        if report.missing_examples:
            log.warning(report.summary())
        meta = self.info.metadata
        meta.setdefault("missing_videos", {})[split] = report.as_dict()
        meta.setdefault("excluded_rows", {})[split] = excluded
        meta["config"] = {"embed_videos": cfg.embed_videos, "missing": cfg.missing}

    def _finish(self, pair: dict, where: str, resolver: VideoResolver, report: MissingReport):
        cfg = self.builder_config
        meta = dict(pair.get("meta") or {})
        meta.setdefault("row", where)
        missing = []
        contents = {}
        for key in ("video_a", "video_b"):
            ref = pair[key]
            inline = pair.get(f"{key}_bytes", b"")
            if inline:  # the release embeds the video itself
                contents[key] = (str(ref), inline)
                continue
            found = resolver.resolve(ref)
            if found is None:
                missing.append(str(ref))
                contents[key] = (str(ref), b"")
            else:
                data = b""
                if cfg.embed_videos:
                    with open(found, "rb") as f:
                        data = f.read()
                contents[key] = (found, data)
        if missing:
            report.missing_examples += 1
            report.missing_files += missing
            if cfg.missing == "error":
                raise FileNotFoundError(f"{where}: video file(s) not found: {missing}")
            if cfg.missing == "skip":
                return None
            meta["missing_videos"] = missing
        return schema.make_example(
            id=pair["id"],
            prompt=pair["prompt"],
            video_a=contents["video_a"][0],
            video_b=contents["video_b"][0],
            video_a_bytes=contents["video_a"][1],
            video_b_bytes=contents["video_b"][1],
            labels=pair["labels"],
            source=pair.get("source", self.SOURCE or self.name),
            meta=meta,
            num_candidates=pair.get("num_candidates", 0),
            turns=pair.get("turns"),
        )


def as_float(value, where: str, field: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RowError(f"{where}: field {field}={value!r} is not a number") from None


def label_or_row_error(fn, value, where: str, field: str, **kw) -> int:
    try:
        return fn(value, **kw)
    except schema.LabelError as e:
        raise RowError(f"{where}: field {field}: {e}") from None
