"""Task evaluation: k-shot prompts, then either batched greedy generation scored by the
task's metric (ROUGE, BLEU, exact match) or classification by comparing the
log-likelihood of each label's completion (accuracy). Decoders and encoder-decoders;
encoders score classification tasks by their classifier head (`head_accuracy`).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ConfigError
from llm.data.sft import generation_prompt, sft_rows
from llm.data.tasks import Task
from llm.data.templates import few_shot
from llm.eval import metrics
from llm.eval.likelihood import log_likelihood
from llm.inference import SamplingConfig, generate_sequences
from llm.models import apply_batch
from llm.peft.prompt import model_prefix, with_virtual_tokens

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]
_LENGTH_BUCKET = 16  # score rows padded to a multiple of this: few distinct shapes to compile


def _check_family(module):
  if module.cfg.family not in ("decoder", "encoder_decoder"):
    raise ConfigError(f"model.family={module.cfg.family!r}: task evaluation generates or scores "
                      "completions, which needs a decoder or an encoder_decoder")


@functools.partial(jax.jit, static_argnames=("module",))
def _head_predictions(module, params, batch):
  return jnp.argmax(apply_batch(module, params, batch, output="classify")[0], axis=-1)


def head_accuracy(module, params, tokenizer, task: Task, records: Sequence[dict],
                  batch_size: int = 64) -> dict[str, float]:
  """{"accuracy": percent} of an encoder's classifier head (trained on `task.labels`,
  in that order) on `records`, each framed as in training: [CLS] prompt [SEP]."""
  if task.metric != "accuracy":
    raise ConfigError(f"task {task.name!r} ({task.metric}): an encoder scores classification "
                      "tasks only (accuracy from its head); use a decoder for generation")
  head = params.get("classifier", {}).get("kernel")
  if head is None or head.shape[-1] != len(task.labels):
    width = "is absent" if head is None else f"has {head.shape[-1]}"
    raise ConfigError(f"task {task.name!r} has {len(task.labels)} labels but the model's "
                      f"classifier head {width}; evaluate an encoder "
                      "fine-tuned on this task (experiments.finetune, data.tasks)")
  pairs = [task.template.apply(record) for record in records]
  needed = max(len(p) for p in tokenizer.encode_batch([p for p, _ in pairs])) + 2
  seq_len = min(-(-needed // _LENGTH_BUCKET) * _LENGTH_BUCKET, module.cfg.max_len)
  rows, _ = sft_rows(pairs, tokenizer, seq_len, "encoder", labels=task.labels)
  num_rows = len(pairs)
  padded = -(-num_rows // batch_size) * batch_size
  rows = {k: np.pad(v, ((0, padded - num_rows),) + ((0, 0),) * (v.ndim - 1))
          for k, v in rows.items()}
  predictions = np.concatenate([np.asarray(_head_predictions(
      module, params, with_virtual_tokens({k: jnp.asarray(v[s:s + batch_size])
                                           for k, v in rows.items()}, module.cfg)))
      for s in range(0, padded, batch_size)])[:num_rows]
  return metrics.accuracy(predictions.tolist(), rows["labels"][:num_rows].tolist())


def _chunks(items: Sequence, batch_size: int) -> list[list]:
  """Equal-sized chunks of at most batch_size (the last padded with its final item), so
  that every generate call has the same batch size and compiles once."""
  num = -(-len(items) // batch_size)
  size = -(-len(items) // num)
  chunks = [list(items[i:i + size]) for i in range(0, len(items), size)]
  chunks[-1] += [chunks[-1][-1]] * (size - len(chunks[-1]))
  return chunks


def _generate_call(module, params, prompt_ids, sampling, pad_id, start_id):
  """The one call into llm.inference, for either family."""
  rng = jax.random.PRNGKey(0)  # greedy decoding draws nothing
  return generate_sequences(module, params, prompt_ids, sampling, rng, pad_id=pad_id,
                            start_id=start_id).lists()


def greedy_generate(module, params, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                    eos_id: int, pad_id: int = 0, start_id: int = 0,
                    batch_size: int = 256) -> list[list[int]]:
  """Greedy continuations of many prompts, `batch_size` per generate call; each ends at
  (and includes) eos or stops after max_new_tokens."""
  sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, eos_id=eos_id)
  out = []
  for chunk in _chunks(prompt_ids, batch_size):
    out += _generate_call(module, params, chunk, sampling, pad_id, start_id)
  return out[:len(prompt_ids)]


def completion_log_likelihoods(module, params, tokenizer, pairs: Sequence[tuple[str, str]],
                               batch_size: int = 64) -> np.ndarray:
  """(N,) sum of log p over each completion's tokens and its final eos, given the prompt
  (framed as `sft_rows` frames it)."""
  _check_family(module)
  family, max_len = module.cfg.family, module.cfg.max_len
  prompts = tokenizer.encode_batch([p for p, _ in pairs])
  completions = tokenizer.encode_batch([c for _, c in pairs])
  if family == "decoder":
    needed = max(len(p) + len(c) + 1 for p, c in zip(prompts, completions))
  else:
    needed = max(max(len(p), len(c)) + 1 for p, c in zip(prompts, completions))
  virtual = len(model_prefix(module.cfg))  # prompt tuning's tokens go first
  seq_len = min(-(-needed // _LENGTH_BUCKET) * _LENGTH_BUCKET, max_len - virtual)
  rows, _ = sft_rows(pairs, tokenizer, seq_len, family)
  num_rows = len(pairs)
  padded = -(-num_rows // batch_size) * batch_size
  rows = {k: np.pad(v, ((0, padded - num_rows), (0, 0))) for k, v in rows.items()}
  sums = []
  for start in range(0, padded, batch_size):
    batch = with_virtual_tokens({k: v[start:start + batch_size] for k, v in rows.items()},
                                module.cfg)
    logp_BT = np.asarray(log_likelihood(module, params, batch))
    sums.append((logp_BT * batch["weights"]).sum(axis=1))
  return np.concatenate(sums)[:num_rows]


def label_scores(module, params, tokenizer, prompts: Sequence[str],
                 completions: Sequence[Sequence[str]], batch_size: int = 64) -> np.ndarray:
  """(N, L) log-likelihood of each of the L candidate completions of each prompt."""
  num_labels = len(completions[0])
  pairs = [(p, c) for p, options in zip(prompts, completions) for c in options]
  scores = completion_log_likelihoods(module, params, tokenizer, pairs, batch_size)
  return scores.reshape(len(prompts), num_labels)


def _records(task: Task, split: str, max_examples: Optional[int]) -> list[dict]:
  records = list(task.records(split))[:max_examples]
  if not records:
    raise ConfigError(f"task {task.name!r} split {split!r} has no records to evaluate")
  return records


def _prompts(task: Task, records: Sequence[dict], tokenizer, k_shot: int, seed: int,
             max_len: int, reserve: int) -> list[tuple[str, str]]:
  """The k-shot (prompt, completion) of each record, shots drawn from train per record."""
  pool = task.records("train") if k_shot else ()
  return [few_shot(task.template, record, pool, k_shot, seed=[seed, i], tokenizer=tokenizer,
                   max_len=max_len, reserve=reserve) for i, record in enumerate(records)]


def _evaluate_labels(module, params, tokenizer, task, records, k_shot, seed, batch_size):
  options = [task.label_completions(record) for record in records]
  longest = max(len(t) for t in tokenizer.encode_batch(options[0]))
  # Room beside the prompt: decoders score [bos] prompt completion, encoders prompt [eos].
  reserve = (longest + 1 if module.cfg.family == "decoder" else 1) + len(model_prefix(module.cfg))
  pairs = _prompts(task, records, tokenizer, k_shot, seed, module.cfg.max_len, reserve)
  scores_NL = label_scores(module, params, tokenizer, [p for p, _ in pairs], options, batch_size)
  gold = [task.labels.index(record[task.label_field]) for record in records]
  return metrics.accuracy(scores_NL.argmax(axis=1), gold)


def _evaluate_generation(module, params, tokenizer, task, records, k_shot, seed, generate_fn,
                         batch_size):
  references = [task.template.apply(record)[1] for record in records]
  max_new_tokens = max(len(t) for t in tokenizer.encode_batch(references)) + 1
  family = module.cfg.family
  # Room beside the prompt: [bos] and the new tokens for a decoder; [eos] for an encoder.
  reserve = (max_new_tokens + 1 if family == "decoder" else 1) + len(model_prefix(module.cfg))
  pairs = _prompts(task, records, tokenizer, k_shot, seed, module.cfg.max_len, reserve)
  prefix = model_prefix(module.cfg)
  prompt_ids = [prefix + generation_prompt(p, tokenizer, family)
                for p in tokenizer.encode_batch([p for p, _ in pairs])]
  if generate_fn is None:
    generate_fn = functools.partial(greedy_generate, module, params, eos_id=tokenizer.eos_id,
                                    pad_id=tokenizer.pad_id, start_id=tokenizer.pad_id,
                                    batch_size=batch_size)
  outputs = generate_fn(prompt_ids, max_new_tokens)
  predictions = [tokenizer.decode(ids).strip() for ids in outputs]
  return metrics.GENERATION_METRICS[task.metric](predictions, [r.strip() for r in references])


def evaluate_task(module, params, tokenizer, task: Task, split: str = "test", k_shot: int = 0,
                  max_examples: Optional[int] = None, generate_fn: Optional[GenerateFn] = None,
                  seed: int = 0, batch_size: int = 64) -> dict[str, float]:
  """{metric: value (percent), "n": examples} of `task` on the first `max_examples`
  records of `split`, each prompted with `k_shot` solved train examples.

  Classification tasks (metric "accuracy") pick the label whose completion is most
  likely; the others generate greedily, through `generate_fn(prompt_ids,
  max_new_tokens) -> token lists` when given (e.g. a model with a soft prompt).
  """
  records = _records(task, split, max_examples)
  if module.cfg.family == "encoder":
    if k_shot:
      raise ConfigError(f"k_shot={k_shot}: an encoder's classifier head scores the record "
                        "alone; evaluate it with k_shot 0")
    return {**head_accuracy(module, params, tokenizer, task, records, batch_size),
            "n": len(records)}
  _check_family(module)
  if task.metric == "accuracy":
    scores = _evaluate_labels(module, params, tokenizer, task, records, k_shot, seed,
                              batch_size)
  else:
    scores = _evaluate_generation(module, params, tokenizer, task, records, k_shot, seed,
                                  generate_fn, batch_size)
  return {**scores, "n": len(records)}


def evaluate_few_shot(module, params, tokenizer, task: Task, ks: Sequence[int] = (0, 1, 4),
                      **kwargs) -> dict[int, dict[str, float]]:
  """`evaluate_task` for every k in `ks` (same examples, same seed)."""
  return {k: evaluate_task(module, params, tokenizer, task, k_shot=k, **kwargs) for k in ks}
