"""Device mesh, logical-axis rules, and shardings for params, optimizer state and batches.

Params carry logical axis names (`nn.with_logical_partitioning`); `RULES` maps each
name to the mesh axes `data`, `fsdp`, `tensor`, `expert`. One jitted program then runs
data parallel, FSDP (ZeRO-3: params, grads and optimizer state sharded over `fsdp`),
tensor parallel, expert parallel, or any mix, chosen only by the mesh shape in the
config. GSPMD places everything from the params, the batch and the activations' logical
constraints (`with_activation_rules`), except the MoE token exchange, which is an
explicit all-to-all (`llm.layers.moe.to_experts`). Multi-process jobs join through
`init_distributed`; each process feeds only its own rows of the batch (`shard_batch`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm.config import ConfigError, ParallelConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# Rows of the batch are split over every axis that does not split the model's width:
# outside the MoE layers the expert axis is one more data axis (as in GShard).
BATCH_AXES = ("data", "fsdp", "expert")

# Logical name -> mesh axes. Params shard their `embed` dim over fsdp (ZeRO-3), their
# head / mlp / vocab dims over tensor and their `expert` dim over expert; activations
# (act_*) shard the batch over data x fsdp x expert, and inside a MoE layer the
# dispatched (row, expert, slot) tensors put the experts on the expert axis instead
# (they get there by the all-to-all of `llm.layers.moe.to_experts`).
RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("layers", None),
    ("head_dim", None),
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert_batch", ("data", "fsdp")),
    ("act_expert", "expert"),
)


def mesh_shape(pcfg: ParallelConfig, num_devices: int) -> tuple[int, ...]:
  """Axis sizes in MESH_AXES order; the one axis set to -1 takes the devices left over."""
  sizes = {axis: getattr(pcfg, axis) for axis in MESH_AXES}
  # Messages name the expert axis only when it is used, so dense meshes read as before.
  shown = [a for a in MESH_AXES if a != "expert" or sizes[a] != 1]
  named = " ".join(f"{a}={sizes[a]}" for a in shown)
  if list(sizes.values()).count(-1) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"config.parallel {named}: each size must be >= 1, and at most one -1")
  rest = next((a for a in MESH_AXES if sizes[a] == -1), None)
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if rest is not None:
    sizes[rest] = num_devices // fixed
  total = int(np.prod(list(sizes.values())))
  if sizes.get(rest, 1) < 1 or total != num_devices:
    others = " x ".join(a for a in shown if a != rest)
    need = (f"{' x '.join(shown)} = {total} devices" if rest is None else
            f"a multiple of {others} = {fixed} devices ({rest}=-1 takes the rest)")
    raise ConfigError(
        f"config.parallel {named} needs {need}, but {num_devices} "
        f"{'is' if num_devices == 1 else 'are'} present; change them to fit, or on one CPU "
        "machine simulate the devices with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={max(total, fixed)}")
  return tuple(sizes.values())


def make_mesh(pcfg: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all, on every process) with Auto axes (GSPMD
  propagates shardings from the params, batch and logical constraints)."""
  devices = list(devices if devices is not None else jax.devices())
  device_grid = np.asarray(devices).reshape(mesh_shape(pcfg, len(devices)))
  auto = jax.sharding.AxisType.Auto
  return Mesh(device_grid, MESH_AXES, axis_types=(auto,) * len(MESH_AXES))


def abstract_mesh(sizes: dict) -> jax.sharding.AbstractMesh:
  """A mesh of these axis sizes without devices (for planning and AOT compiles)."""
  return jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def check_rules(mesh, rules=RULES) -> None:
  """A rule that names a mesh axis the mesh lacks would silently leave arrays unsharded."""
  for name, axes in rules:
    for axis in (axes,) if isinstance(axes, str) else tuple(axes or ()):
      if axis not in mesh.shape:
        raise ValueError(f"logical axis rule {name!r} -> {axis!r}: the mesh has no axis "
                         f"{axis!r} (it has {', '.join(mesh.shape)}); fix the rule or the mesh")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=RULES) -> P:
  """PartitionSpec for an array with logical `names`.

  A mesh axis is dropped where it does not divide the dimension, or is already used by
  an earlier dimension, so any config runs on any mesh (unsharded rather than failing).
  A logical name without a rule, or a rule naming an axis the mesh lacks, is an error.
  """
  check_rules(mesh, rules)
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in llm.parallel.RULES; add one "
                       "(None for unsharded)")
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for axis in axes:
      if axis not in used and dim % (mesh.shape[axis] * _prod(mesh, kept)) == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*spec)


def with_activation_rules(fn, mesh: Mesh, rules=RULES):
  """`fn` traced with the mesh and logical rules in context, so the models' logical
  constraints on activations (`nn.with_logical_constraint`) take effect; outside such a
  context (e.g. decoding on one device) they are no-ops. Wrap a function before jit."""
  check_rules(mesh, rules)

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return traced


def _prod(mesh: Mesh, axes) -> int:
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def tree_shardings(abstract_tree, mesh: Mesh):
  """NamedShardings for a (boxed, abstract) pytree: by logical names, else replicated.

  The result has the structure of the unboxed tree (each `nn.Partitioned` becomes a leaf).
  """
  def one(x):
    if isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map(one, abstract_tree,
                                is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Places this process's slice of the global batch; rows are split over data x fsdp."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_batch_divisible(batch_size: int, mesh: Mesh, microbatches: int = 1):
  shards = _prod(mesh, BATCH_AXES)
  if (batch_size // microbatches) % shards:
    raise ConfigError(
        f"config.data.batch_size={batch_size} (/ microbatches={microbatches}) is not divisible"
        f" by the {shards} data x fsdp x expert shards of the mesh; pick a multiple of "
        f"{shards * microbatches}")


def check_fits_mesh(cfg, mesh: Mesh) -> None:
  """The config's sizes split over the mesh as the rules ask, checked before compiling:
  the batch over data x fsdp x expert, the heads over tensor, the experts over expert."""
  check_batch_divisible(cfg.data.batch_size, mesh, cfg.train.microbatches)
  m, tensor, expert = cfg.model, mesh.shape["tensor"], mesh.shape["expert"]
  if m.num_heads % tensor:
    raise ConfigError(f"config.model.num_heads={m.num_heads} is not divisible by the tensor "
                      f"axis (config.parallel.tensor={tensor}); pick a tensor size that "
                      "divides the head count")
  if m.moe.num_experts and expert > m.moe.num_experts:
    raise ConfigError(f"config.parallel.expert={expert} is more expert shards than the "
                      f"{m.moe.num_experts} experts (config.model.moe.num_experts); use at "
                      f"most {m.moe.num_experts}")
  if m.moe.num_experts and m.moe.num_experts % expert:
    raise ConfigError(f"config.model.moe.num_experts={m.moe.num_experts} is not divisible by "
                      f"config.parallel.expert={expert}; pick an expert size that divides it")


DISTRIBUTED_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
                   "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
# Launchers jax.distributed finds the coordinator under by itself, by their process count.
_LAUNCHERS = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI",
              "TPU_WORKER_ID": "a TPU pod slice"}


def distributed_args(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, env=None) -> dict | None:
  """The arguments of `jax.distributed.initialize` from flags, else the JAX_* environment
  variables; {} to let jax detect a SLURM / Open MPI / TPU launch; None for one process.

  Raises ConfigError, before anything starts, for a launch that cannot be consistent: a
  flag contradicting its environment variable, an address without a process count and id
  (outside a known launcher), an id outside [0, num_processes), or a process count
  different from the launcher's.
  """
  env = os.environ if env is None else env
  flags = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  args = {}
  for key, flag in flags.items():
    value = env.get(DISTRIBUTED_ENV[key]) or None
    if value is not None and key != "coordinator_address":
      if not value.lstrip("-").isdigit():
        raise ConfigError(f"{DISTRIBUTED_ENV[key]}={value!r}: expected an integer")
      value = int(value)
    if flag is not None and value is not None and flag != value:
      raise ConfigError(f"--{key}={flag} but {DISTRIBUTED_ENV[key]}={value}: the launch is "
                        "inconsistent; drop one of them")
    args[key] = flag if flag is not None else value
  launcher = next((name for var, name in _LAUNCHERS.items() if var in env), None)
  launched = {"SLURM_NTASKS": env.get("SLURM_NTASKS"),
              "OMPI_COMM_WORLD_SIZE": env.get("OMPI_COMM_WORLD_SIZE")}
  given = {k: v for k, v in args.items() if v is not None}
  if not given:
    return {} if launcher else None
  n, i = args["num_processes"], args["process_id"]
  for var, count in launched.items():
    if n is not None and count is not None and count.isdigit() and int(count) != n:
      raise ConfigError(f"--num_processes={n} but {_LAUNCHERS[var]} started {count} "
                        f"processes ({var}); make them agree")
  if not launcher and (n is None or i is None or args["coordinator_address"] is None):
    missing = [f"--{k} ({DISTRIBUTED_ENV[k]})" for k, v in args.items() if v is None]
    raise ConfigError(f"a multi-process launch needs {', '.join(missing)} as well; set all "
                      "three on every process, or launch under SLURM / Open MPI / a TPU pod")
  if n is not None and n < 1:
    raise ConfigError(f"--num_processes={n}: must be >= 1")
  if n is not None and i is not None and not 0 <= i < n:
    raise ConfigError(f"--process_id={i} is not in [0, num_processes={n}); the ids of the "
                      f"{n} processes are 0 .. {n - 1}")
  return given


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, heartbeat_timeout_s: int = 30) -> bool:
  """Joins a multi-process job (TPU pod slice, GPU cluster, several CPU processes) when
  the flags or the environment describe one (`distributed_args`); returns whether it did.

  If a process dies, the coordination service notices within `heartbeat_timeout_s` and
  every other process exits with an error instead of waiting forever in a collective.
  Call before any other jax work. CPU processes exchange collectives through gloo.
  """
  args = distributed_args(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args, heartbeat_timeout_seconds=heartbeat_timeout_s)
  if args.get("num_processes") and jax.process_count() != args["num_processes"]:
    raise ConfigError(f"--num_processes={args['num_processes']} but the job has "
                      f"{jax.process_count()} processes; make them agree")
  return True
