"""What the project's command-line tools share: one-line user errors instead of tracebacks."""

from __future__ import annotations

import argparse
import ast


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise CliError (one line) instead of exiting."""

    def error(self, message):
        raise CliError(message)


def apply_overrides(cfg, overrides: list[str], error=CliError):
    """Sets `a.b.c=value` (a Python literal, else a bare string) in a ConfigDict for each
    override; an unknown field raises `error` naming it (a typo must not pass silently)."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise error(f"--set {item!r}: expected key=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if not hasattr(node, "keys") or p not in node:
                raise error(f"--set {item!r}: config has no field {p!r}")
            node = node[p]
        if not hasattr(node, "keys") or leaf not in node:
            raise error(f"--set {item!r}: config has no field {leaf!r}")
        node[leaf] = value
    return cfg
