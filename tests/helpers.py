"""Tiny configs and batches shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm import config as config_lib
from llm.models import build

GPT_TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32)
LLAMA_TINY = dict(GPT_TINY, num_kv_heads=2, positions="rope", norm="rmsnorm",
                  activation="swiglu", use_bias=False, tie_embeddings=False)
T5_TINY = dict(family="encoder_decoder", vocab_size=64, d_model=32, num_layers=2,
               num_decoder_layers=2, num_heads=4, d_ff=64, max_len=32, positions="relative",
               norm="rmsnorm", use_bias=False, activation="geglu", scale_attention=False,
               tie_embeddings=False)



def peaky(params):
  """Matrices 4x the init's, so that next-token distributions are far from uniform."""
  return jax.tree_util.tree_map(lambda x: x * 4 if x.ndim > 1 else x, params)


def t5_tiny_and_params():
  """The tiny T5 (`T5_TINY`) and its init params, made `peaky`."""
  module = build(config_lib.model_from_dict(T5_TINY))
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), np.ones((1, 4), np.int32),
                                         np.ones((1, 3), np.int32))["params"])
  return module, peaky(params)

def model_and_params(seed=0, **overrides):
  cfg = config_lib.model_from_dict(overrides)
  module = build(cfg)
  init = jax.jit(module.init)  # eager init dispatches op by op: many times slower on CPU
  params = nn.unbox(init(jax.random.PRNGKey(seed), np.ones((1, 8), np.int32))["params"])
  return JittedApply(module), params


class JittedApply:
  """The module with `apply` jitted (static flags by keyword), for fast tests."""

  def __init__(self, module):
    self.module, self.cfg = module, module.cfg
    self._apply = jax.jit(module.apply,
                          static_argnames=("decode", "deterministic", "mutable", "output"))

  def apply(self, *args, mutable=False, **kwargs):
    mutable = tuple(mutable) if isinstance(mutable, list) else mutable
    return self._apply(*args, mutable=mutable, **kwargs)

  def __getattr__(self, name):
    return getattr(self.module, name)


def random_batch(batch=8, seq_len=16, vocab=64, seed=0) -> dict:
  toks = np.random.default_rng(seed).integers(1, vocab, (batch, seq_len + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
          "weights": np.ones((batch, seq_len), np.float32)}


def random_params(module, *init_inputs, seed=0, std=0.02):
  """Params of the module's init tree, shapes and dtypes, drawn in numpy.

  Compiling `init` costs several times a forward pass on CPU (a threefry draw per param);
  eval_shape only traces. Kernels get the init's scale (std), norm scales 1 + noise and
  biases noise, so a misplaced scale or bias still changes the output.
  """
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *init_inputs)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    mean = 1.0 if path[-1].key == "scale" else 0.0
    return jnp.asarray(mean + rng.normal(0.0, std, leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def model_and_random_params(seed=0, **overrides):
  """`model_and_params` without compiling `init` (see `random_params`)."""
  module = build(config_lib.model_from_dict(overrides))
  return JittedApply(module), random_params(module, np.ones((1, 8), np.int32), seed=seed)


def embedding_dependence(module, params, tokens_1T, **kwargs):
  """(T, T): |d out[0, t] / d input embedding[0, s]|, summed over features, for every t at
  once (one compile; forward mode compiles faster than a backward pass). A zero
  "perturbation" added to the embeddings is what is differentiated; `kwargs` go to
  `module.apply` (e.g. output="hidden", prefix_BT=...)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens_1T)["perturbations"]
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def out_T(perturb, params):  # params as an argument: as constants XLA would fold them
    out = module.apply({"params": params, "perturbations": perturb}, tokens_1T, **kwargs)
    return out[0].sum(-1)
  jacobian_TSD = jax.jit(jax.jacfwd(out_T))(zeros, params)["embedded"][:, 0]
  return np.abs(np.asarray(jacobian_TSD)).sum(-1)


def prepare_text_tfds(tfds, class_name: str, texts: dict, data_dir) -> None:
  """Prepares TFDS dataset `class_name` in snake_case (one "text" feature; texts = {split:
  [text, ...]}) as array_record under `data_dir`, unregistered: as when a prepared dataset
  is read without its builder code."""
  def info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in texts}

  def generate_examples(self, split):
    for i, text in enumerate(texts[split]):
      yield i, {"text": text}

  with tfds.core.registered.skip_registration():
    builder = type(class_name, (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version("1.0.0"), "_info": info,
        "_split_generators": split_generators, "_generate_examples": generate_examples})
    builder(data_dir=data_dir, file_format="array_record").download_and_prepare(
        file_format="array_record")
