"""What the project's command-line tools share: one-line user errors instead of tracebacks, and
one way to name a config and override its fields (ml_collections' `config_flags` syntax, as
`experiments/train.py` takes it): `--config=path/to/config.py[:arg]` and
`--config.a.b=value`."""

from __future__ import annotations

import argparse
import os

CONFIG_PREFIX = "--config."


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise CliError (one line) instead of exiting."""

    def error(self, message):
        raise CliError(message)


def split_config_overrides(extra: list[str], error=CliError) -> list[str]:
    """The `--config.a.b=value` items of an argparse `parse_known_args` remainder; anything
    else there is an unknown argument and raises `error` naming it."""
    bad = [a for a in extra if not a.startswith(CONFIG_PREFIX)]
    if bad:
        raise error(f"unrecognized arguments: {' '.join(bad)}")
    return list(extra)


def load_config(spec: str, overrides: list[str] = (), error=CliError):
    """'path/to/config.py[:arg]' plus `--config.a.b=value` overrides -> the ConfigDict, loaded
    by ml_collections' `config_flags` as `experiments/train.py --config` loads it, then
    `override_config`. Config files import `experiments.configs`: run from the repository
    root. Every failure raises `error` with one line naming the file or field."""
    from absl import flags
    from ml_collections import config_flags

    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise error(f"--config: no such file {path!r}")
    argv = ["prog", f"--config={spec}"]
    fv = flags.FlagValues()  # a private registry: the caller's CLI may be argparse, not absl's
    try:
        config_flags.DEFINE_config_file("config", None, "config file[:arg]", flag_values=fv,
                                        sys_argv=argv)
        fv(argv)
        cfg = fv.config
    except ImportError as e:
        raise error(f"--config {spec}: {e} (run from the repository root)") from None
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        raise error(f"--config {spec}: {_last_line(e)}") from None
    return override_config(cfg, overrides, error, where=path)


def override_config(cfg, overrides: list[str], error=CliError, where: str = "the config"):
    """Applies `--config.a.b=value` overrides in place (to a file's config or one built in
    code) and returns cfg. Each value is parsed by ml_collections' `config_flags`, typed by
    the field's current type, as train.py's overrides are; an unknown field (a typo must not
    pass silently) or a value the field's type rejects raises `error` with one line naming
    it."""
    from absl import flags
    from ml_collections import config_flags

    for item in overrides:
        key, eq, _ = item[len(CONFIG_PREFIX):].partition("=")
        if not item.startswith(CONFIG_PREFIX) or not eq or not key:
            raise error(f"{item!r}: expected {CONFIG_PREFIX}KEY=VALUE")
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                at = ".".join(parts[:i]) or "the top level"
                raise error(f"{CONFIG_PREFIX}{key}: {where} has no field {part!r} in {at}")
            node = node[part]
    for item in overrides:  # one at a time, so a bad value's error names its field
        argv = ["prog", item]
        fv = flags.FlagValues()
        try:
            # config_flags finds the overrides in sys_argv (sys.argv by default)
            config_flags.DEFINE_config_dict("config", cfg, "the config", flag_values=fv,
                                            lock_config=False, sys_argv=argv)
            fv(argv)
        except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
            raise error(f"{item}: {_last_line(e)}") from None
    return cfg


def _last_line(e: BaseException) -> str:
    """The innermost error's last line (the config file's or parser's own, not a wrapper's)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    lines = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    return lines[-1].strip()
