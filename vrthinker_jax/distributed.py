"""Multi-process runs: joining one, and moving per-process rows to and from global arrays.

Every entry point (`experiments/train.py`, `python -m vrthinker_jax.eval`, `python -m
vrthinker_jax.score`) calls `initialize` first, before any JAX computation:

* `--coordinator_address HOST:PORT --num_processes N --process_id I`: join an N-process run
  (GPU clusters, CPU processes; process 0 hosts the coordinator at HOST:PORT);
* `--distributed auto` (or the environment variable VRTHINKER_DISTRIBUTED=auto, so a launcher
  can set it once for every worker): `jax.distributed.initialize()` with no arguments, which
  finds the coordinator, process count and id itself on a Cloud TPU slice, under SLURM and
  under Open MPI;
* neither: one process (the default; nothing is initialised).

In a run of P processes, each process holds only its own rows of a batch (the per-process Grain
shards: `data_pipelines.grain_pipelines`). `put_rows` is the one placement of such rows: it
builds the global arrays (`jax.make_array_from_process_local_data`) split over the mesh's batch
axes; `local_rows` reads a process's rows back from a global array (its addressable shards), in
the same order. `allgather_json` / `any_process` / `max_over_processes` are the few host-side
agreements the loops need (every process must make the same compiled calls with the same
shapes). With one process all of these are the plain single-process operations.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

ENV_VAR = "VRTHINKER_DISTRIBUTED"
MODES = ("off", "auto")


class DistributedError(ValueError):
    """Inconsistent multi-process flags (a user error: the CLIs print one line, exit 2)."""


# --------------------------------------------------------------------------- joining a run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of an argparse CLI (`--coordinator_address` etc.; the dashed
    spellings are accepted too)."""
    g = parser.add_argument_group("multi-process run (all processes run the same command)")
    g.add_argument("--coordinator_address", "--coordinator-address", default=None,
                   help="HOST:PORT of process 0's coordinator (with --num_processes, "
                   "--process_id)")
    g.add_argument("--num_processes", "--num-processes", type=int, default=None,
                   help="processes in the run")
    g.add_argument("--process_id", "--process-id", type=int, default=None,
                   help="this process's index in [0, num_processes)")
    g.add_argument("--distributed", choices=MODES, default=None,
                   help=f"'auto': let jax.distributed.initialize() find the cluster (TPU slice, "
                   f"SLURM, Open MPI); default: ${ENV_VAR} or 'off'")


def define_absl_flags(flags_module) -> None:
    """The same flags for an absl program (`experiments/train.py`)."""
    flags_module.DEFINE_string("coordinator_address", None,
                               "HOST:PORT of process 0's coordinator (multi-process run)")
    flags_module.DEFINE_integer("num_processes", None, "processes in the run")
    flags_module.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
    flags_module.DEFINE_enum("distributed", None, list(MODES),
                             f"'auto': jax.distributed.initialize() finds the cluster (TPU "
                             f"slice, SLURM, Open MPI); default: ${ENV_VAR} or 'off'")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str | None = None) -> bool:
    """Joins the multi-process run the arguments (or $VRTHINKER_DISTRIBUTED) describe; returns
    whether one was joined. Must run before any JAX computation.

    Raises DistributedError for partial or inconsistent flags."""
    mode = mode or os.environ.get(ENV_VAR) or "off"
    if mode not in MODES:
        raise DistributedError(f"--distributed / ${ENV_VAR}={mode!r}: expected one of {MODES}")
    explicit = [coordinator_address, num_processes, process_id]
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise DistributedError("give all of --coordinator_address HOST:PORT, "
                                   "--num_processes N and --process_id I (or none)")
        host, sep, port = str(coordinator_address).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedError(f"--coordinator_address {coordinator_address!r}: expected "
                                   "HOST:PORT")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process_id {process_id}: expected 0 <= process_id < "
                                   f"--num_processes {num_processes}")
        if num_processes == 1:
            return False
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
        return True
    if mode == "auto":
        _cpu_collectives()
        jax.distributed.initialize()
        return True
    return False


def initialize_from_args(args, error=DistributedError) -> bool:
    """`initialize` from the flags `add_arguments` defined; a bad set raises `error` (a CLI's
    one-line error class)."""
    try:
        return initialize(args.coordinator_address, args.num_processes, args.process_id,
                          args.distributed)
    except DistributedError as e:
        raise error(str(e)) from None


def _cpu_collectives() -> None:
    # cross-process collectives of the CPU backend (CPU runs, host-side gathers); a TPU or GPU
    # backend ignores it
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_writer() -> bool:
    """True on the process that writes shared files (TensorBoard, metrics, predictions,
    exports): process 0. Starts no backend outside a multi-process run."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process got here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- placement


def put_rows(tree, shardings=None):
    """Process-local host rows -> global device arrays.

    tree: a pytree of arrays holding this process's rows (numpy or fully addressable);
    shardings: a matching pytree (or prefix) of NamedShardings whose batch dims are split over
      the mesh's batch axes (`sharding.batch_sharding`), or None for one device (plain
      `jax.device_put`). Each process passes its own rows, in the order of the global rows its
      devices hold; the global batch dim is the sum over processes. Dims a sharding does not
      split must be equal on every process. With one process this is `jax.device_put`.
    """
    if shardings is None:
        return jax.device_put(tree)

    def one(x, s):
        return jax.make_array_from_process_local_data(s, np.asarray(x))

    return jax.tree.map(one, tree, shardings)


def put_value(x, sharding):
    """A value every process holds in full (the same on each: initial params, a PRNG key)
    -> a global array laid out by `sharding`. `jax.device_put` refuses a committed
    single-device array or a key for a sharding that spans other processes' devices."""
    if (isinstance(x, jax.Array) and not x.is_fully_addressable) or \
            sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put_value(jax.random.key_data(x), sharding))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def local_rows(x, row_dim: int = 0) -> np.ndarray:
    """This process's rows of a global array (dim `row_dim` split over processes, the other
    dims whole on each device), in the order `put_rows` takes them; the whole array when it is
    fully addressable (one process)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    by_start = {}
    for shard in x.addressable_shards:
        idx = shard.index
        for d in range(len(idx)):
            if d != row_dim and shard.data.shape[d] != x.shape[d]:
                raise ValueError(f"local_rows: dim {d} of a {x.shape} array is split over "
                                 f"devices ({x.sharding}); only dim {row_dim} may be")
        by_start.setdefault((idx[row_dim].start or 0) if idx else 0, shard)
    return np.concatenate([np.asarray(by_start[k].data) for k in sorted(by_start)],
                          axis=row_dim)


def global_rows(mesh, local: int, rules=None) -> int:
    """Rows of a global batch whose process-local part has `local` rows on `mesh` (split over
    its batch axes by `rules`, default `sharding.DEFAULT_RULES`): `local` times the processes
    that hold distinct rows."""
    from vrthinker_jax import sharding

    if mesh is None:
        return local
    rules = sharding.DEFAULT_RULES if rules is None else rules
    total = sharding.batch_size_multiple(mesh, rules)
    s = sharding.batch_sharding(mesh, 1, rules=rules)
    mine = {sl[0].start or 0 for sl in s.addressable_devices_indices_map((total,)).values()}
    if local % len(mine):
        raise ValueError(f"{local} rows on this process do not split over its {len(mine)} "
                         "row blocks of the mesh's batch axes")
    return local * total // len(mine)


def rows_held(mesh, total: int) -> list[int]:
    """The global rows (sorted) of a `total`-row batch split over `mesh`'s batch axes (by
    `sharding.DEFAULT_RULES`, as the eval CLI's engine splits them) that this process's devices
    hold: the rows it passes to `put_rows`, in that order. All of them without a mesh or with
    one process."""
    from vrthinker_jax import sharding

    if mesh is None or jax.process_count() == 1:
        return list(range(total))
    s = sharding.batch_sharding(mesh, 1)
    rows = set()
    for (sl,) in s.addressable_devices_indices_map((total,)).values():
        rows.update(range(*sl.indices(total)))
    return sorted(rows)


# --------------------------------------------------------------------------- host agreements


def allgather_json(obj) -> list:
    """Every process's `obj` (JSON-able), in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(every[i, : int(n)]).decode("utf-8"))
            for i, n in enumerate(sizes.reshape(-1))]


def from_process_0(obj):
    """Process 0's `obj` (JSON-able) on every process: what it read from a shared file."""
    return allgather_json(obj if is_writer() else None)[0]


def any_process(flag) -> bool:
    """True on every process when `flag` is true on any (a loop's continue / call decision)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(bool(flag)))).any())


def all_processes(flag) -> bool:
    """True on every process when `flag` is true on all of them."""
    return not any_process(not bool(flag))


def max_over_processes(value: int) -> int:
    """The largest `value` of any process (a static shape every process must use)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.asarray(multihost_utils.process_allgather(np.asarray(int(value)))).max())


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over processes (counts of rows each process holds)."""
    if jax.process_count() == 1:
        return dict(values)
    keys = sorted(values)
    every = allgather_json([float(values[k]) for k in keys])
    return {k: float(sum(p[i] for p in every)) for i, k in enumerate(keys)}
