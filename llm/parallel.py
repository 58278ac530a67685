"""Device mesh, logical-axis rules, and shardings for params, optimizer state and batches.

Params carry logical axis names (`nn.with_logical_partitioning`); `RULES` maps each
name to mesh axes. One jitted program then runs data parallel, FSDP (ZeRO-3: params,
grads and optimizer state sharded over `fsdp`), tensor parallel, or any mix, chosen
only by the mesh shape in the config.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm.config import ConfigError, ParallelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Params shard their `embed` dim over fsdp (ZeRO-3) and their
# head / mlp / vocab dims over tensor; activations (act_*) shard the batch over data x fsdp.
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
)


def mesh_shape(pcfg: ParallelConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves data=-1 to the devices left over; checks the product."""
  fixed = pcfg.fsdp * pcfg.tensor
  data = pcfg.data if pcfg.data > 0 else num_devices // fixed
  if data < 1 or data * fixed != num_devices:
    need = (f"data x fsdp x tensor = {data * fixed} devices" if pcfg.data > 0 else
            f"a multiple of fsdp x tensor = {fixed} devices (data=-1 takes the rest)")
    raise ConfigError(
        f"config.parallel data={pcfg.data} fsdp={pcfg.fsdp} tensor={pcfg.tensor} needs "
        f"{need}, but {num_devices} {'is' if num_devices == 1 else 'are'} present; change them to "
        "fit, or on one CPU machine simulate the devices with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={max(data, 1) * fixed}")
  return data, pcfg.fsdp, pcfg.tensor


def make_mesh(pcfg: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(pcfg, len(devices))
  device_grid = np.asarray(devices).reshape(shape)
  auto = getattr(jax.sharding, "AxisType", None)
  if auto is not None:  # newer jax defaults to Explicit axes; we want Auto (GSPMD)
    return Mesh(device_grid, MESH_AXES, axis_types=(auto.Auto,) * len(MESH_AXES))
  return Mesh(device_grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
  """PartitionSpec for an array with logical `names`.

  A mesh axis is dropped where it does not divide the dimension, or is already used by
  an earlier dimension, so any config runs on any mesh (unsharded rather than failing).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for axis in axes:
      size = mesh.shape.get(axis, 1)
      if axis in mesh.shape and axis not in used and dim % (size * _prod(mesh, kept)) == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*spec)


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
        f" by the {shards} data x fsdp shards of the mesh; pick a multiple of {shards}")


def init_distributed():
  """Joins a multi-host job (TPU pod, GPU cluster) when the environment describes one.

  On TPU and under SLURM / Open MPI, `jax.distributed.initialize()` finds the
  coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. Single-process runs skip it.
  """
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
  elif any(k in env for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_ID")):
    jax.distributed.initialize()
