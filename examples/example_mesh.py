"""Helper module of the examples (not a script): training on a device mesh.

`--mesh data=2,fsdp=4` (axes `data`, `fsdp`, `tensor`; default: one device,
no mesh) builds a `jax.make_mesh` of that shape, with explicit axis types (jax's
default) or `--axis-types auto` (GSPMD). The batch is split over `data` and
`fsdp` (both shard the batch, as in FSDP); each parameter is split by a rule
from its path and shape (`param_spec`): on a `tensor` axis the attention and
MLP kernels split Megatron-style (q, k, v, gate, up on their output axis; o,
down on their input axis), and on `fsdp` its largest axis that divides evenly
(the others stay whole). The optimizer state follows the parameters
(`htmuon_jax.state_shardings`); `--distribute` also passes the mesh to the
spectral optimizer (`distribute=mesh`).

Under explicit axes the step gathers each weight (over `fsdp`) before the
forward pass, as FSDP does, so that every product has one clear sharding;
the gradients come back split like the parameters. Under `auto` axes GSPMD
places the collectives itself.

Multi-host: `--coordinator HOST:PORT --num-processes N --process-id I` call
`jax.distributed.initialize` (CPU collectives over gloo) before anything else
touches the devices; every process runs the same command, builds the same
global batch and hands its own rows to
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Megatron's split of a transformer block (kernels are `(..., in, out)`):
# these split their output axis over `tensor`...
COLUMN = frozenset({"q", "k", "v", "gate", "up"})
# ... and these their input axis.
ROW = frozenset({"o", "down"})


def mesh_flag(value: str) -> tuple[tuple[str, int], ...]:
  """`data=2,fsdp=4` -> `(("data", 2), ("fsdp", 4))`."""
  axes: list[tuple[str, int]] = []
  for part in value.split(","):
    name, eq, size = part.partition("=")
    name = name.strip()
    if not eq or name not in AXES:
      raise argparse.ArgumentTypeError(
        f"expected AXIS=SIZE,... with AXIS one of {', '.join(AXES)} "
        f"(e.g. data=2,fsdp=4), got {value!r}"
      )
    if name in dict(axes):
      raise argparse.ArgumentTypeError(f"axis {name} given twice in {value!r}")
    try:
      n = int(size)
    except ValueError:
      n = 0
    if n < 1:
      raise argparse.ArgumentTypeError(
        f"{name}: expected a positive size, got {size!r}"
      )
    axes.append((name, n))
  return tuple(axes)


def add_mesh_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("mesh (default: one device)")
  g.add_argument(
    "--mesh",
    type=mesh_flag,
    default=None,
    help="train on a device mesh AXIS=SIZE,... of axes data, fsdp, tensor "
    "(e.g. data=2,fsdp=4); it uses the first prod(SIZE) devices",
  )
  g.add_argument(
    "--axis-types",
    default=None,
    choices=("explicit", "auto"),
    help="mesh axis types: explicit (sharding in types, jax.make_mesh's "
    "default; the default) or auto (GSPMD)",
  )
  g.add_argument(
    "--distribute",
    action="store_true",
    help="pass the mesh to the spectral optimizer (distribute=mesh)",
  )
  g.add_argument(
    "--compiled-stats",
    action="store_true",
    help="print (and record in --metrics-json) the compiled step's "
    "per-device memory and its collectives",
  )
  g.add_argument(
    "--coordinator",
    default=None,
    help="multi-host: HOST:PORT of process 0 (jax.distributed.initialize)",
  )
  g.add_argument(
    "--num-processes", type=int, default=None, help="multi-host: processes"
  )
  g.add_argument(
    "--process-id", type=int, default=None, help="multi-host: this process"
  )


# Flags that place the computation without changing what it computes (to
# round-off): a checkpoint of one mesh resumes on another.
MESH_FLAGS = frozenset(
  {"mesh", "axis_types", "distribute", "coordinator", "num_processes",
   "process_id", "compiled_stats"}
)  # fmt: skip


def check_args(
  parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
  """Refuses mesh flags that contradict each other (one-line errors)."""
  multi = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in multi) and any(v is None for v in multi):
    parser.error(
      "--coordinator, --num-processes, --process-id: give all three "
      "(multi-host) or none"
    )
  if args.num_processes is not None:
    if args.num_processes < 1:
      parser.error(f"--num-processes {args.num_processes}: must be >= 1")
    if not 0 <= args.process_id < args.num_processes:
      parser.error(
        f"--process-id {args.process_id}: must be in 0..{args.num_processes - 1}"
      )
    if args.mesh is None:
      parser.error("--coordinator: needs --mesh (the global mesh)")
    if getattr(args, "alpha_every", 0):
      parser.error(
        "--alpha-every: not on several processes (it reads every matrix "
        "on the host)"
      )
  if args.mesh is None:
    if args.distribute:
      parser.error("--distribute: needs --mesh")
    if args.axis_types is not None:
      parser.error(f"--axis-types {args.axis_types}: needs --mesh")
    return
  if args.distribute and args.optimizer in ("adamw", "optax_muon"):
    parser.error(
      f"--distribute: {args.optimizer} is not an htmuon_jax optimizer "
      "(it takes no distribute=)"
    )
  need, have = math.prod(n for _, n in args.mesh), jax.device_count()
  if need > have:
    shown = ",".join(f"{a}={n}" for a, n in args.mesh)
    parser.error(f"--mesh {shown}: needs {need} devices, {have} found")
  shards = math.prod(n for a, n in args.mesh if a in BATCH_AXES)
  if args.batch_size % shards:
    parser.error(
      f"--batch-size {args.batch_size}: must divide evenly over the batch "
      f"axes of --mesh ({shards} shards)"
    )


def initialize(argv: Optional[Sequence[str]] = None) -> None:
  """`jax.distributed.initialize` for the multi-host flags in `argv` (None:
  `sys.argv[1:]`).

  `jax.distributed.initialize` must come before anything starts jax's
  backend, and importing `htmuon_jax` does (a constant table), so the
  scripts call this before their imports when run as programs; a second
  call is a no-op. Incomplete or bad multi-host flags are left to
  `check_args` to refuse.

  Raises:
    ValueError: jax's backend started before this call (multi-host runs
      must start from the command line).
  """
  if jax.distributed.is_initialized():
    return
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--coordinator")
  pre.add_argument("--num-processes", type=int)
  pre.add_argument("--process-id", type=int)
  try:
    args, _ = pre.parse_known_args(argv)
  except SystemExit:  # A malformed value: the script's parser says so.
    return
  multi = (args.coordinator, args.num_processes, args.process_id)
  if any(v is None for v in multi):
    return
  if not 0 <= args.process_id < args.num_processes:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=120,
    )
  except RuntimeError as e:  # The backend is up: too late.
    raise ValueError(
      "--coordinator: jax.distributed.initialize must run before jax starts "
      "(run the script as a program, not main() after importing jax)"
    ) from e


def param_spec(
  names: tuple[str, ...], shape: tuple[int, ...], sizes: dict[str, int]
) -> P:
  """Where a parameter goes on a mesh of `sizes` (axis -> size).

  Tensor: a kernel under a `COLUMN` module splits its last axis, one under a
  `ROW` module its second-last. FSDP: then the largest remaining axis that
  `fsdp` divides evenly (the first of equals); none: that axis stays whole.
  """
  spec: list[Optional[str]] = [None] * len(shape)
  tensor = sizes.get("tensor", 1)
  if tensor > 1 and len(shape) >= 2 and names[-1] == "kernel":
    module = names[-2] if len(names) >= 2 else ""
    axis = -1 if module in COLUMN else -2 if module in ROW else None
    if axis is not None and shape[axis] % tensor == 0:
      spec[axis] = "tensor"
  fsdp = sizes.get("fsdp", 1)
  if fsdp > 1:
    free = [i for i, n in enumerate(shape) if spec[i] is None and n % fsdp == 0]
    if free:
      spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
  return P(*spec)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's arrays live: the mesh, the parameters' and the batch's
  shardings."""

  mesh: Mesh
  explicit: bool

  @property
  def sizes(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    axes = tuple(a for a in BATCH_AXES if a in self.mesh.shape)
    return NamedSharding(self.mesh, P(axes if axes else None))

  def param_shardings(self, params: Any) -> Any:
    from example_utils import path_names  # Not at the top: no cycle.

    return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(
        self.mesh, param_spec(path_names(path), np.shape(x), self.sizes)
      ),
      params,
    )

  def gathered(self, params: Any) -> Any:
    """Explicit axes: each weight gathered over `fsdp` (the forward pass's
    copy; the transpose splits the gradient back). Auto: unchanged."""
    if not self.explicit or self.sizes.get("fsdp", 1) == 1:
      return params

    def gather(x):
      spec = jax.typeof(x).sharding.spec
      whole = P(*(None if a == "fsdp" else a for a in spec))
      return jax.sharding.reshard(x, NamedSharding(self.mesh, whole))

    return jax.tree.map(gather, params)

  def put(self, tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) onto the mesh."""

    def put(x: Any, sharding: NamedSharding) -> jax.Array:
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return jax.tree.map(put, tree, shardings)

  def put_batch(self, batch: Any) -> Any:
    """A global batch (the same on every process) split over the batch axes:
    each process hands its own rows to
    `jax.make_array_from_process_local_data`."""
    sharding = self.batch_sharding

    def put(x):
      x = np.asarray(x)
      rows = [
        idx[0].indices(len(x))[:2]
        for idx in sharding.addressable_devices_indices_map(x.shape).values()
      ]
      lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
      return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)

    return jax.tree.map(put, batch)

  def put_eval(self, batch: Any) -> Any:
    """Validation batches (any size) replicated."""
    return self.put(batch, jax.tree.map(lambda _: self.replicated, batch))

  def to_host(self, tree: Any) -> Any:
    """Global arrays as numpy (gathered from every process)."""
    if jax.process_count() == 1:
      return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def layout(args: argparse.Namespace) -> Optional[Layout]:
  """The `Layout` of `--mesh` (None: one device, no mesh)."""
  if args.mesh is None:
    return None
  names = tuple(a for a, _ in args.mesh)
  shape = tuple(n for _, n in args.mesh)
  need = math.prod(shape)  # check_args saw that there are enough.
  explicit = args.axis_types in (None, "explicit")
  kind = AxisType.Explicit if explicit else AxisType.Auto
  mesh = jax.make_mesh(
    shape,
    names,
    axis_types=(kind,) * len(names),
    devices=jax.devices()[:need],
  )
  return Layout(mesh, explicit)
