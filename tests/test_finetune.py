"""The adaptation lifecycle in miniature: pretrain a tiny decoder, LoRA fine-tune it from
its workdir on a generated task, and score it better than the base; a Hugging Face
checkpoint fine-tunes too; init_from refuses what it cannot use."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from llm import config as config_lib, peft
from llm.config import ConfigError
from llm.data.sft import sft_rows
from llm.data.tasks import get_task
from llm.eval.tasks import completion_log_likelihoods, evaluate_task
from llm.models import build
from llm.train import init_from, loop

# A larger init scale lets a briefly pretrained base make confident predictions at all
# (its frozen tied embeddings bound the logits LoRA can reach).
MODEL = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, d_ff=128, max_len=64,
             init_std=0.1)


def _config(**sections):
  base = {"model": MODEL,
          "data": dict(seq_len=64, batch_size=16, max_documents=200, num_sentinels=8),
          "train": dict(steps=60, warmup_steps=5, learning_rate=1e-2, log_every=10,
                        eval_every=1000, eval_batches=1, checkpoint_every=1000, peak_flops=1e9),
          "parallel": dict(data=1)}
  for name, values in sections.items():
    base[name] = {**base[name], **values}
  return config_lib.from_configdict(base)


@pytest.fixture(autouse=True)
def _one_device(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("LLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
  monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("LLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    mp.setattr(jax, "devices", lambda *a: jax.local_devices()[:1])
    loop.run(_config(), workdir, progress=False)
  return workdir


def test_lora_from_a_pretraining_workdir_beats_the_base_model_on_its_task(pretrained, tmp_path):
  cfg = _config(model={"peft": {"method": "lora", "lora_rank": 4}},
                data={"objective": "sft", "tasks": "topic"},
                train={"steps": 100, "init_from": pretrained})
  workdir = str(tmp_path / "lora")
  loop.run(cfg, workdir, progress=False)
  base_cfg, base_params, tokenizer = loop.load(pretrained)
  tuned_cfg, tuned_params, _ = loop.load(workdir)
  assert tuned_cfg.model == dataclasses.replace(base_cfg.model, peft=cfg.model.peft)
  lora, frozen = peft.split(tuned_params, peft.trainable_pattern(tuned_cfg.model.peft))
  for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(base_params)):
    np.testing.assert_array_equal(a, b)  # the base model was not modified
  assert peft.count(lora) < 0.1 * peft.count(frozen)
  # The task metric that moves within this budget: the perplexity of the reference
  # completions of the test split (accuracy by label ranking needs a few hundred steps).
  pairs = get_task("topic").pairs("test")[:64]
  tokens = sum(len(t) + 1 for t in tokenizer.encode_batch([c for _, c in pairs]))
  nll = lambda c, p: -completion_log_likelihoods(build(c.model), p, tokenizer, pairs).sum() / tokens
  base_nll, tuned_nll = nll(base_cfg, base_params), nll(tuned_cfg, tuned_params)
  assert tuned_nll < base_nll - 1.0, (base_nll, tuned_nll)
  # Starting a later run from this workdir folds the LoRA into plain weights.
  merged_model, merged, _ = init_from.pretrained(workdir)
  assert merged_model == base_cfg.model and not any("lora" in p for p in peft.paths(merged))
  np.testing.assert_allclose(nll(base_cfg, merged), tuned_nll, rtol=1e-4)
  # The adapter alone, applied to the base model, gives the tuned model.
  adapted_cfg, adapted = peft.load_adapter(f"{workdir}/{loop.ADAPTER_DIR}", base_cfg.model,
                                           base_params)
  assert adapted_cfg == tuned_cfg.model
  for a, b in zip(jax.tree_util.tree_leaves(adapted), jax.tree_util.tree_leaves(tuned_params)):
    np.testing.assert_array_equal(a, b)


def test_a_hugging_face_checkpoint_fine_tunes_with_its_weights_frozen(pretrained, tmp_path):
  transformers = pytest.importorskip("transformers")
  from llm.convert import load_pretrained
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=512, n_positions=64))
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  cfg = _config(model={"peft": {"method": "lora"}}, data={"objective": "sft", "tasks": "facts",
                "tokenizer_path": f"{pretrained}/tokenizer.model"},
                train={"steps": 2, "init_from": str(tmp_path / "hf")})
  last = loop.run(cfg, str(tmp_path / "tuned"), progress=False)
  assert np.isfinite(last["train_loss"])
  tuned_cfg, params, _ = loop.load(str(tmp_path / "tuned"))
  assert tuned_cfg.model.d_model == 32 and tuned_cfg.model.peft.method == "lora"
  _, hf_params = load_pretrained(str(tmp_path / "hf"))
  frozen = peft.split(params, peft.trainable_pattern(tuned_cfg.model.peft))[1]
  for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(hf_params)):
    np.testing.assert_array_equal(a, b)


def test_init_from_refuses_what_it_cannot_use(pretrained, tmp_path):
  with pytest.raises(ConfigError, match="no config.json there"):
    loop.run(_config(train={"init_from": str(tmp_path)}), str(tmp_path / "a"), progress=False)
  t5 = dict(MODEL, family="encoder_decoder", positions="relative")
  with pytest.raises(ConfigError, match="holds a decoder model, but config.data.objective='span'"):
    loop.run(_config(model=t5, data={"objective": "span"}, train={"init_from": pretrained}),
             str(tmp_path / "b"), progress=False)
  assert not (tmp_path / "b").exists()  # nothing written for a run that could not start


def test_an_encoder_learns_label_classification_with_its_head(tmp_path):
  bert = dict(vocab_size=512, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=64,
              family="encoder", post_norm=True, embed_norm=True)
  cfg = _config(model=bert, data={"objective": "sft", "tasks": "topic", "seq_len": 48},
                train={"steps": 40, "eval_every": 40, "eval_batches": 4})
  workdir = str(tmp_path / "bert")
  loop.run(cfg, workdir, progress=False)
  tuned_cfg, params, tokenizer = loop.load(workdir)
  logged = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  losses = [m["train_loss"] for m in logged if "train_loss" in m]
  assert losses[-1] < losses[0] - 0.3, losses  # from ~log(4) = 1.39
  assert params["classifier"]["kernel"].shape[-1] == 4  # topic's labels
  # The head's accuracy on the test split (chance: 25%) is what the head's logits say.
  task = get_task("topic")
  records = list(task.records("test"))[:96]
  scores = evaluate_task(build(tuned_cfg.model, num_labels=4), params, tokenizer, task,
                         max_examples=96)
  assert scores["accuracy"] > 40, scores
  rows, _ = sft_rows([task.template.apply(r) for r in records], tokenizer, 64, "encoder",
                     labels=task.labels)
  logits = jax.jit(functools.partial(build(tuned_cfg.model, num_labels=4).apply,
                                     output="classify"))(
      {"params": params}, rows["inputs"], None, rows["segment_ids"])
  assert scores["accuracy"] == pytest.approx(
      100 * np.mean(np.argmax(logits, -1) == rows["labels"]))
  with pytest.raises(ConfigError, match="an encoder fine-tunes on classification tasks"):
    loop.run(_config(model=bert, data={"objective": "sft", "tasks": "facts"}),
             str(tmp_path / "facts"), progress=False)
