"""Sharded-jit cases on 8 forced CPU devices.

Not collected by the main suite (its name does not start with `test_`):
`tests/test_sharding.py` runs this file with pytest in a subprocess that sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX is imported.
Run it by hand with

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m pytest -q -p no:xdist tests/sharding_cases.py

Every case compares a sharded, jitted run with the same optimizer run
unsharded (one device, no `distribute`) on the same inputs.
"""

from __future__ import annotations

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import htmuon_jax
from htmuon_jax import sharding as sh
from htmuon_jax import testing
from tests import helpers

MDN = htmuon_jax.MuonDimensionNumbers

if jax.device_count() != 8:
  pytest.skip(
    "needs XLA_FLAGS=--xla_force_host_platform_device_count=8",
    allow_module_level=True,
  )

MESHES = [(8, 1), (4, 2), (2, 4)]
AXES = ("fsdp", "tp")

# fp32 throughout. Sharded runs reorder sums (all-reduces, blocked matmuls),
# so results differ from the unsharded run by a few fp32 ulps, amplified by
# the spectral step's conditioning (singular-vector error ~ eps / gap; gaps
# of these Gaussian test matrices are >~ 1e-2 of s_max): 1e-5 relative to
# the largest update entry is ~100 ulps.
RTOL = 1e-5
# method="polynomial" is an iteration that amplifies 1-ulp input differences
# (XLA fuses the momentum's multiply-adds differently in sharded and
# unsharded programs) to ~2e-4 of the update (measured 1.4e-4 absolute on
# updates of max ~0.7), the order of its own error against an SVD; on params
# of max ~4 that is 4e-5 relative.
METHOD_RTOL = {"polynomial": 2e-4}

# Shapes: every sharded axis divisible by 8 (mesh 8x1) and by 4 (mesh 2x4).
SHAPES = {
  "w_fsdp": (32, 48),  # fan_in sharded (FSDP)
  "w_tp": (48, 32),  # fan_out sharded (tensor parallel)
  "w_both": (32, 32),  # both
  "stack": (8, 16, 24),  # nnx.scan-style stacked kernel: 8 matrices
  "scale": (8, 16),  # stacked norm scale: not a matrix
  "bias": (48,),
}
SPECS = {
  "w_fsdp": P("fsdp", None),
  "w_tp": P(None, "tp"),
  "w_both": P("fsdp", "tp"),
  "stack": P("fsdp", None, "tp"),
  "scale": P(None, "tp"),
  "bias": P("fsdp"),
}
DIMS = {
  "w_fsdp": MDN(),
  "w_tp": MDN(),
  "w_both": MDN(),
  "stack": MDN(reduction_axis=1, output_axis=2),
  "scale": None,
  "bias": None,
}


def _tree(seed: int) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {
    name: jax.random.normal(k, shape, jnp.float32)
    for k, (name, shape) in zip(keys, SHAPES.items())
  }


PARAMS = _tree(0)
# Two steps by default; the stream cases run three (the basis carries over).
GRADS = [_tree(1), _tree(2), _tree(3)]


def _mesh(shape, explicit: bool = False) -> jax.sharding.Mesh:
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(shape, AXES, axis_types=(kind, kind))


def _shardings(mesh):
  return {k: NamedSharding(mesh, s) for k, s in SPECS.items()}


def _step(opt):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _run_unsharded(opt, steps: int = 2):
  params, state = PARAMS, opt.init(PARAMS)
  step = jax.jit(_step(opt))
  for g in GRADS[:steps]:
    params, state = step(params, state, g)
  return params, state


def _run_sharded(opt, mesh, steps: int = 2):
  """Jitted steps with params, grads and state sharded; returns outputs."""
  shard = _shardings(mesh)
  params = jax.device_put(PARAMS, shard)
  state_shard = sh.state_shardings(opt, params)
  # Eager init + device_put: one compilation fewer than a jitted init
  # (which test_state_split_like_params covers).
  state = jax.device_put(opt.init(PARAMS), state_shard)
  grads = [jax.device_put(g, shard) for g in GRADS[:steps]]
  compiled = jax.jit(
    _step(opt),
    in_shardings=(shard, state_shard, shard),
    out_shardings=(shard, state_shard),
  ).lower(params, state, grads[0])
  compiled = compiled.compile()
  for g in grads:
    params, state = compiled(params, state, g)
  return params, state, state_shard, compiled


def _assert_close(actual, expected, label="", rtol=RTOL):
  for (path, a), b in zip(
    jax.tree.leaves_with_path(actual), jax.tree.leaves(expected)
  ):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-30)
    np.testing.assert_allclose(
      a,
      b,
      rtol=0,
      atol=rtol * scale,
      err_msg=f"{label} {jax.tree_util.keystr(path)}",
    )


ALIASES = sorted(htmuon_jax.ALIASES)


def _has_distribute(name: str) -> bool:
  return "distribute" in inspect.signature(getattr(htmuon_jax, name)).parameters


# htmuon on every mesh; each other alias on one mesh (compilations dominate
# the run time, and the sharding logic is shared by all aliases).
ALIAS_CASES = [("htmuon", m, d) for m in MESHES for d in (False, True)] + [
  (name, MESHES[i % len(MESHES)], d)
  for i, name in enumerate(n for n in ALIASES if n != "htmuon")
  for d in ((False, True) if _has_distribute(name) else (False,))
]


@functools.lru_cache(maxsize=None)
def _expected(name: str):
  return _run_unsharded(_make(name))


def _make(name: str, **kwargs):
  fn = getattr(htmuon_jax, name)
  sig = inspect.signature(fn).parameters
  if "muon_weight_dimension_numbers" in sig:
    kwargs["muon_weight_dimension_numbers"] = DIMS
  elif "weight_dimension_numbers" in sig:
    kwargs["weight_dimension_numbers"] = DIMS
  return fn(0.05, **kwargs)


def test_aliases_found():
  assert {"htmuon", "muon"} <= set(ALIASES), ALIASES


@pytest.mark.parametrize("name,mesh_shape,distributed", ALIAS_CASES)
def test_alias_sharded_equals_unsharded(name, mesh_shape, distributed):
  mesh = _mesh(mesh_shape)
  kwargs = {"distribute": mesh} if distributed else {}
  expected, expected_state = _expected(name)
  params, state, state_shard, compiled = _run_sharded(
    _make(name, **kwargs), mesh
  )
  _assert_close(params, expected, f"{name} {mesh_shape}")
  _assert_close(state, expected_state, f"{name} {mesh_shape} state")
  # All-to-alls move whole matrices. (The layouts here are deliberately mixed,
  # so some regrouping also gathers; see test_distributed_collectives for the
  # communication of uniform layouts.)
  _check_step(params, state, state_shard, compiled, mesh, distributed)


def _param_of(path):
  """The parameter (a key of SHAPES) a state leaf belongs to, or None."""
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey) and k.key in SHAPES:
      return k.key
  return None


def _assert_state_split(state, params):
  """Each device holds 1/N of every state leaf whose parameter is split N
  ways (measured on the arrays' addressable shards), and the whole of the
  others (counters, hyperparameters)."""
  ways = {
    k: p.size // p.addressable_shards[0].data.size for k, p in params.items()
  }
  assert max(ways.values()) > 1, ways  # The check can see a replicated leaf.
  for path, leaf in jax.tree.leaves_with_path(state):
    key = _param_of(path)
    n = ways[key] if key is not None else 1
    sizes = [s.data.size for s in leaf.addressable_shards]
    assert len(sizes) == jax.device_count(), path
    assert sizes == [leaf.size // n] * len(sizes) and leaf.size % n == 0, (
      jax.tree_util.keystr(path),
      leaf.shape,
      sizes,
      n,
    )


def _has_method(name: str) -> bool:
  return "method" in inspect.signature(getattr(htmuon_jax, name)).parameters


# Every alias; those with a `method` with a stateless method and with
# "stream" (whose per-matrix basis is the largest per-matrix state).
LAYOUT_CASES = [
  (name, method)
  for name in ALIASES
  for method in (("svd", "stream") if _has_method(name) else (None,))
]


@pytest.mark.parametrize("name,method", LAYOUT_CASES)
def test_state_split_like_params(name, method):
  """state_shardings splits every state leaf of a parameter like it, on
  every mesh (momenta, AdamW/AdaMuon/NorMuon moments, streaming bases)."""
  opt = _make(name, **({} if method is None else {"method": method}))
  state = opt.init(PARAMS)
  for i, mesh_shape in enumerate(MESHES):
    mesh = _mesh(mesh_shape)
    params = jax.device_put(PARAMS, _shardings(mesh))
    shardings = sh.state_shardings(opt, params)
    if i == 0:  # The documented way: a jitted init with out_shardings.
      placed = jax.jit(opt.init, out_shardings=shardings)(params)
      _assert_close(placed, state, f"{name} {method} jitted init")
    else:
      placed = jax.device_put(state, shardings)
    _assert_state_split(placed, params)


# Per-matrix state of the distributed step: the streaming basis (its
# transformation alone) and NorMuon's per-unit moments (the whole htnormuon
# alias, whose normalization runs distributed after the spectral step).
NO_GATHER_MAKERS = {
  "stream": lambda dims, **kw: htmuon_jax.scale_by_htmuon(
    0.125, method="stream", weight_dimension_numbers=dims, **kw
  ),
  "htnormuon": lambda dims, **kw: htmuon_jax.htnormuon(
    0.05, method="svd", muon_weight_dimension_numbers=dims, **kw
  ),
}


@pytest.mark.parametrize(
  "name,mesh_shape,axes",
  [
    ("stream", (8, 1), None),
    ("stream", (4, 2), ("fsdp",)),
    ("htnormuon", (8, 1), None),
  ],
)
def test_distributed_step_moves_no_state_by_gather(name, mesh_shape, axes):
  """FSDP layout, distributed step with per-matrix state (the streaming
  bases, NorMuon's moments): the state of a stack of matrices stays split
  along the stack where it is stored, that of a single matrix travels with
  it by all-to-all; no state (nor anything else) is all-gathered,
  all-reduced or permuted, and the state stays split."""
  mesh = _mesh(mesh_shape)
  keys = jax.random.split(jax.random.key(5), 3)

  def well_conditioned(key, shape):
    # 1.5 I + a perturbation of spectral norm <~ 0.4: singular values in
    # ~[1.1, 1.9], gaps ~0.03, so the full-rank basis (square matrices: the
    # stacked basis has the parameter's shape) is not sensitive to the
    # round-off of a differently batched matmul, and RTOL applies to the
    # update itself.
    m, n = shape[-2:]
    noise = jax.random.normal(key, shape) / (m**0.5 + n**0.5)
    return 1.5 * jnp.eye(m, n) + 0.4 * noise

  params = {
    "stack": well_conditioned(keys[0], (8, 32, 32)),
    "w_fsdp": well_conditioned(keys[1], (32, 32)),
    "w_tp": well_conditioned(keys[2], (32, 64)),
  }
  dims = {"stack": MDN(1, 2), "w_fsdp": MDN(), "w_tp": MDN()}
  specs = {
    "stack": P(None, "fsdp", None),
    "w_fsdp": P("fsdp", None),
    "w_tp": P("fsdp", None),
  }
  shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  make = functools.partial(NO_GATHER_MAKERS[name], dims)
  opt = make(distribute=sh.Distribute(mesh, axes))
  placed = jax.device_put(params, shard)
  state_shard = sh.state_shardings(opt, placed)
  state = jax.device_put(opt.init(params), state_shard)
  # The params are the gradients too (any matrices do).
  compiled = (
    jax.jit(
      opt.update,
      in_shardings=(shard, state_shard, shard),
      out_shardings=(shard, state_shard),
    )
    .lower(placed, state, placed)
    .compile()
  )
  counts = testing.count_collectives(compiled)["total"]
  assert counts["all-to-all"] > 0, counts
  for op in (
    "all-gather",
    "all-reduce",
    "collective-permute",
    "reduce-scatter",
  ):
    assert counts[op] == 0, counts
  updates, new_state = compiled(placed, state, placed)
  _assert_state_split(new_state, placed)
  ref = make()
  want, want_state = jax.jit(ref.update)(params, ref.init(params), params)
  _assert_close(updates, want, f"{name} no gather")
  _assert_close(new_state, want_state, f"{name} no gather state")


METHODS = ["svd", "eigh", "newton_schulz", "polynomial", "express"]


TRANSFORMS = {
  "scale_by_spectral_power": htmuon_jax.scale_by_spectral_power,
  "scale_by_htmuon": htmuon_jax.scale_by_htmuon,
}
# (transform, distribute, explicit axes): naive and distributed, over all
# devices or one axis of the 2x4 mesh, with auto and explicit mesh axes. Each
# method gets one configuration (in rotation) to keep compilations few.
CONFIGS = [
  ("scale_by_htmuon", "all", True),
  ("scale_by_spectral_power", None, True),
  ("scale_by_spectral_power", "tp", False),
]
TRANSFORM_CASES = [
  (m,) + CONFIGS[i % len(CONFIGS)] for i, m in enumerate(METHODS)
] + [("svd",) + c for c in CONFIGS[1:]]


@pytest.mark.parametrize(
  "method,transform,distribute,explicit", TRANSFORM_CASES
)
def test_transforms_methods(method, transform, distribute, explicit):
  mesh = _mesh((2, 4), explicit=explicit)
  power = 0.0 if method == "newton_schulz" else 0.125
  make = lambda **kw: TRANSFORMS[transform](
    power, method=method, weight_dimension_numbers=DIMS, **kw
  )
  if distribute == "all":
    distribute = mesh
  elif distribute is not None:
    distribute = sh.Distribute(mesh, (distribute,))
  expected, _ = _run_unsharded(make(), steps=1)
  params, _, _, _ = _run_sharded(make(distribute=distribute), mesh, 1)
  _assert_close(
    params,
    expected,
    f"{transform} {method} {distribute}",
    rtol=METHOD_RTOL.get(method, RTOL),
  )


def test_distribute_context_mesh_and_injected_power():
  """Axis names of the `jax.set_mesh` mesh; a traced power (no recompile)."""
  mesh = _mesh((4, 2), explicit=True)
  opt = optax.inject_hyperparams(htmuon_jax.htmuon)(
    0.05, power=0.25, muon_weight_dimension_numbers=DIMS, distribute="fsdp"
  )
  ref = optax.inject_hyperparams(htmuon_jax.htmuon)(
    0.05, power=0.25, muon_weight_dimension_numbers=DIMS
  )
  expected, _ = _run_unsharded(ref)
  with jax.set_mesh(mesh):
    params, _, _, _ = _run_sharded(opt, mesh)
  _assert_close(params, expected, "context mesh")


def test_grouping_pads_and_transposes():
  """grouped_map on its own: mixed shapes, tall and wide, padding."""
  mesh = _mesh((8, 1))
  key = jax.random.key(3)
  # (8, 12, 12) is a multiple of the device count: it stays in place while
  # (5, 12, 12) of the same group is padded.
  shapes = [(3, 8, 16), (2, 16, 8), (5, 12, 12), (8, 12, 12)]
  mats = [
    jax.random.normal(jax.random.fold_in(key, i), s)
    for i, s in enumerate(shapes)
  ]
  fn = lambda x: htmuon_jax.spectral_power(x, 0.125, method="svd")
  got, want = jax.jit(
    lambda ms: (
      sh.grouped_map(fn, ms, mesh, transpose_equivariant=True),
      [fn(m) for m in ms],
    )
  )(mats)
  for g, w, m in zip(got, want, mats):
    chex.assert_shape(g, m.shape)
    np.testing.assert_allclose(g, w, rtol=0, atol=RTOL)


def test_grouped_map_with_per_matrix_state():
  """A stateful per-matrix function (matrix, state) -> (out, new state)."""
  mesh = _mesh((4, 2))
  key = jax.random.key(4)
  items = [
    (
      jax.random.normal(jax.random.fold_in(key, i), (b, 8, 8)),
      jnp.full((b, 8), float(i)),
    )
    for i, b in enumerate([3, 1, 6, 8, 16])
  ]

  def fn(item):
    x, s = item
    # Row norms carried as per-matrix state, e.g. a NorMuon-style moment.
    s = 0.5 * s + jnp.sum(x * x, axis=-1)
    return x / jnp.sqrt(s)[..., None], s

  got, want = jax.jit(
    lambda it: (
      sh.grouped_map(fn, it, sh.Distribute(mesh)),
      [fn(i) for i in it],
    )
  )(items)
  # Elementwise and row sums only: equal up to fp32 rounding.
  chex.assert_trees_all_close(got, want, rtol=1e-6)


@pytest.mark.parametrize(
  "mesh_shape,spec,gathers",
  [
    ((8, 1), P("fsdp", None), 0),
    # Inputs replicated over `tp` need their results gathered over `tp`.
    ((4, 2), P("fsdp", None), 2),
    ((2, 4), P("fsdp", "tp"), 4),
  ],
)
def test_distributed_collectives(mesh_shape, spec, gathers):
  """FSDP/TP layouts: all-to-alls, no all-reduce, as few gathers as needed."""
  mesh = _mesh(mesh_shape)
  params = {
    "a": jnp.ones((3, 32, 32)),
    "b": jnp.ones((32, 32)),
    "c": jnp.ones((32, 64)),
  }
  dims = {"a": MDN(1, 2), "b": MDN(), "c": MDN()}
  shard = {
    k: NamedSharding(mesh, P(None, *spec) if k == "a" else spec) for k in params
  }
  counts = {}
  for name, distribute in (("naive", None), ("distributed", mesh)):
    opt = htmuon_jax.scale_by_spectral_power(
      0.125, method="svd", weight_dimension_numbers=dims, distribute=distribute
    )
    step = jax.jit(
      lambda g, opt=opt: opt.update(g, optax.EmptyState())[0],
      in_shardings=(shard,),
      out_shardings=shard,
    )
    counts[name] = testing.count_collectives(step.lower(params).compile())[
      "total"
    ]
  # Naive GSPMD gathers every matrix to every device.
  assert counts["naive"]["all-gather"] >= 3, counts
  # Two groups (32x32: 4 matrices, 32x64: 1), each one all-to-all in, one out.
  assert counts["distributed"]["all-to-all"] >= 4, counts
  assert counts["distributed"]["all-reduce"] == 0, counts
  assert counts["distributed"]["all-gather"] == gathers, counts


@pytest.mark.parametrize(
  "mesh_shape,spec", [((8, 1), P("fsdp", None)), ((2, 4), P("fsdp", "tp"))]
)
@pytest.mark.parametrize("method", ["svd", "polynomial"])
def test_gspmd_leaf_grouping(mesh_shape, spec, method):
  """GSPMD (`distribute=None`): "auto" on 8 devices runs each leaf alone;
  "shapes" (leaves of one shape sharing a sharding) needs no collective the
  per-leaf program does not; all modes give the unsharded numbers."""
  mesh = _mesh(mesh_shape)
  key = jax.random.key(3)
  names = ["a", "b", "c", "d"]
  shapes = [(3, 32, 32), (32, 32), (32, 64), (32, 64)]
  params = {
    n: jax.random.normal(k, s)
    for n, k, s in zip(names, jax.random.split(key, 4), shapes)
  }
  dims = {"a": MDN(1, 2), "b": MDN(), "c": MDN(), "d": MDN()}
  shard = {
    k: NamedSharding(mesh, P(None, *spec) if k == "a" else spec) for k in params
  }

  def make(mode):
    return htmuon_jax.scale_by_spectral_power(
      0.125,
      method=method,
      weight_dimension_numbers=dims,
      distribute=htmuon_jax.Execution(grouping=mode),
    )

  want = jax.jit(lambda g: make("off").update(g, optax.EmptyState())[0])(params)
  counts, got = {}, {}
  for mode in ("auto", "off", "shapes"):
    opt = make(mode)
    step = jax.jit(
      lambda g, opt=opt: opt.update(g, optax.EmptyState())[0],
      in_shardings=(shard,),
      out_shardings=shard,
    )
    compiled = step.lower(params).compile()
    counts[mode] = testing.count_collectives(compiled)["total"]
    got[mode] = compiled(params)
  assert counts["auto"] == counts["off"], counts
  for op, n in counts["shapes"].items():
    assert n <= counts["off"][op], (op, counts)
  tol = METHOD_RTOL.get(method, RTOL)
  for mode in got:
    chex.assert_trees_all_close(got[mode], want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
  "make", [("htmuon", {"method": "stream"}), ("htnormuon", {})]
)
def test_gspmd_leaf_grouping_stateful(make):
  """Stateful steps under GSPMD: equal-shape leaves sharing a sharding
  grouped ("shapes": the whole chain once per group, `shape_groups`) or
  each alone ("off") give the unsharded update and state, the state keeps
  its sharding, and grouping adds no collective."""
  name, kwargs = make
  mesh = _mesh((4, 2))
  shapes = {"a": (32, 48), "b": (32, 48), "c": (2, 32, 48)}
  specs = {
    "a": P("fsdp", "tp"),
    "b": P("fsdp", "tp"),
    "c": P(None, "fsdp", "tp"),
  }
  dims = {"a": MDN(), "b": MDN(), "c": MDN(1, 2)}
  keys = jax.random.split(jax.random.key(5), 9)
  trees = [
    {
      n: jax.random.normal(keys[3 * t + i], s)
      for i, (n, s) in enumerate(shapes.items())
    }
    for t in range(3)
  ]
  params, grads = trees[0], trees[1:]

  def make(mode):
    return getattr(htmuon_jax, name)(
      0.05,
      muon_weight_dimension_numbers=dims,
      distribute=htmuon_jax.Execution(grouping=mode),
      **kwargs,
    )

  opt = make("off")
  shard = {n: NamedSharding(mesh, s) for n, s in specs.items()}
  state_shard = sh.state_shardings(opt, jax.device_put(params, shard))
  p, st = params, opt.init(params)
  for g in grads:
    p, st = jax.jit(_step(opt))(p, st, g)
  counts = {}
  for mode in ("off", "shapes"):
    opt = make(mode)
    step = jax.jit(
      _step(opt),
      in_shardings=(shard, state_shard, shard),
      out_shardings=(shard, state_shard),
    )
    q = jax.device_put(params, shard)
    qs = jax.device_put(opt.init(params), state_shard)
    compiled = step.lower(q, qs, jax.device_put(grads[0], shard)).compile()
    counts[mode] = testing.count_collectives(compiled)["total"]
    for g in grads:
      q, qs = step(q, qs, jax.device_put(g, shard))
    _assert_close(q, p, f"{name} {mode}")
    _assert_close(qs, st, f"{name} {mode} state")
  # "shapes" runs the chain once per group under automatic axes too; each
  # group's updates and state leave laid out as they came in, so nothing
  # is moved to slice them back (measured, htnormuon: all-reduce 18 -> 10,
  # all-gather 12 -> 3, collective-permute 12 -> 3, no all-to-all).
  for op, n in counts["shapes"].items():
    assert n <= counts["off"][op], (op, counts)
  assert sum(counts["shapes"].values()) < sum(counts["off"].values()), counts


# Distributed method="stream": each matrix's basis travels with it through
# the all-to-alls, grouped by matrix shape and rank, and carries over steps.
# Three steps; with interval=2, interval_first=True the third is the second
# HT step (the first one's basis carried over a Muon step). The (2, 4) case
# uses Cholesky-QR, which the zero padding of the singleton groups exercises
# (a zero matrix and a zero basis).
STREAM_CASES = [
  ((8, 1), "scale_by_htmuon", {}),
  (
    (4, 2),
    "scale_by_htmuon",
    {"rank": 4, "interval": 2, "interval_first": True},
  ),
  ((2, 4), "htmuon", {"rank": 8, "qr": "cholesky"}),
]


def _make_stream(make: str, distribute=None, rank=None, qr="qr", **kwargs):
  method = htmuon_jax.methods.Stream(rank=rank, qr=qr)
  if make == "scale_by_htmuon":
    return htmuon_jax.scale_by_htmuon(
      0.125,
      method=method,
      weight_dimension_numbers=DIMS,
      distribute=distribute,
      **kwargs,
    )
  return _make(make, method=method, distribute=distribute, **kwargs)


def _check_step(params, state, state_shard, compiled, mesh, distributed=True):
  """Params keep their shardings, state stays split like its params, no
  loop holds a collective, and (distributed) whole matrices move by
  all-to-all."""
  for k, s in _shardings(mesh).items():
    assert params[k].sharding.is_equivalent_to(s, params[k].ndim), k
  del state_shard
  _assert_state_split(state, params)
  counts = testing.count_collectives(compiled)
  assert not any(counts["in_loop"].values()), counts
  if distributed:
    assert counts["total"]["all-to-all"] > 0, counts


@pytest.mark.parametrize("mesh_shape,make,kwargs", STREAM_CASES)
def test_stream_distributed_equals_unsharded(mesh_shape, make, kwargs):
  mesh = _mesh(mesh_shape)
  expected, expected_state = _run_unsharded(
    _make_stream(make, **kwargs), steps=3
  )
  params, state, state_shard, compiled = _run_sharded(
    _make_stream(make, distribute=mesh, **kwargs), mesh, steps=3
  )
  label = f"stream {make} {kwargs} {mesh_shape}"
  _assert_close(params, expected, label)
  _assert_close(state, expected_state, label + " state")
  _check_step(params, state, state_shard, compiled, mesh)


def test_stream_distributed_explicit_axes_injected_power():
  """jax.make_mesh's explicit axes, axis names of the context mesh, and a
  traced (injected) power entering the shard_map as an argument."""
  mesh = _mesh((4, 2), explicit=True)
  make = lambda **kw: optax.inject_hyperparams(htmuon_jax.htmuon)(
    0.05, power=0.25, method="stream", muon_weight_dimension_numbers=DIMS, **kw
  )
  expected, expected_state = _run_unsharded(make())
  with jax.set_mesh(mesh):
    params, state, state_shard, compiled = _run_sharded(
      make(distribute="fsdp"), mesh
    )
  _assert_close(params, expected, "stream explicit")
  _assert_close(state, expected_state, "stream explicit state")
  _check_step(params, state, state_shard, compiled, mesh)


def _max_rel_diff(actual, expected) -> float:
  return max(
    float(
      np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
      / max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30)
    )
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected))
  )


def _one_ulp_apart(tree, seed: int):
  """Each entry moved by one fp32 ulp up or down, at random."""
  rng = np.random.default_rng(seed)
  up, down = np.float32(np.inf), np.float32(-np.inf)
  return jax.tree.map(
    lambda g: jnp.asarray(
      np.nextafter(np.asarray(g), np.where(rng.random(g.shape) < 0.5, up, down))
    ),
    tree,
  )


# One configuration: plain GSPMD partitions the same program whatever the
# stream options (which the distributed cases above cover on every mesh);
# each case costs ~10-20 s.
@pytest.mark.parametrize("mesh_shape,make,kwargs", STREAM_CASES[:1])
def test_stream_naive_sharding_is_within_round_off(mesh_shape, make, kwargs):
  """Plain GSPMD (no `distribute`) on method="stream".

  The streaming basis tracks every singular direction, including those with
  tiny gaps, so reordered sums (sharded matmuls) move it by more than the
  fixed 1e-5: at full rank the unsharded run itself moves by ~1e-5 (params)
  and ~1e-4 (basis) when its gradients move by one ulp. "Equal to round-off"
  is checked against exactly that: the sharded run may differ from the
  unsharded one by at most 4x the largest change that 1-ulp perturbations of
  the gradients cause (measured here, 2 draws), or RTOL/10 if that is lower.
  """
  opt = _make_stream(make, **kwargs)
  expected, expected_state = _run_unsharded(opt, steps=3)
  global GRADS
  grads = GRADS
  try:
    sens_params, sens_state = 0.0, 0.0
    for seed in range(2):
      GRADS = [_one_ulp_apart(g, seed) for g in grads]
      p, st = _run_unsharded(opt, steps=3)
      sens_params = max(sens_params, _max_rel_diff(p, expected))
      sens_state = max(sens_state, _max_rel_diff(st, expected_state))
  finally:
    GRADS = grads
  assert sens_params > 0  # The perturbation reached the step.
  params, state, _, compiled = _run_sharded(opt, _mesh(mesh_shape), steps=3)
  assert _max_rel_diff(params, expected) <= max(4 * sens_params, RTOL / 10)
  assert _max_rel_diff(state, expected_state) <= max(4 * sens_state, RTOL / 10)
  assert not any(testing.count_collectives(compiled)["in_loop"].values())


def test_rmnp_shards_without_gather():
  """RMNP has no iteration: GSPMD keeps the FSDP layout (8-way sharded
  fan_in) and all-reduces the partial norms, with no gather and no
  all-to-all, so it needs no distributed step."""
  mesh = _mesh((8, 1))
  expected, _ = _expected("rmnp")
  params, _, _, compiled = _run_sharded(_make("rmnp"), mesh)
  _assert_close(params, expected, "rmnp (8, 1)")
  counts = testing.count_collectives(compiled)
  assert counts["total"]["all-gather"] == 0, counts
  assert counts["total"]["all-to-all"] == 0, counts
  assert counts["total"]["all-reduce"] > 0, counts
  assert not any(counts["in_loop"].values()), counts


# (layout, axes) -> bound on 16 layers' program lines over 4 layers' with
# grouping="shapes" (measured: FSDP 1.15x, 1.27x, 1.08x; Megatron 1.32x,
# 1.27x, 1.27x; per leaf 3.8x). Where the shardings are known (explicit
# axes, or stated in `Execution.shardings`) FSDP leaves join along their
# whole axis (a slice per leaf and output); Megatron ones, split on both
# axes, and all leaves under automatic axes without a statement join on a
# new axis (a broadcast per leaf and input, a slice and a reshape out).
DEPTH_BOUND = {
  ("fsdp", "explicit"): 1.2,
  ("fsdp", "auto"): 1.3,
  ("fsdp", "stated"): 1.12,
  ("megatron", "explicit"): 1.35,
  ("megatron", "auto"): 1.3,
  ("megatron", "stated"): 1.3,
}


@pytest.mark.parametrize("layout, axes", list(DEPTH_BOUND))
def test_grouped_program_is_depth_free(layout, axes):
  """Equal leaves of one sharding share one traced chain and step on 8
  devices: with explicit axes (shardings in the types), or automatic axes
  and grouping="shapes" (the user's statement), with the shardings stated
  in `Execution.shardings` or not. 16 layers' program stays within
  DEPTH_BOUND of 4 layers', with no collective the per-leaf program lacks,
  the per-leaf numbers and the parameters' shardings."""
  mesh = _mesh((4, 2), explicit=axes == "explicit")
  matrix, vector = {
    "fsdp": (P("fsdp", None), P()),
    "megatron": (P("fsdp", "tp"), P("tp")),
  }[layout]
  place = lambda x: NamedSharding(mesh, matrix if x.ndim == 2 else vector)

  def tree(layers, seed):
    t = jax.tree.map(jnp.asarray, helpers.layered_tree(layers, seed))
    return jax.tree.map(lambda x: jax.device_put(x, place(x)), t)

  def lowered(layers, mode):
    params = tree(layers, 0)
    stated = jax.tree.map(place, params) if axes == "stated" else None
    opt = htmuon_jax.htmuon(
      0.02,
      method="polynomial",
      weight_decay=0.1,
      distribute=htmuon_jax.Execution(grouping=mode, shardings=stated),
    )
    state = opt.init(params)
    step = jax.jit(opt.update)
    return step.lower(tree(layers, 1), state, params), step, state, params

  lines = {
    n: len(lowered(n, "shapes")[0].as_text().splitlines()) for n in (4, 16)
  }
  assert lines[16] <= DEPTH_BOUND[layout, axes] * lines[4], lines
  counts, got = {}, {}
  for mode in ("off", "shapes"):
    low, step, state, params = lowered(4, mode)
    counts[mode] = testing.count_collectives(low.compile())["total"]
    got[mode] = step(tree(4, 1), state, params)
  for op, n in counts["shapes"].items():
    assert n <= counts["off"][op], (op, counts)
  chex.assert_trees_all_close(got["shapes"], got["off"], rtol=2e-5, atol=2e-6)
  # Updates and state keep the parameters' shardings.
  for x, y in zip(jax.tree.leaves(got["shapes"]), jax.tree.leaves(got["off"])):
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim)


def test_distribute_with_stated_shardings_adds_no_collective():
  """Automatic axes, `distribute=` and stated shardings: the chain stays
  per leaf (grouped, GSPMD moved its stacks toward the all-to-all early:
  +336 collective-permutes on a 768 transformer), so the step has no
  collective the per-leaf one lacks, and its numbers."""
  mesh = _mesh((8, 1))
  place = lambda x: NamedSharding(mesh, P("fsdp") if x.ndim == 2 else P())
  params = jax.tree.map(jnp.asarray, helpers.layered_tree(2, 0))
  params = jax.tree.map(lambda x: jax.device_put(x, place(x)), params)
  grads = jax.tree.map(lambda x: x * 0.5 + 0.1, params)
  counts, got = {}, {}
  for mode in ("off", "shapes"):
    execution = htmuon_jax.Execution(
      distribute=mesh,
      grouping=mode,
      shardings=jax.tree.map(place, params),
    )
    opt = htmuon_jax.htmuon(0.02, method="polynomial", distribute=execution)
    step = jax.jit(opt.update)
    state = opt.init(params)
    counts[mode] = testing.count_collectives(
      step.lower(grads, state, params).compile()
    )["total"]
    got[mode] = step(grads, state, params)
  assert counts["shapes"] == counts["off"], counts
  chex.assert_trees_all_close(got["shapes"], got["off"], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize(
  "name, kwargs", [("htmuon", {"method": "stream"}), ("htnormuon", {})]
)
def test_distributed_state_not_rematerialized(explicit, name, kwargs, capfd):
  """`distribute=` on a two-axis mesh with per-matrix state (stream bases,
  NorMuon moments) of column-, row- and FSDP-only-split matrices: XLA
  reports no "Involuntary full rematerialization" (replicating the state
  and splitting it again), and the step gives the unsharded numbers."""
  mesh = _mesh((4, 2), explicit=explicit)
  specs = {"a": P("fsdp", "tp"), "b": P("tp", "fsdp"), "c": P("fsdp", None)}
  keys = jax.random.split(jax.random.key(3), 6)
  params = {
    n: jax.random.normal(keys[i], (32, 48)) for i, n in enumerate(specs)
  }
  grads = {
    n: jax.random.normal(keys[3 + i], (32, 48)) for i, n in enumerate(specs)
  }
  opt = getattr(htmuon_jax, name)(0.05, distribute=mesh, **kwargs)
  want = _step(opt)(params, opt.init(params), grads)
  shard = {n: NamedSharding(mesh, s) for n, s in specs.items()}
  placed = jax.device_put(params, shard)
  state_shard = sh.state_shardings(opt, placed)
  step = jax.jit(
    _step(opt),
    in_shardings=(shard, state_shard, shard),
    out_shardings=(shard, state_shard),
  )
  capfd.readouterr()
  compiled = step.lower(
    placed, jax.device_put(opt.init(params), state_shard), placed
  ).compile()
  log = capfd.readouterr().err
  assert "Involuntary full rematerialization" not in log, log[-2000:]
  got = compiled(
    placed,
    jax.device_put(opt.init(params), state_shard),
    jax.device_put(grads, shard),
  )
  _assert_close(got, want, f"{name} explicit={explicit}")
