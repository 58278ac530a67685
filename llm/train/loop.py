"""The training loop: data -> sharded train steps -> metrics, checkpoints, samples.

`run(cfg, workdir)` resumes from the latest checkpoint in `workdir` if there is one,
continuing with the very next batch, so an interrupted run and an uninterrupted one
produce the same losses.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
from jax.experimental.compilation_cache import compilation_cache

from llm import data as data_lib
from llm import models, objectives, parallel, peft, scaling
from llm.config import Config
from llm.inference import SamplingConfig, generate, untrained_ids
from llm.inference.workdir import continuation_text
from llm.train import checkpoint as ckpt
from llm.train import metrics as metrics_lib
from llm.train.metrics import MetricsWriter, measure_matmul_peak, plot_losses, to_plain
from llm.train.optimizer import make_optimizer, schedule
from llm.train import init_from, safety
from llm.train.state import init_params, init_state
from llm.train.step import eval_step, mean_metrics, train_step

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # a PEFT run's trainable params alone (llm.peft.save_adapter)


def create_state(cfg: Config, mesh, params=None):
  """A train state whose params / optimizer state are sharded on `mesh` by logical names.

  Init runs under jit with those output shardings, so no device ever holds the full
  unsharded model (what FSDP needs at scale). `params` (host arrays, e.g. pretrained
  weights overlaid on a fresh init) replace the random init. Returns (state, shardings).
  """
  make = state_factory(cfg)
  shardings = state_shardings(make, mesh)
  if params is None:
    return jax.jit(make, out_shardings=shardings)(), shardings
  return jax.jit(lambda p: make(params=p), out_shardings=shardings)(params), shardings


def state_factory(cfg: Config):
  """`init_state` for `cfg` as a function of (params=None, boxed=False). States made by
  one factory share their static fields, so they and their shardings are one pytree type."""
  objective = objectives.for_config(cfg)
  module = objective.build(cfg)
  return functools.partial(init_state, module, functools.partial(objective.loss, module),
                           make_optimizer(cfg.train), objective.example_batch(cfg, 1),
                           cfg.train.seed, objective.trainable(cfg), cfg.train.microbatches)


def state_shardings(make, mesh):
  """NamedShardings of the state `make` builds, on `mesh`, by logical names (traced only)."""
  return parallel.tree_shardings(jax.eval_shape(functools.partial(make, boxed=True)), mesh)


def _initial_params(cfg: Config, base_params) -> dict | None:
  """A fresh init of the (adapted) model with every base param from `base_params`, and
  what the objective adds (None: random init)."""
  objective = objectives.for_config(cfg)
  if base_params is None:
    return objective.initial_params(cfg, None)
  module = objective.build(cfg)
  example = objective.example_batch(cfg, 1)
  fresh = jax.device_get(jax.jit(lambda: init_params(module, example, cfg.train.seed))())
  params = init_from.overlay(fresh, base_params)
  if cfg.model.peft.method == "prompt":
    params = peft.prompt.init_from_vocab(params, cfg.model.peft, cfg.train.seed)
  if cfg.model.peft.method == "prefix":  # the prefix starts as the base's K/V of real tokens
    params = peft.prefix.init_from_base(module, params, cfg.train.seed)
  return objective.initial_params(cfg, params)


def compiled_steps(state_shardings, mesh):
  batch_sh = parallel.batch_sharding(mesh)
  train = jax.jit(parallel.with_activation_rules(train_step, mesh),
                  in_shardings=(state_shardings, batch_sh),
                  out_shardings=(state_shardings, None), donate_argnums=0)
  evaluate = jax.jit(parallel.with_activation_rules(eval_step, mesh),
                     in_shardings=(state_shardings, batch_sh))
  return train, evaluate


def evaluate_loss(eval_fn, state, batches, mesh) -> dict:
  totals: dict = {}
  for batch in batches:
    sums = jax.device_get(eval_fn(state, parallel.shard_batch(batch, mesh)))
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
  return {k: float(v) for k, v in mean_metrics(totals, "eval_").items()}


def run(cfg: Config, workdir: str, progress: bool = True) -> dict:
  """Trains to cfg.train.steps; returns the last train and eval metrics.

  Everything that can be checked (config against the workdir's, data, mesh, batch) is
  checked before the workdir is touched, so a failed start leaves it as it was. A run
  owns its workdir (`safety.WorkdirLock`); SIGTERM / SIGINT save and raise
  `safety.Preempted`; a non-finite step raises `safety.NonFiniteError` before any save.
  """
  ckpt.check_writable(workdir)
  use_compilation_cache(cfg.train.compilation_cache_dir)
  lock = safety.WorkdirLock(workdir)
  if os.path.isdir(workdir):
    lock.acquire()  # before any work: a second run on a live workdir fails at once
  try:
    base_params = None
    if cfg.train.init_from:
      base_cfg, base_params, tokenizer_file = init_from.pretrained(cfg.train.init_from,
                                                                   cfg.train.init_from_pickle)
      cfg = init_from.resolve(cfg, base_cfg, tokenizer_file)
    with safety.Preemption() as preemption:
      return _run(cfg, workdir, base_params, lock, preemption, progress)
  finally:
    lock.release()


def use_compilation_cache(path: str) -> None:
  """Saves compiled executables under `path` and loads them instead of compiling when
  the same computation comes again (a resumed run); "" leaves JAX's setting alone."""
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  # JAX decides once per process whether the cache is on, at the first compile.
  compilation_cache.reset_cache()


def _run(cfg, workdir, base_params, lock, preemption, progress):
  tcfg, dcfg = cfg.train, cfg.data
  mesh = parallel.make_mesh(cfg.parallel)  # before any data or compile: a bad mesh fails now
  parallel.check_fits_mesh(cfg, mesh)
  has_checkpoint = os.path.isdir(ckpt.checkpoint_dir(workdir)) and any(
      name.isdigit() for name in os.listdir(ckpt.checkpoint_dir(workdir)))
  ckpt.check_config(workdir, cfg, resuming=has_checkpoint)
  tokenizer_file = data_lib.tokenizer_source(dcfg, cfg.model.vocab_size, workdir)
  tokenizer = data_lib.Tokenizer.load(tokenizer_file)
  objective = objectives.for_config(cfg)
  train_rows = objective.rows(cfg, tokenizer, dcfg.train_split)
  eval_rows = objective.rows(cfg, tokenizer, dcfg.eval_split)
  make_batch = objective.batches(cfg, tokenizer)

  os.makedirs(workdir, exist_ok=True)  # every check passed: the run may write now
  lock.acquire()
  ckpt.write_config(workdir, cfg)
  data_lib.install_tokenizer(tokenizer_file, workdir)
  mgr = ckpt.manager(workdir, tcfg.keep_checkpoints)
  resuming = bool(mgr.all_steps())
  initial = None if resuming else _initial_params(cfg, base_params)
  state, shardings = create_state(cfg, mesh, initial)
  data_state = None
  if resuming:
    abstract = ckpt.abstract_with_shardings(state.checkpoint_items(),
                                            shardings.checkpoint_items())
    items, data_state, _ = ckpt.restore_latest(mgr, abstract, quarantine=workdir)
    state = state.replace_items(items)
  if int(state.step) >= tcfg.steps:
    mgr.close()
    log.info("already at step %d >= train.steps=%d; to train on, raise --config.train.steps "
             "and pass --config.train.allow_config_change=True (the schedule then changes)",
             int(state.step), tcfg.steps)
    return metrics_lib.latest(workdir)
  if resuming:
    log.info("resumed from step %d of %s", int(state.step), workdir)
  metrics_lib.keep_records_through(workdir, int(state.step))
  batches = data_lib.train_batches(train_rows, dcfg.batch_size, dcfg.shuffle_seed,
                                   state=data_state, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  eval_set = objective.eval_set(cfg, tokenizer, eval_rows)
  train_fn, eval_fn = compiled_steps(shardings, mesh)

  writer = MetricsWriter(workdir, tcfg.tensorboard)
  lr_at = schedule(tcfg)
  flops_per_token = scaling.train_flops_per_token(cfg.model, dcfg.seq_len)
  peak = tcfg.peak_flops or measure_matmul_peak()
  start_step, last = int(state.step), {}
  clock = {"start": time.perf_counter(), "steps": 0,
           "nonfinite": safety.nonfinite_steps(state.opt_state)}
  bar = _progress_bar(start_step, tcfg.steps, progress)
  try:
    for step in range(start_step + 1, tcfg.steps + 1):
      stop = preemption.requested(step - 1, mgr)
      if stop:
        _save(state, step - 1, batches, mgr, clock, cfg, force=True)
        ckpt.wait(mgr)
        raise safety.Preempted(step - 1, preemption.signame)
      state, last = _train_one(
          step, state, last, batches, make_batch, train_fn, eval_fn, eval_set, mesh, mgr,
          writer, lr_at, flops_per_token * dcfg.batch_size * dcfg.seq_len
          / (peak * jax.device_count()), cfg, clock)
      bar.update(1)
      if "train_loss" in last:
        bar.set_postfix(loss=f"{last['train_loss']:.3f}")
  finally:  # a failing run still completes its in-flight save: the last checkpoint is whole
    bar.close()
    writer.close()
    try:
      ckpt.wait(mgr)
    finally:
      mgr.close()
  plot_losses(workdir)
  if cfg.model.peft.method != "full" and jax.process_index() == 0:
    peft.save_adapter(os.path.join(workdir, ADAPTER_DIR), cfg.model,
                      jax.device_get(state.params), jax.device_get(state.frozen),
                      peft.trainable_pattern(cfg.model.peft, tcfg.trainable))
  return last


def _save(state, step, batches, mgr, clock, cfg, force=False):
  """Saves `state` as `step` unless a non-finite update was skipped since the last check
  (then it raises: the previous checkpoint stays the newest)."""
  clock["nonfinite"] = safety.check_finite(state.opt_state, step, clock["nonfinite"],
                                           cfg.train.skip_nonfinite)
  if step > 0 and step not in mgr.all_steps():
    ckpt.save(mgr, step, state.checkpoint_items(), batches.state, force=force)
    safety.fault_point("save", step)


def _train_one(step, state, last, batches, make_batch, train_fn, eval_fn, eval_set, mesh, mgr,
               writer, lr_at, flops_per_step_per_peak, cfg, clock):
  """One step, plus logging / eval / checkpointing when they fall due.

  Steps are dispatched asynchronously, so speed is measured over the window of steps
  since the last log (`clock`), ending when this step's metrics arrive on the host.
  """
  tcfg = cfg.train
  state, metrics = train_fn(state, parallel.shard_batch(make_batch(next(batches), step), mesh))
  clock["steps"] += 1
  safety.fault_point("step", step)
  if step % tcfg.log_every == 0 or step == tcfg.steps:
    metrics = {k: to_plain(v) for k, v in jax.device_get(metrics).items()}  # waits for it
    clock["nonfinite"] = safety.check_finite(state.opt_state, step, clock["nonfinite"],
                                             tcfg.skip_nonfinite)
    now = time.perf_counter()
    seconds = (now - clock["start"]) / clock["steps"]
    clock.update(start=now, steps=0)
    last = {"step": step, **metrics, "learning_rate": float(lr_at(step - 1)),
            "step_seconds": seconds,
            "tokens_per_s": cfg.data.batch_size * cfg.data.seq_len / seconds,
            "mfu": flops_per_step_per_peak / seconds, "nonfinite_steps": clock["nonfinite"],
            **batches.metrics}
    writer.write(last)
  if step % tcfg.eval_every == 0 or step == tcfg.steps:
    evals = evaluate_loss(eval_fn, state, eval_set, mesh)
    last = {**last, "step": step, **evals}
    writer.write({"step": step, **evals})
  if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
    _save(state, step, batches, mgr, clock, cfg)
  if clock["steps"] == 0 or step % tcfg.eval_every == 0 or step % tcfg.checkpoint_every == 0:
    clock.update(start=time.perf_counter(), steps=0)  # eval / save time is not step time
  return state, last


def _progress_bar(start: int, total: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(initial=start, total=total, disable=not enabled or jax.process_index() != 0,
              desc="train", dynamic_ncols=True)


def load(workdir: str):
  """(Config, params, Tokenizer) of the latest checkpoint in `workdir`, on one device.

  params is the model's whole tree (trainable and frozen): for an adapted model (LoRA,
  prompt, adapter) it runs on `llm.models.build(cfg.model)`, which applies the adaptation.
  What only training needed (a distillation's teacher) is left out.
  """
  cfg = ckpt.read_config(workdir)
  mesh = parallel.make_mesh(parallel.ParallelConfig(data=1), jax.devices()[:1])
  state, shardings = create_state(cfg, mesh)
  if not os.path.isdir(ckpt.checkpoint_dir(workdir)):
    raise ckpt.ConfigError(f"--workdir {workdir} has no checkpoint yet; train into it first")
  mgr = ckpt.manager(workdir, cfg.train.keep_checkpoints, async_save=False, create=False)
  if not mgr.all_steps():
    raise ckpt.ConfigError(f"--workdir {workdir} has no checkpoint yet; train into it first")
  abstract = ckpt.abstract_with_shardings(state.checkpoint_items(), shardings.checkpoint_items())
  items, _, _ = ckpt.restore_latest(mgr, abstract)
  mgr.close()
  tokenizer = data_lib.get_tokenizer(cfg.data, cfg.model.vocab_size, workdir)
  params = peft.merge(items["params"], items["frozen"])
  return cfg, objectives.get(cfg.data.objective).model_params(params), tokenizer


def sample_prompts(cfg: Config) -> list[str]:
  """The prompts of the end-of-training samples: train.sample_prompts ('|'-separated), else
  the first words of the first validation documents of the run's data; num_samples of them."""
  count = cfg.train.num_samples
  if cfg.train.sample_prompts:
    return [p for p in cfg.train.sample_prompts.split("|") if p][:count]
  if not count:
    return []
  documents = data_lib.load_documents(cfg.data, cfg.data.eval_split, max_chars=20_000)
  lines = (next((l for l in doc.splitlines() if len(l.split()) >= 3), "") for doc in documents)
  starts = [" ".join(line.split()[:3]) for line in lines]  # the first line of prose
  return [s for s in starts if s][:count]


def sample_texts(cfg: Config, params, tokenizer, prompts, sampling: SamplingConfig,
                 seed: int = 0) -> list[str]:
  if not prompts:
    return []
  module = models.build(cfg.model)
  if cfg.model.family == "decoder" and not sampling.suppress_ids:  # ids it never learned
    sampling = dataclasses.replace(sampling, suppress_ids=untrained_ids(tokenizer))
  virtual = peft.prompt.model_prefix(cfg.model)
  ids = [virtual + [tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  outs = generate(module, params, ids, sampling, jax.random.PRNGKey(seed))
  return [continuation_text(tokenizer, i[len(virtual):], o) for i, o in zip(ids, outs)]
