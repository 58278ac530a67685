"""The decode state every strategy shares: `prefill`, `decode_step` and row operations.

Every row's tokens sit in its cache at slot = position, starting at slot 0 (prompts are
right-padded), and `end_B` says how many of them are real. Appending writes at `end_B`;
rolling a row back (speculative decoding) lowers its `end_B`; reordering rows (beam
search) gathers every cache leaf along its batch axis. The attention layers read a row's
cache only below its end (and the new tokens up to each query), so whatever lies beyond
a row's end is never read.

Greedy/sampling (`generate`), beam search (`beam`) and speculative decoding
(`speculative`) are loops over these functions; all of them are pure and jit-able.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llm.config import ConfigError
from llm.layers import quant
from llm.layers.linear import Linear, RowKernel
from llm.layers.mlp import FUSED_GATE_UP
from llm.models.blocks import unscanned

_SELF_ATTENTION_CACHE = ("cached_key", "cached_value")  # (B, K, S, H): grow with the sequence
_SEQ_AXIS = 2  # of those, counted from the batch axis


@struct.dataclass
class DecodeState:
  """A batch of partly decoded rows.

  cache: the model's "cache" collection (scanned: leaves stacked on a leading layer axis).
  logits_BV: float32 logits of each row's next token (after its last real token).
  end_B: tokens held per row = the position of its next token.
  encoder_segment_ids_BS: seq2seq only, the encoder input's real tokens (cross mask).
  """

  cache: dict
  logits_BV: jax.Array
  end_B: jax.Array
  encoder_segment_ids_BS: Optional[jax.Array] = None

  @property
  def cache_len(self) -> int:
    return _cache_leaves(self.cache)[0].shape[-2]


def _is_scanned(path) -> bool:
  return any(getattr(k, "key", None) == "layers" for k in path)


def _leaf_name(path) -> str:
  return getattr(path[-1], "key", "")


def _cache_leaves(cache) -> list:
  return [x for path, x in jax.tree_util.tree_leaves_with_path(cache)
          if _leaf_name(path) in _SELF_ATTENTION_CACHE]


def _map_cache(fn, cache):
  """fn(leaf, batch_axis, name) over every cache leaf, for scanned and unscanned layouts."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(x, 1 if _is_scanned(path) else 0, _leaf_name(path)), cache)


def gather_rows(state: DecodeState, rows_R: jax.Array) -> DecodeState:
  """The state of rows `rows_R` (repeats allowed): beam reordering, fanning a prompt out."""
  take = lambda x, axis: jnp.take(x, rows_R, axis=axis)
  enc = state.encoder_segment_ids_BS
  return DecodeState(cache=_map_cache(lambda x, axis, _: take(x, axis), state.cache),
                     logits_BV=take(state.logits_BV, 0), end_B=take(state.end_B, 0),
                     encoder_segment_ids_BS=None if enc is None else take(enc, 0))


def truncate_rows(state: DecodeState, end_B: jax.Array, logits_BV: jax.Array) -> DecodeState:
  """Each row cut back to its own `end_B` tokens (<= what it holds); `logits_BV` are the
  next-token logits after its new last token (the caller has them from its forward)."""
  return state.replace(end_B=jnp.minimum(end_B, state.end_B).astype(jnp.int32),
                       logits_BV=logits_BV.astype(jnp.float32))


def with_cache_len(state: DecodeState, cache_len: int) -> DecodeState:
  """The same rows with room for `cache_len` tokens (a reused prefix grows into a request)."""
  if cache_len < state.cache_len:
    raise ConfigError(f"cache_len={cache_len}: below the {state.cache_len} slots the state "
                      "already has; pass a larger one")

  def pad(x, axis, name):
    if name not in _SELF_ATTENTION_CACHE:
      return x
    widths = [(0, 0)] * x.ndim
    widths[axis + _SEQ_AXIS] = (0, cache_len - x.shape[axis + _SEQ_AXIS])
    return jnp.pad(x, widths)
  return state.replace(cache=_map_cache(pad, state.cache))


def fuse_projections(params):
  """A new tree with each self-attention's query/key/value kernels (and biases) as one
  "qkv" kernel (D, N + 2K, H), and each gated MLP's gate and up kernels as one (D, 2F)
  kernel, which `Attention` and `MLP` use when present: one matmul instead of three (and
  of two) per layer and step. Quantized kernels fuse too (each part keeps its scales);
  a float kernel next to a quantized one does not."""
  def kind(part):  # "float" or "quantized" for a kernel (and bias) with nothing around it
    if not (isinstance(part, dict) and set(part) <= {"kernel", "bias"}):
      return None
    kernel = part.get("kernel")
    if isinstance(kernel, quant.QArray):
      return "quantized"
    return "float" if isinstance(kernel, (jax.Array, np.ndarray)) else None

  def join(kernels, axis):
    if isinstance(kernels[0], quant.QArray):
      return quant.concatenate(kernels, axis)
    return jnp.concatenate(kernels, axis=axis)

  def concat(tree, names, fused_name, axis):
    parts = [tree.pop(p) for p in names]
    fused = {"kernel": join([p["kernel"] for p in parts], axis)}
    if "bias" in parts[0]:
      fused["bias"] = jnp.concatenate([p["bias"] for p in parts], axis=axis - 1)
    return {**tree, fused_name: fused}

  def fuse(tree, name=""):
    if not isinstance(tree, dict):
      return tree
    tree = {k: fuse(v, k) for k, v in tree.items()}
    for scope, names, fused_name in _FUSIBLE:
      kinds = {kind(tree.get(p)) for p in names}
      if name == scope and len(kinds) == 1 and None not in kinds:
        tree = concat(tree, names, fused_name, axis=1)
    return tree
  return fuse(params)


# (module scope, kernels, fused name): all concatenated along the kernels' axis 1.
_FUSIBLE = (("attn", ("query", "key", "value"), "qkv"),
            ("mlp", ("wi_gate", "wi_up"), FUSED_GATE_UP))


def for_decoding(module: nn.Module, params):
  """The model as decoding runs it: per-layer params (no stacked-weight copies per step)
  and fused q/k/v projections. Same function, different param layout. Idempotent, so a
  caller that decodes many times transforms once and passes the result on. Params fresh
  from `init` are unboxed first (their partitioning metadata would hide the kernels)."""
  module, params = unscanned(module, nn.unbox(params))
  return module, fuse_projections(params)


def untied_head(module: nn.Module, params):
  """The same decoder with its tied output projection x E^T as an untied "lm_head" kernel
  E^T (D, V), for dots that would otherwise transpose the table at every call (XLA:CPU's
  own dots with several rows; see `speculative`). Costs a copy of a float table; a
  quantized table, another family or an untied model are returned as they are."""
  cfg = module.cfg
  if cfg.family != "decoder" or not cfg.tie_embeddings:
    return module, params
  table = params["embed"]["embedding"]
  if isinstance(table, quant.QArray):
    return module, params
  untied = module.clone(cfg=dataclasses.replace(cfg, tie_embeddings=False))
  return untied, {**params, "lm_head": {"kernel": jnp.transpose(table)}}


# XLA:CPU's YNNPACK dots repack the weight at every call. A decode loop reads the same
# weights every step, so for a few rows XLA's own (Eigen) dots are faster: a 5-row dot
# costs 1.5x a one-row one with them and 2.5x with YNNPACK (384 x 1152 kernel), and
# one-row dots never go to YNNPACK. Whole loops break even at about 8 rows (beam search,
# 8 rows: 168 vs 171 ms; 16 rows: 258 vs 240 ms for YNNPACK). Eigen single-threaded: on a
# shared 2-core host the second thread joins a dot ~50 us late, and speculative decoding
# ran 3-6% faster in three interleaved A/B runs without it.
FEW_ROWS = 8
_FEW_ROW_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",
                    "xla_cpu_multi_thread_eigen": False}


@functools.cache
def _few_row_options() -> tuple:
  if jax.default_backend() != "cpu":
    return ()
  try:
    jax.jit(lambda x: x @ x, compiler_options=_FEW_ROW_OPTIONS)(jnp.ones((8, 8)))
  except jax.errors.JaxRuntimeError:  # an XLA without the option keeps its defaults
    return ()
  return tuple(_FEW_ROW_OPTIONS.items())


def few_row_layout(module: nn.Module, params, rows: int):
  """(module, params, compiler options) for a decode loop whose dots have `rows` rows:
  on CPU, up to FEW_ROWS, XLA's own dots and, as they would copy a tied table transposed
  at every step, an untied head (a tied seq2seq head keeps the defaults). Quantized
  params keep the defaults: XLA's own int8 dots are the slow ones (speculative decoding
  with an int8 target: 1.33 s instead of 0.18 s for benchmarks/decode_strategies.py's
  pair, 4 prompts x 64 tokens)."""
  is_quantized = lambda x: isinstance(x, quant.QArray)
  quantized = any(map(is_quantized, jax.tree_util.tree_leaves(params, is_leaf=is_quantized)))
  options = _few_row_options() if rows <= FEW_ROWS and not quantized else ()
  if options:
    module, params = untied_head(module, params)
    if module.cfg.tie_embeddings and module.cfg.family != "decoder":
      options = ()
  return module, params, options


_IN_DIMS: dict = {}  # module (hashable, as jit's static arguments are) -> in_dims by path


def _linear_in_dims(module: nn.Module, params) -> dict:
  """{param path: in_dims} of every `Linear` the model calls, found by tracing it once per
  module (abstractly, no FLOPs; ~130 ms, hence the cache) with an interceptor: the params
  alone do not say how many of a kernel's axes are contracted (q/k/v (D, N, H): one; the
  output (N, H, D): two)."""
  if module in _IN_DIMS:
    return _IN_DIMS[module]
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Linear) and context.method_name == "__call__":
      found[context.module.path] = context.module.in_dims
    return next_fun(*args, **kwargs)
  tokens = jnp.zeros((1, 1), jnp.int32)
  args = (tokens, tokens) if module.cfg.family == "encoder_decoder" else (tokens,)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: module.apply({"params": p}, *args), params)
  _IN_DIMS[module] = found
  return found


def one_row_layout(module: nn.Module, params):
  """The decode layout for loops whose dots have one row (batch-1 greedy or sampling):
  on CPU, every float `Linear` kernel and its bias as one `RowKernel` (transposed, the
  bias as a column), which XLA:CPU reads as a fused loop instead of an Eigen
  matrix-vector dot: batch-1 decode of benchmarks/decode_throughput.py's GPT-2 took 1.21
  instead of 1.33 ms per token (medians of 11 interleaved rounds, 2-core AMD EPYC). With
  more rows XLA's dots would copy the kernels transposed at every step, so beam and
  speculative decoding keep `few_row_layout`. Same function; idempotent. Quantized
  kernels, and Linears with params of their own beside the kernel (LoRA's), stay as
  they are. Costs a copy of the kernels (~17 ms for that GPT-2): a caller that decodes
  many times at batch 1 lays out once and passes the result on."""
  if jax.default_backend() != "cpu" or module.cfg.family == "encoder":
    return module, params
  in_dims = _linear_in_dims(module, params)

  def lay(tree, path=()):
    if not isinstance(tree, dict):
      return tree
    if (path in in_dims and set(tree) <= {"kernel", "bias"}
        and isinstance(tree.get("kernel"), (jax.Array, np.ndarray))):
      return {"kernel": RowKernel.of(jnp.asarray(tree["kernel"]), tree.get("bias"),
                                     in_dims[path])}
    return {k: lay(v, (*path, k)) for k, v in tree.items()}
  return module, lay(params)


def decode_layout(module: nn.Module, params, rows: int):
  """The layout `generate` decodes `rows` prompts in: `for_decoding`'s and, for one row,
  `one_row_layout`'s. Idempotent: a caller that decodes many times at one batch size lays
  out once and passes the result on (as the benchmarks do)."""
  module, params = for_decoding(module, params)
  return one_row_layout(module, params) if rows == 1 else (module, params)


@functools.cache
def jit_with(fn, options: tuple, static_argnames: tuple):
  """`fn` jitted with XLA compiler `options` (items; empty: the defaults)."""
  return jax.jit(fn, compiler_options=dict(options) or None, static_argnames=static_argnames)


def init_cache(module: nn.Module, batch: int, length: int, encoder_len: int = 0):
  """Zeroed cache with `length` slots, shaped by tracing init (no FLOPs spent);
  `encoder_len` sizes a seq2seq model's cross-attention cache."""
  decoder_BT = jnp.zeros((batch, length), jnp.int32)
  args = ((jnp.ones((batch, encoder_len), jnp.int32), decoder_BT) if encoder_len
          else (decoder_BT,))
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args,
                                              decode=True))["cache"]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _forward(module, params, state: DecodeState, tokens_BK, segment_ids_BK, encoded_BSD=None):
  positions_BK = state.end_B[:, None] + jnp.arange(tokens_BK.shape[1])[None]
  variables = {"params": params, "cache": state.cache}
  if module.cfg.family == "encoder_decoder":
    logits_BKV, mutated = module.apply(
        variables, tokens_BK, encoded_BSD, state.encoder_segment_ids_BS, positions_BK,
        segment_ids_BK, True, method=module.decode, mutable=["cache"])
  else:
    logits_BKV, mutated = module.apply(variables, tokens_BK, positions_BK, segment_ids_BK,
                                       decode=True, mutable=["cache"])
  return logits_BKV, mutated["cache"]


def decode_step(module: nn.Module, params, state: DecodeState, tokens_BK: jax.Array,
                lengths_B: Optional[jax.Array] = None, encoded_BSD=None):
  """Appends tokens_BK to every row -> (logits_BKV, state); logits_BKV[:, k] are the
  next-token logits after token k. `lengths_B` (default K) appends only each row's first
  lengths_B[b] tokens: the rest are padding, written past the row's end and never read.
  `encoded_BSD` (seq2seq, first call only) fills the cross-attention cache."""
  batch, k = tokens_BK.shape
  if lengths_B is None:
    lengths_B = jnp.full((batch,), k, jnp.int32)
  segment_ids_BK = (jnp.arange(k)[None] < lengths_B[:, None]).astype(jnp.int32)
  logits_BKV, cache = _forward(module, params, state, tokens_BK, segment_ids_BK, encoded_BSD)
  last_BV = jnp.take_along_axis(logits_BKV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return logits_BKV, state.replace(cache=cache, logits_BV=last_BV.astype(jnp.float32),
                                   end_B=(state.end_B + lengths_B).astype(jnp.int32))


def empty_state(module: nn.Module, batch: int, cache_len: int,
                encoder_segment_ids_BS: Optional[jax.Array] = None) -> DecodeState:
  """Rows holding nothing yet (seq2seq: the cross-attention cache is filled by the first
  `decode_step`, which gets the encoder output)."""
  encoder_len = 0 if encoder_segment_ids_BS is None else encoder_segment_ids_BS.shape[1]
  return DecodeState(cache=init_cache(module, batch, cache_len, encoder_len),
                     logits_BV=jnp.zeros((batch, module.cfg.vocab_size), jnp.float32),
                     end_B=jnp.zeros((batch,), jnp.int32),
                     encoder_segment_ids_BS=encoder_segment_ids_BS)


def prefill(module: nn.Module, params, tokens_BT: jax.Array, lengths_B: jax.Array,
            cache_len: int, encoder_BS: Optional[jax.Array] = None,
            encoder_segment_ids_BS: Optional[jax.Array] = None) -> DecodeState:
  """The state after reading right-padded prompts (row b: its first lengths_B[b] tokens)
  into a cache of `cache_len` slots. Seq2seq: `encoder_BS` (with its segment ids, 0 =
  padding) is encoded once and `tokens_BT` are the decoder's first tokens (the start id)."""
  if tokens_BT.shape[1] > cache_len:
    raise ConfigError(f"cache_len={cache_len}: shorter than the {tokens_BT.shape[1]}-token "
                      "prompt; pass a larger one")
  encoded_BSD = None
  if module.cfg.family == "encoder_decoder":
    encoded_BSD = module.apply({"params": params}, encoder_BS, encoder_segment_ids_BS,
                               method=module.encode)
  state = empty_state(module, tokens_BT.shape[0], cache_len, encoder_segment_ids_BS)
  return decode_step(module, params, state, tokens_BT, lengths_B, encoded_BSD)[1]
