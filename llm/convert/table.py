"""Each Hugging Face family as two tables, and the one place both are checked, both ways.

A family file declares
  FIELDS            what the family does with every ModelConfig field (`Fields`): the
                    values it fixes, the values it allows, relations it needs between
                    fields, the fields its HF config carries (any value converts) and the
                    fields that have no effect on its model;
  tensors(cfg, ...) which of our params are which HF tensors (`Tensor`, `Tied`), with the
                    transposes, reshapes and fused splits both ways.
Here `problems` checks a config against FIELDS (export) and `build_config` builds one
from them (import); `params_from_hf` and `params_to_hf` run a tensor table one way or
the other and fail on any HF tensor or any param of ours left over. A family that cannot
express a field therefore says so in one line naming it, and nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from llm.config import ModelConfig, MoEConfig, PeftConfig, validate_model
from llm.convert.common import Params, State, StateReader, require


# --- config fields ---

@dataclasses.dataclass(frozen=True)
class Rule:
  """A relation `ok(cfg)` the family needs; reported as `field=value (needs NEEDS)`
  (`needs` may be a function of the config, to name the values involved)."""
  field: str
  ok: Callable[[ModelConfig], bool]
  needs: str | Callable[[ModelConfig], str]


@dataclasses.dataclass(frozen=True)
class Fields:
  """What one family does with each ModelConfig field ("moe.top_k" names a nested one).

  Every field must be in exactly one of fixed / allowed / carried / unused / COMMON_UNUSED,
  or be named by a rule (a rule may also constrain a carried field).
  """
  fixed: Mapping[str, Any]  # the one value the family has
  carried: Sequence[str]  # the HF config stores it: any (valid) value converts
  unused: Sequence[str] = ()  # no effect on this family's model, given the fixed fields
  allowed: Mapping[str, Sequence] = dataclasses.field(default_factory=dict)
  rules: Sequence[Rule] = ()


# Fields that change training or compute, never the weights or the float32 eval logits;
# the adaptation knobs matter only for the PEFT methods COMMON_RULES refuse.
COMMON_UNUSED = ("dropout", "init_std", "dtype", "param_dtype", "scan_layers", "remat") + tuple(
    f"peft.{f.name}" for f in dataclasses.fields(PeftConfig) if f.name != "method")
COMMON_RULES = (Rule("peft.method", lambda c: c.peft.method in ("full", "bitfit"),
                     "'full' or 'bitfit': merge LoRA into the weights first "
                     "(llm.peft.lora.merge); prompt and adapter params have no transformers "
                     "counterpart"),)
# A dense family needs moe.num_experts=0, which leaves the other MoE knobs without effect.
DENSE = Rule("moe.num_experts", lambda c: c.moe.num_experts == 0,
             "0: a dense family (mixture-of-experts models export as mixtral)")
MOE_KNOBS = tuple(f"moe.{f.name}" for f in dataclasses.fields(MoEConfig)
                  if f.name != "num_experts")
NO_GQA = Rule("num_kv_heads", lambda c: c.kv_heads == c.num_heads, "0 or num_heads: no GQA")
HEAD_DIM = Rule("head_dim", lambda c: c.dim_per_head * c.num_heads == c.d_model,
                "0 or d_model / num_heads")


def model_fields() -> tuple[str, ...]:
  """Every ModelConfig field, nested ones as "group.field"."""
  default = ModelConfig()
  names = []
  for f in dataclasses.fields(default):
    value = getattr(default, f.name)
    if dataclasses.is_dataclass(value):
      names += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
    else:
      names.append(f.name)
  return tuple(names)


def field_value(cfg: ModelConfig, name: str) -> Any:
  for part in name.split("."):
    cfg = getattr(cfg, part)
  return cfg


def with_fields(cfg: ModelConfig, values: Mapping[str, Any]) -> ModelConfig:
  """`cfg` with `values` ("moe.every": 1 sets a nested field) replaced."""
  top: dict[str, Any] = {}
  nested: dict[str, dict[str, Any]] = collections.defaultdict(dict)
  for name, value in values.items():
    group, _, sub = name.partition(".")
    if sub:
      nested[group][sub] = value
    else:
      top[name] = value
  for group, sub in nested.items():
    top[group] = dataclasses.replace(top.get(group, getattr(cfg, group)), **sub)
  return dataclasses.replace(cfg, **top)


def table_errors(fields: Fields) -> list[str]:
  """What is wrong with the table itself: fields it says nothing about, or twice."""
  groups = (tuple(fields.fixed), tuple(fields.allowed), tuple(fields.carried),
            tuple(fields.unused), COMMON_UNUSED)
  counts = collections.Counter(name for group in groups for name in group)
  ruled = {rule.field for rule in (*COMMON_RULES, *fields.rules)}
  known = model_fields()
  return ([f"says nothing about {n}" for n in known if not counts[n] and n not in ruled] +
          [f"lists {n} twice" for n, c in counts.items() if c > 1] +
          [f"names {n}, not a ModelConfig field" for n in {*counts, *ruled} if n not in known])


def problems(model_type: str, fields: Fields, cfg: ModelConfig) -> list[str]:
  """Why `model_type` cannot express `cfg`, one `field=value (needs ...)` each."""
  broken = table_errors(fields)
  require(not broken, f"llm/convert's table for {model_type} {'; '.join(broken)}")
  out = []
  for name, want in fields.fixed.items():
    if field_value(cfg, name) != want:
      out.append(f"{name}={field_value(cfg, name)!r} (needs {want!r})")
  for name, values in fields.allowed.items():
    if field_value(cfg, name) not in values:
      out.append(f"{name}={field_value(cfg, name)!r} (needs one of "
                 f"{', '.join(map(repr, values))})")
  for rule in (*COMMON_RULES, *fields.rules):
    if not rule.ok(cfg):
      needs = rule.needs(cfg) if callable(rule.needs) else rule.needs
      out.append(f"{rule.field}={field_value(cfg, rule.field)!r} (needs {needs})")
  return out


def check(model_type: str, fields: Fields, cfg: ModelConfig) -> None:
  bad = problems(model_type, fields, cfg)
  require(not bad, f"{model_type} cannot express config.model: {'; '.join(bad)}")


def build_config(model_type: str, fields: Fields, **values) -> ModelConfig:
  """The ModelConfig of an HF config: `values` (what the HF config says) plus the fixed
  fields, checked like an export is."""
  given = set(fields.fixed) & set(values)
  require(not given, f"llm/convert/{model_type}.py sets fixed fields {sorted(given)}")
  cfg = validate_model(with_fields(ModelConfig(**values), fields.fixed))
  check(model_type, fields, cfg)
  return cfg


# --- tensors ---

@dataclasses.dataclass(frozen=True)
class Tensor:
  """Our params `ours` ("attn/query/kernel") <-> HF tensors `hf`, n to m: from_hf maps the
  HF arrays to ours, to_hf ours to HF's (each returns a tuple in its names' order)."""
  ours: tuple[str, ...]
  hf: tuple[str, ...]
  from_hf: Callable[..., tuple]
  to_hf: Callable[..., tuple]


@dataclasses.dataclass(frozen=True)
class Tied:
  """One param of ours stored as several equal HF tensors (a tied embedding and head):
  import takes any that are present and refuses copies that differ (`why` says why)."""
  ours: str
  hf: tuple[str, ...]
  why: str


Entry = Tensor | Tied


def _one(x):
  return (x,)


def same(ours: str, hf: str) -> list[Entry]:
  return [Tensor((ours,), (hf,), _one, _one)]


def transposed(ours: str, hf: str) -> list[Entry]:
  """A torch (out, in) weight as our (in, out) kernel, e.g. an untied LM head."""
  return [Tensor((ours,), (hf,), lambda w: (w.T,), lambda k: (k.T,))]


def linear(ours: str, hf: str, in_shape: tuple, out_shape: tuple, bias: bool,
           conv1d: bool = False) -> list[Entry]:
  """Our Linear (kernel in_shape + out_shape, bias out_shape) <-> torch nn.Linear
  (weight (out, in)) or, with conv1d, GPT-2's Conv1D (weight (in, out))."""
  size_in, size_out = math.prod(in_shape), math.prod(out_shape)
  if conv1d:
    kernel = Tensor((f"{ours}/kernel",), (f"{hf}.weight",),
                    lambda w: (w.reshape(*in_shape, *out_shape),),
                    lambda k: (k.reshape(size_in, size_out),))
  else:
    kernel = Tensor((f"{ours}/kernel",), (f"{hf}.weight",),
                    lambda w: (w.T.reshape(*in_shape, *out_shape),),
                    lambda k: (k.reshape(size_in, size_out).T,))
  if not bias:
    return [kernel]
  return [kernel, Tensor((f"{ours}/bias",), (f"{hf}.bias",), lambda b: (b.reshape(out_shape),),
                         lambda b: (b.reshape(size_out),))]


def norm(ours: str, hf: str, bias: bool = True) -> list[Entry]:
  """LayerNorm (scale, bias) or RMSNorm (scale) <-> torch (weight[, bias])."""
  return same(f"{ours}/scale", f"{hf}.weight") + (same(f"{ours}/bias", f"{hf}.bias")
                                                   if bias else [])


def left_out(*ours: str) -> list[Entry]:
  """Params of ours the HF model has no place for and that cannot change its outputs
  (export only; e.g. a pooler next to an MLM head): consumed, nothing written."""
  return [Tensor(tuple(ours), (), lambda: (), lambda *_: ())]


def under(ours: str, hf: str, entries: list[Entry]) -> list[Entry]:
  """`entries` with `ours/` and `hf.` put in front of their names."""
  po = lambda name: f"{ours}/{name}" if ours else name
  ph = lambda name: f"{hf}.{name}" if hf else name
  out = []
  for e in entries:
    if isinstance(e, Tied):
      out.append(Tied(po(e.ours), tuple(map(ph, e.hf)), e.why))
    else:
      out.append(dataclasses.replace(e, ours=tuple(map(po, e.ours)), hf=tuple(map(ph, e.hf))))
  return out


def per_layer(num_layers: int, hf: str, entries: list[Entry]) -> list[Entry]:
  """One block's entries for each of our `layers_{i}` and HF's `hf.format(i=i)`."""
  return [e for i in range(num_layers) for e in under(f"layers_{i}", hf.format(i=i), entries)]


def embedding_and_head(cfg: ModelConfig, embedding: str) -> list[Entry]:
  """A decoder's token embedding and LM head ("lm_head.weight", tied or not)."""
  if cfg.tie_embeddings:
    return [Tied("embed/embedding", (embedding, "lm_head.weight"),
                 "config.tie_word_embeddings=True: the LM head is the token embedding")]
  return same("embed/embedding", embedding) + transposed("lm_head/kernel", "lm_head.weight")


def params_from_hf(entries: list[Entry], state: State, model_type: str, scan_layers: bool,
                   ignore: Sequence[str] = ()) -> Params:
  """Our params from an HF state by `entries`; every HF tensor must be used (or match
  `ignore`, regexes for buffers that carry no weights)."""
  get = StateReader(state, model_type, ignore)
  flat: dict[str, np.ndarray] = {}
  for e in entries:
    if isinstance(e, Tied):
      flat[e.ours] = _tied_from_hf(get, e, model_type)
    else:
      flat.update(zip(e.ours, e.from_hf(*map(get, e.hf)), strict=True))
  get.finish()
  return _stack_layers(_unflatten(flat), scan_layers)


def _tied_from_hf(get: StateReader, e: Tied, model_type: str) -> np.ndarray:
  present = [name for name in e.hf if get.has(name)]
  require(bool(present), f"{model_type} checkpoint lacks tensor {e.hf[0]!r}")
  value = get(present[0])
  for name in present[1:]:
    require(np.array_equal(get(name), value),
            f"{model_type} checkpoint's {name} differs from {present[0]}: {e.why}")
  return value


def params_to_hf(entries: list[Entry], params: Params, model_type: str) -> State:
  """The HF state of our params by `entries`; every param must be used."""
  flat = _flatten(_unstack_layers(params))
  used: set[str] = set()

  def take(path: str):
    require(path in flat, f"params lack {path!r}, which {model_type} needs")
    used.add(path)
    return flat[path]

  state: State = {}
  for e in entries:
    if isinstance(e, Tied):
      state.update(dict.fromkeys(e.hf, take(e.ours)))
    else:
      state.update(zip(e.hf, e.to_hf(*map(take, e.ours)), strict=True))
  left = sorted(set(flat) - used)
  require(not left, f"{model_type} has no place for params {', '.join(left[:5])}"
          f"{' ...' if len(left) > 5 else ''}: exporting would drop them; remove them "
          "(or merge them into the weights) first")
  return state


def _unflatten(flat: Mapping[str, Any]) -> Params:
  tree: Params = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """"a/b/c" -> leaf; an empty subtree counts as a leaf, so it is reported too."""
  if not isinstance(tree, Mapping) or not tree:
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
  return out


def _stack_layers(tree: Any, scan_layers: bool) -> Any:
  """Every `layers_0..layers_{n-1}` group as one stacked `layers` (nn.scan's layout)."""
  if not isinstance(tree, dict):
    return tree
  tree = {k: _stack_layers(v, scan_layers) for k, v in tree.items()}
  n = 0
  while f"layers_{n}" in tree:
    n += 1
  if n and scan_layers:
    blocks = [tree.pop(f"layers_{i}") for i in range(n)]
    tree["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *blocks)
  return tree


def _unstack_layers(tree: Any) -> Any:
  """Every stacked `layers` (leading layer axis) as `layers_0..`, whichever layout."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers" and isinstance(value, Mapping) and jax.tree_util.tree_leaves(value):
      for i in range(np.shape(jax.tree_util.tree_leaves(value)[0])[0]):
        out[f"layers_{i}"] = _unstack_layers(jax.tree_util.tree_map(lambda x, i=i: x[i], value))
    else:
      out[key] = _unstack_layers(value)
  return out

