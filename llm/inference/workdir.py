"""Inference from a training workdir: load (optionally quantized), frame prompts as the
family expects, and decode continuations back to text."""

from __future__ import annotations

from typing import Sequence

from llm.config import ConfigError


def load_model(workdir: str, quant: str = "none"):
  """(module, params, tokenizer) of the workdir's latest checkpoint, quantized per `quant`."""
  from llm import models, train  # training imports this package
  cfg, params, tokenizer = train.load(workdir)
  model_cfg = cfg.model
  if quant != "none":
    from llm.inference.quantize import inference_config, quantize_params
    model_cfg, params = inference_config(model_cfg, quant), quantize_params(params, quant)
  return models.build(model_cfg), params, tokenizer


def prompt_ids(tokenizer, family: str, prompts: Sequence[str]) -> list[list[int]]:
  """A decoder continues [bos] prompt; an encoder-decoder reads prompt [eos]."""
  if family == "encoder_decoder":
    return [tokenizer.encode(p) + [tokenizer.eos_id] for p in prompts]
  return [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]


def continuation_text(tokenizer, prompt: Sequence[int], new: Sequence[int]) -> str:
  """The text `new` adds after `prompt`. Decoded together: sentencepiece drops a leading
  space when a continuation is decoded on its own."""
  prompt = list(prompt)
  return tokenizer.decode(prompt + list(new))[len(tokenizer.decode(prompt)):]


def read_prompts(path: str) -> list[str]:
  """One prompt per non-empty line of a text file."""
  with open(path, encoding="utf-8") as f:
    prompts = [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise ConfigError(f"--prompts_file {path}: no prompts in it (one per line)")
  return prompts
