"""Will it fit? Full-size train steps compiled ahead of time on a virtual mesh, XLA's memory
analysis next to the planner's estimate (`llm.scaling.train_memory`).

  python benchmarks/will_it_fit.py                       # all four, fsdp=8, bf16, remat full
  python benchmarks/will_it_fit.py --only llama2_7b --mesh 1,4,2,1 --remat none

Nothing is allocated: the train state and batch are `jax.ShapeDtypeStruct`s carrying the
shardings the training loop would give them, on 8 simulated CPU devices; the real
`train_step` (AdamW, clipping, donation) is lowered and compiled for them. The compile
uses XLA:CPU's lowest backend optimisation level, which changes code generation, not
the buffer assignment the memory analysis reports. XLA:CPU schedules and fuses
differently from XLA:TPU / XLA:GPU, so read the figures as this program's footprint
under one compiler, not a promise for another backend.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

from common import json_stdout, log, setup_logging  # noqa: E402

import jax  # noqa: E402

from llm import config as config_lib, objectives, parallel, scaling  # noqa: E402
from llm.train import loop  # noqa: E402

# name: (configs module, size, model overrides, sequence length)
SHAPES = {
    "gpt2_xl": ("gpt", "gpt2", dict(d_model=1600, num_layers=48, num_heads=25, num_kv_heads=0,
                                  d_ff=6400),
                1024),
    "llama2_7b": ("gpt", "llama", dict(d_model=4096, num_layers=32, num_heads=32,
                                       num_kv_heads=32, d_ff=11008, vocab_size=32000,
                                       max_len=4096, norm_eps=1e-5), 4096),
    "t5_v1_1_xl": ("t5", "small", dict(d_model=2048, num_layers=24, num_decoder_layers=24,
                                       num_heads=32, head_dim=64, d_ff=5120,
                                       vocab_size=32128, activation="geglu",
                                       tie_embeddings=False), 512),
    "mixtral_8x7b": ("moe", "mixtral", {}, 4096),
}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def full_size_config(name: str, remat: str, batch: int, mesh_shape) -> config_lib.Config:
  import importlib
  module, size, model, seq_len = SHAPES[name]
  cd = importlib.import_module(f"configs.{module}").get_config(size)
  cd.model.update(dict(model, dtype="bfloat16", param_dtype="float32", remat=remat))
  cd.data.update(dict(seq_len=seq_len, batch_size=batch))
  cd.parallel.update(dict(zip(("data", "fsdp", "tensor", "expert"), mesh_shape)))
  return config_lib.from_configdict(cd)


def compiled_memory(cfg: config_lib.Config) -> tuple[dict, float]:
  """XLA's memory analysis of the AOT-compiled train step, per device, in bytes."""
  mesh = parallel.make_mesh(cfg.parallel)
  parallel.check_fits_mesh(cfg, mesh)
  make = loop.state_factory(cfg)
  shardings = loop.state_shardings(make, mesh)
  state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 jax.eval_shape(make), shardings)
  example = objectives.get(cfg.data.objective).example_batch(cfg, cfg.data.batch_size)
  batch_sh = parallel.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
           for k, v in example.items()}
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  start = time.perf_counter()
  stats = train_fn.lower(state, batch).compile(FAST_COMPILE).memory_analysis()
  seconds = time.perf_counter() - start
  out = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
         "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out, seconds


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="", help="comma-separated names: " + ", ".join(SHAPES))
  p.add_argument("--mesh", default="1,8,1,1", help="data,fsdp,tensor,expert (8 devices)")
  p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
  p.add_argument("--batch", type=int, default=8, help="global batch in rows")
  args = p.parse_args()
  setup_logging()
  mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  names = args.only.split(",") if args.only else list(SHAPES)
  with json_stdout() as result:
    result.update(mesh=dict(zip(("data", "fsdp", "tensor", "expert"), mesh_shape)),
                  remat=args.remat, batch=args.batch, dtype="bfloat16 compute, float32 params",
                  jax=jax.__version__, models={})
    for name in names:
      cfg = full_size_config(name, args.remat, args.batch, mesh_shape)
      log.info("compiling %s (%s params)", name, f"{scaling.exact_param_count(cfg.model):,}")
      compiler, seconds = compiled_memory(cfg)
      planner = scaling.train_memory(cfg, config_lib.ParallelConfig(*mesh_shape))
      state = planner["params"] + planner["optimizer"]
      result["models"][name] = {
          "params": scaling.exact_param_count(cfg.model), "seq_len": cfg.data.seq_len,
          "compile_s": round(seconds, 1),
          "compiler_gb": {k: round(v / 1e9, 3) for k, v in compiler.items()},
          "planner_gb": {k: round(v / 1e9, 3) for k, v in planner.items()},
          # the state (params + AdamW moments) is the arguments; the rest is temporaries
          "state_ratio": round(state / compiler["arguments"], 3),
          "temporaries_ratio": round((planner["total"] - state) / compiler["temporaries"], 3),
          "peak_ratio": round(planner["total"] / compiler["peak"], 3)}
      log.info("%s: %s", name, result["models"][name])


if __name__ == "__main__":
  sys.exit(main())
