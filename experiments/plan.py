"""What a config costs on a number of chips: memory per device, fit, time, Chinchilla.

  python -m experiments.plan --config configs/gpt.py:gpt2 --chips 256 --chip v5p
  python -m experiments.plan --config configs/moe.py:mixtral --chips 64 --chip h100 \
      --tokens 1e12 --batch 1024 --mfu 0.35

Nothing is allocated or compiled: parameter counts and memory come from `llm.scaling`
(params sharded by `llm.parallel`'s rules on an abstract mesh; activations estimated).
`benchmarks/will_it_fit.py` checks those estimates against XLA's memory analysis.
"""

import math

from absl import flags

from experiments import cli
from llm import config as config_lib
from llm import scaling
from llm.config import ParallelConfig

_CONFIG = cli.ConfigFlag("configs/gpt.py:gpt2")
_CHIPS = flags.DEFINE_integer("chips", 8, "Number of chips.")
_CHIP = flags.DEFINE_string("chip", "v5p", f"One of {', '.join(scaling.CHIPS)}.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation.")
_TOKENS = flags.DEFINE_float("tokens", 0, "Training tokens; 0 = Chinchilla (20 x params).")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch in rows; 0 = the config's, rounded "
                              "up to a multiple of --chips.")


def shardings(cfg, chips: int, per_host: int) -> dict:
  """The layouts worth comparing: data parallel, FSDP, FSDP x tensor within a host, and
  for MoE FSDP x expert."""
  tensor = max(t for t in range(1, min(per_host, chips) + 1)
               if chips % t == 0 and cfg.model.num_heads % t == 0)
  out = {"data": ParallelConfig(data=chips), "fsdp": ParallelConfig(data=1, fsdp=chips),
         f"fsdp x tensor {tensor}": ParallelConfig(data=1, fsdp=chips // tensor, tensor=tensor)}
  if cfg.model.moe.num_experts:
    expert = math.gcd(cfg.model.moe.num_experts, chips)
    out[f"fsdp x expert {expert}"] = ParallelConfig(data=1, fsdp=chips // expert, expert=expert)
  return out


def _gb(x: float) -> str:
  return f"{x / 1e9:8.3g}"


@cli.one_line_errors
def main(argv):
  del argv
  cfg = config_lib.from_configdict(_CONFIG.value)
  hw, chips, m = scaling.chip(_CHIP.value), _CHIPS.value, cfg.model
  if chips < 1:
    raise ValueError(f"--chips={chips}: must be >= 1")
  batch = _BATCH.value or -(-cfg.data.batch_size // chips) * chips
  seq = cfg.data.seq_len
  params = scaling.exact_param_count(m)
  optimal = scaling.optimal_tokens(params)
  tokens = _TOKENS.value or optimal["rule"]
  per_token = scaling.train_flops_per_token(m, seq)
  step = scaling.step_seconds(per_token, batch * seq, chips, hw, _MFU.value)
  print(f"{m.family} model: {params:,} parameters"
        + (f" ({scaling.param_count(m, active=True):,} weights active per token)"
           if m.moe.num_experts else "")
        + f"; {per_token / 1e9:.2f} GFLOPs per training token (seq {seq})")
  print(f"{chips} x {_CHIP.value} ({hw.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{hw.memory / 1e9:.0f} GB each); params {m.param_dtype}, compute {m.dtype}")
  print(f"Chinchilla-optimal tokens for this size: {optimal['rule']:.3g} (20 x params), "
        f"{optimal['fit']:.3g} (Hoffmann fit)")
  print(f"\nTraining memory per device, GB (global batch {batch} x {seq}, "
        f"{cfg.train.microbatches} micro-batches; AdamW state in {m.param_dtype}):")
  print(f"{'sharding':22s} {'params':>8s} {'grads':>8s} {'adam':>8s} {'act':>8s} "
        f"{'act remat':>9s} {'total':>8s} {'w/ remat':>8s}  fits (none / full remat)")
  for name, pcfg in shardings(cfg, chips, hw.per_host).items():
    rows = pcfg.data * pcfg.fsdp * pcfg.expert
    if batch % (rows * cfg.train.microbatches):
      print(f"{name:22s} batch {batch} is not divisible by {rows} batch shards")
      continue
    none = scaling.train_memory(cfg, pcfg, batch, remat="none")
    full = scaling.train_memory(cfg, pcfg, batch, remat="full")
    fits = " / ".join("yes" if mem["total"] <= hw.memory else "no" for mem in (none, full))
    print(f"{name:22s} {_gb(none['params'])} {_gb(none['gradients'])} "
          f"{_gb(none['optimizer'])} {_gb(none['activations'])} "
          f"{_gb(full['activations']):>9s} {_gb(none['total'])} {_gb(full['total'])}  {fits}")
  serve = scaling.inference_memory(m, shardings(cfg, chips, hw.per_host)["fsdp"], batch, seq)
  print(f"\nServing in bf16 over fsdp={chips}: {_gb(serve['total']).strip()} GB per device "
        f"(KV cache {_gb(serve['kv_cache']).strip()} GB for {batch} rows of {seq})")
  days = scaling.train_days(per_token, tokens, chips, hw, _MFU.value)
  print(f"\nAt MFU {_MFU.value:.0%}: {step:.3g} s per step of {batch * seq:,} tokens; "
        f"{tokens:.3g} tokens take {days:.3g} days ({days * 24:.3g} hours) "
        f"({scaling.pf_days(per_token * tokens):.3g} PF-days).")
  best = scaling.chinchilla_optimal(per_token * tokens)
  print(f"That compute is best spent on {best['rule']['params']:.3g} params x "
        f"{best['rule']['tokens']:.3g} tokens (20x rule) or {best['fit']['params']:.3g} x "
        f"{best['fit']['tokens']:.3g} (Hoffmann fit, loss {best['fit']['loss']:.3f}).")


if __name__ == "__main__":
  cli.run(main, _CONFIG)
