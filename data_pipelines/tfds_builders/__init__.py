"""TFDS builders (array_record, manual directory, no TensorFlow) for the benchmarks and our data.

Importing this package registers the builders with TFDS, so `tfds.builder(name, ...)` finds them:

  videogen_rewardbench, genai_bench_video, mjbench_video, vrthinker_cot, video_pairs

Build and read (configs: "paths" (default) stores video paths; "embedded" stores the files too):

  from data_pipelines import tfds_builders
  builder = tfds_builders.build("mjbench_video", manual_dir=..., data_dir=...)
  print(tfds_builders.missing_report(builder))  # per split: examples, missing videos
  source = tfds_builders.data_source("mjbench_video", "test", data_dir=...)  # random access
  record = schema.decode(source[0])

or plainly `tfds.builder("mjbench_video", data_dir=..., file_format="array_record")
.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))` and
`tfds.data_source("mjbench_video", split="test", data_dir=...)`.
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from data_pipelines.tfds_builders import (
    common,
    genai_bench_video,
    mjbench_video,
    video_pairs,
    videogen_rewardbench,
    vrthinker_cot,
)

BUILDERS = {
    "videogen_rewardbench": videogen_rewardbench.VideogenRewardbench,
    "genai_bench_video": genai_bench_video.GenaiBenchVideo,
    "mjbench_video": mjbench_video.MjbenchVideo,
    "vrthinker_cot": vrthinker_cot.VrthinkerCot,
    "video_pairs": video_pairs.VideoPairs,
}

FILE_FORMAT = "array_record"


def _name(name: str, config) -> str:
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    return name if config is None or not isinstance(config, str) else f"{name}/{config}"


def builder(name: str, *, data_dir: str, config=None) -> tfds.core.DatasetBuilder:
    """The builder of `name`; `config` is a config name ("paths", "embedded", ...) or a config
    object (e.g. `genai_bench_video.GenaiConfig(name="mine", bothbad="exclude")`)."""
    kwargs = {"data_dir": data_dir, "file_format": FILE_FORMAT}
    if config is not None and not isinstance(config, str):
        return BUILDERS[name](config=config, **kwargs)
    return tfds.builder(_name(name, config), **kwargs)


def build(name: str, *, manual_dir: str, data_dir: str, config=None) -> tfds.core.DatasetBuilder:
    """Builds (or reuses) the dataset from the release files in `manual_dir`."""
    b = builder(name, data_dir=data_dir, config=config)
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return b


def data_source(name: str, split: str, *, data_dir: str, config=None):
    """Random-access source of stored examples (`len`, `[i]`); Grain reads it directly."""
    return builder(name, data_dir=data_dir, config=config).as_data_source(split=split)


def source_fingerprint(manual_dir: str) -> dict:
    """What a release directory holds, for keying its built dataset and for run manifests:
    {"dir": absolute path, "annotations": sha256 over every annotation file's (`common.
    ROW_FORMATS`) relative path and bytes (labels, prompts, video references), "files": sha256
    over every other file's relative path, size and mtime (videos: a stat, not a read)}."""
    import hashlib

    root = os.path.abspath(manual_dir)
    rows, files = hashlib.sha256(), hashlib.sha256()
    for d, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if os.path.splitext(name)[1].lower() in common.ROW_FORMATS:
                rows.update(rel.encode() + b"\0")
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        rows.update(block)
                rows.update(b"\0")
            else:
                st = os.stat(path)
                files.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return {"dir": root, "annotations": "sha256:" + rows.hexdigest(),
            "files": "sha256:" + files.hexdigest()}


def cache_dir(data_dir: str, fingerprint: dict) -> str:
    """Where the dataset of a release with `fingerprint` is built under `data_dir`: one folder
    per (directory, content), so a changed release or another directory never reads a stale
    build (TFDS itself reuses any finished build in its data_dir)."""
    import hashlib

    key = json.dumps([fingerprint["dir"], fingerprint["annotations"], fingerprint["files"]])
    return os.path.join(data_dir, "source-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def missing_report(b: tfds.core.DatasetBuilder) -> dict:
    """{split: {"examples", "missing_examples", "missing_files", "first_missing", "policy"}}."""
    return dict(b.info.metadata.get("missing_videos", {}))


__all__ = ["BUILDERS", "build", "builder", "cache_dir", "common", "data_source", "missing_report",
           "source_fingerprint"]
