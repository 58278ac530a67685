"""Tests of the pretraining objectives: MLM masking, span corruption, prefix LM.

Statistics are checked on large samples within 4 standard deviations, on a
synthetic vocabulary: ids 0-3 pad/eos/bos/unk, 4 mask, 5..SENTINEL_END sentinels.
"""

import numpy as np
import pytest

from llm.layers.attention import prefix_lm_mask
from llm.data import objectives as obj
from llm.data import packing, train_tokenizer

VOCAB = 1000
PAD, EOS, BOS, UNK, MASK = 0, 1, 2, 3, 4
SENTINELS = list(range(5, 105))
SPECIALS = [PAD, EOS, BOS, UNK, *SENTINELS]
FIRST_WORD_ID = 105  # ordinary tokens are [FIRST_WORD_ID, VOCAB)


def assert_binomial(count, n, p, sigmas=4.0, variance=None):
  """count is within `sigmas` standard deviations of Binomial(n, p)'s mean."""
  std = np.sqrt(n * p * (1 - p) if variance is None else variance)
  assert abs(count - n * p) <= sigmas * std + 1, (count, n * p, std)


def random_tokens(rng, shape, special_fraction=0.05):
  """Ordinary tokens with specials sprinkled in and a padded tail per row."""
  tokens = rng.integers(FIRST_WORD_ID, VOCAB, shape).astype(np.int32)
  specials = rng.random(shape) < special_fraction
  tokens[specials] = rng.choice(SPECIALS + [MASK], specials.sum())
  valid = np.arange(shape[1])[None, :] < rng.integers(shape[1] // 2, shape[1] + 1, (shape[0], 1))
  tokens[~valid] = PAD
  return tokens, valid


def mask_kwargs(**overrides):
  return dict(dict(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS), **overrides)


# --- masked LM ----------------------------------------------------------------

@pytest.mark.parametrize("p, mask_ratio, random_ratio", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.25)])
def test_mlm_mask_statistics(p, mask_ratio, random_ratio):
  rng = np.random.default_rng(0)
  tokens, valid = random_tokens(rng, (400, 256))
  out = obj.mlm_mask(tokens, rng, **mask_kwargs(mlm_probability=p, mask_ratio=mask_ratio,
                                                random_ratio=random_ratio), valid_BT=valid)
  inputs, selected = out["inputs"], out["weights"] == 1
  eligible = valid & (tokens >= FIRST_WORD_ID)
  np.testing.assert_array_equal(out["targets"], tokens)
  assert set(np.unique(out["weights"])) <= {0.0, 1.0}
  assert not (selected & ~eligible).any()  # specials, mask and padding never selected
  assert not ((inputs != tokens) & ~selected).any()  # only selected tokens change
  assert_binomial(selected.sum(), eligible.sum(), p)

  n = selected.sum()
  masked = selected & (inputs == MASK)
  randomized = selected & (inputs != MASK) & (inputs != tokens)
  kept = selected & (inputs == tokens)
  replacements = inputs[randomized]
  assert ((replacements >= FIRST_WORD_ID) & (replacements < VOCAB)).all()
  # A random replacement equals the original with probability 1 / (candidates).
  collide = random_ratio / (VOCAB - FIRST_WORD_ID)
  assert_binomial(masked.sum(), n, mask_ratio)
  assert_binomial(randomized.sum(), n, random_ratio - collide)
  assert_binomial(kept.sum(), n, 1 - mask_ratio - random_ratio + collide)


def test_mlm_mask_is_deterministic():
  tokens, valid = random_tokens(np.random.default_rng(1), (8, 64))
  a = obj.mlm_mask(tokens, 7, **mask_kwargs(), valid_BT=valid)
  b = obj.mlm_mask(tokens, np.random.default_rng(7), **mask_kwargs(), valid_BT=valid)
  c = obj.mlm_mask(tokens, 8, **mask_kwargs(), valid_BT=valid)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["weights"], c["weights"])


def words_of_row(starts, eligible):
  """Index lists of the words of one row, by a plain loop over the tokens."""
  words, current = [], []
  for t, (start, ok) in enumerate(zip(starts, eligible)):
    if current and (start or not ok):
      words.append(current)
      current = []
    if ok:
      current.append(t)
  return words + [current] if current else words


def test_whole_word_masking_selects_whole_words():
  rng = np.random.default_rng(2)
  tokens, valid = random_tokens(rng, (600, 128))
  word_start = rng.random(tokens.shape) < 0.4  # words of 2.5 pieces on average
  out = obj.mlm_mask(tokens, rng, **mask_kwargs(), word_start_BT=word_start, valid_BT=valid)
  selected = out["weights"] == 1
  eligible = valid & (tokens >= FIRST_WORD_ID)
  assert not (selected & ~eligible).any()
  square_lengths = 0
  for b in range(len(tokens)):
    for word in words_of_row(word_start[b], eligible[b]):
      assert selected[b, word].all() or not selected[b, word].any(), (b, word)
      square_lengths += len(word) ** 2
  # Words are drawn, not tokens: Var(selected tokens) = p (1 - p) sum(len^2).
  assert_binomial(selected.sum(), eligible.sum(), 0.15,
                  variance=0.15 * 0.85 * square_lengths)
  assert not ((out["inputs"] != tokens) & ~selected).any()


@pytest.mark.parametrize("kwargs, field", [
    (dict(mlm_probability=0.0), "config.data.mlm_probability"),
    (dict(mlm_probability=1.0), "config.data.mlm_probability"),
    (dict(mlm_probability=float("nan")), "config.data.mlm_probability"),
    (dict(mask_ratio=1.2), "config.data.mlm_mask_ratio"),
    (dict(random_ratio=-0.1), "config.data.mlm_random_ratio"),
    (dict(mask_ratio=0.8, random_ratio=0.3), "config.data.mlm_random_ratio"),
])
def test_mlm_mask_bad_ratios(kwargs, field):
  tokens, _ = random_tokens(np.random.default_rng(0), (2, 8))
  with pytest.raises(ValueError, match=f"^{field}=") as error:
    obj.mlm_mask(tokens, 0, **mask_kwargs(**kwargs))
  assert "\n" not in str(error.value)


class FakeTokenizer:
  pieces = ["<pad>", "</s>", "<s>", "<unk>", "<mask>", "\u2581the", "re", "\u2581cat",
            "s", "\u2581", "<0xC3>", "."]
  vocab_size = len(pieces)

  def id_to_piece(self, i):
    return self.pieces[i]


def test_word_starts_from_pieces():
  tokens = np.array([[5, 6, 7, 8, 11], [9, 10, 10, 5, 0]])
  expected = [[True, False, True, False, False], [True, False, False, True, False]]
  np.testing.assert_array_equal(obj.word_starts(tokens, FakeTokenizer()), expected)


def test_word_starts_with_a_trained_tokenizer(tmp_path):
  words = "the quick brown fox jumps over a lazy dog while birds sing".split()
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, 30)) for _ in range(100)]
  tok = train_tokenizer(texts, 300, tmp_path / "tokenizer.model", num_sentinels=10)
  text = "the lazy birds jump over brownish foxes"
  ids = np.array([tok.encode(text)])
  starts = obj.word_starts(ids, tok)
  assert starts.sum() == len(text.split())
  assert [tok.id_to_piece(i).startswith("\u2581") for i in ids[0]] == starts[0].tolist()
  out = obj.mlm_mask(ids, 0, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                     special_ids=obj.special_ids(tok), mlm_probability=0.5,
                     word_start_BT=starts)
  selected = out["weights"][0] == 1
  for word in words_of_row(starts[0], np.ones_like(starts[0])):
    assert len(set(selected[word])) == 1


def test_build_mlm_rows_wraps_and_packs_pieces():
  rng = np.random.default_rng(3)
  docs = [rng.integers(FIRST_WORD_ID, VOCAB, n) for n in rng.integers(1, 70, 60)]
  seq_len = 32
  rows = obj.build_mlm_rows(docs, seq_len, cls_id=BOS, sep_id=EOS, pad_id=PAD)
  tokens, segments, positions = rows["tokens"], rows["segment_ids"], rows["positions"]
  assert tokens.shape == segments.shape == positions.shape and tokens.shape[1] == seq_len
  pieces = []
  for b in range(len(tokens)):
    assert (tokens[b][segments[b] == 0] == PAD).all()
    for s in range(1, segments[b].max() + 1):
      at = np.flatnonzero(segments[b] == s)
      assert (np.diff(at) == 1).all()  # a piece is contiguous
      np.testing.assert_array_equal(positions[b, at], np.arange(len(at)))
      assert tokens[b, at[0]] == BOS and tokens[b, at[-1]] == EOS
      pieces.append(tuple(tokens[b, at[1:-1]]))
  # The pieces are the documents cut every seq_len - 2 ids (1-id remainders dropped).
  expected = [tuple(d[i:i + seq_len - 2]) for d in docs for i in range(0, len(d), seq_len - 2)]
  assert sorted(pieces) == sorted(p for p in expected if len(p) >= 2)
  assert (segments > 0).mean() > 0.9  # best-fit packing fills the rows

  batch = obj.mlm_batch(rows, 0, **mask_kwargs(mlm_probability=0.5))
  selected = batch["weights"] == 1
  assert not (selected & ((segments == 0) | (tokens == BOS) | (tokens == EOS))).any()
  assert selected.any()
  np.testing.assert_array_equal(batch["segment_ids"], segments)


# --- span corruption ----------------------------------------------------------

def run_lengths(row):
  """Lengths of the runs of True in a boolean row."""
  edges = np.flatnonzero(np.diff(np.pad(row, 1).astype(np.int8)))
  return edges[1::2] - edges[::2]


def test_noise_mask_counts_and_spans():
  length, density, mean_span = 568, 0.15, 3.0
  noise = obj.random_spans_noise_masks(4000, length, 0, density, mean_span)
  num_noise = round(length * density)
  num_spans = round(num_noise / mean_span)
  assert (noise.sum(axis=1) == num_noise).all()
  assert not noise[:, 0].any()  # T5 starts with non-noise
  spans = [run_lengths(row) for row in noise[:500]]
  assert all(len(s) == num_spans for s in spans)
  assert abs(np.concatenate(spans).mean() - mean_span) < 0.1
  # Span lengths are a uniformly random composition: every span has the same mean.
  first = np.array([s[0] for s in spans])
  last = np.array([s[-1] for s in spans])
  expected_std = np.concatenate(spans).std() / np.sqrt(len(spans))
  for lengths in (first, last):
    assert abs(lengths.mean() - num_noise / num_spans) < 4 * expected_std
  assert first.min() == 1 and first.max() > 3 * mean_span
  # Across lengths the noise fraction is the density up to rounding.
  sizes = np.arange(20, 600, 7)
  fractions = [obj.random_spans_noise_mask(n, n, density, mean_span).mean() for n in sizes]
  assert abs(np.mean(fractions) - density) < 0.01


def without_final_eos(row):
  """The row without its padding and the eos that ends it (eos may also be data)."""
  real = [int(t) for t in row if t != PAD]
  assert real[-1] == EOS
  return real[:-1]


def spans_of_targets(targets):
  """{sentinel: tokens} of decoder targets."""
  spans, current = {}, None
  for t in without_final_eos(targets):
    if t in SENTINELS:
      current = spans.setdefault(int(t), [])
    else:
      current.append(int(t))
  return spans


def uncorrupt(encoder, targets):
  """The original tokens: each sentinel in the encoder input replaced by its span."""
  spans, out = spans_of_targets(targets), []
  for t in without_final_eos(encoder):
    out.extend(spans[t] if t in SENTINELS else [t])
  return out


def sentinels_in(row):
  return [int(t) for t in row if t in SENTINELS]


@pytest.mark.parametrize("inputs_length, density, mean_span", [(64, 0.15, 3.0), (128, 0.3, 5.0)])
def test_corrupt_spans_round_trip_and_lengths(inputs_length, density, mean_span):
  rng = np.random.default_rng(4)
  tokens_length, targets_length = obj.span_corruption_lengths(inputs_length, density, mean_span)
  chunks = rng.integers(FIRST_WORD_ID, VOCAB, (300, tokens_length)).astype(np.int32)
  out = obj.corrupt_spans(chunks, rng, SENTINELS, EOS, PAD, density, mean_span)
  assert out["encoder_inputs"].shape == (300, inputs_length)
  assert out["decoder_targets"].shape == (300, targets_length)
  assert (out["encoder_inputs"][:, -1] == EOS).all()
  assert (out["decoder_targets"][:, -1] == EOS).all()
  assert (out["encoder_segment_ids"] == 1).all() and (out["decoder_weights"] == 1).all()
  np.testing.assert_array_equal(out["decoder_inputs"][:, 0], PAD)
  np.testing.assert_array_equal(out["decoder_inputs"][:, 1:], out["decoder_targets"][:, :-1])
  noise_tokens = 0
  for chunk, encoder, targets in zip(chunks, out["encoder_inputs"], out["decoder_targets"]):
    assert uncorrupt(encoder, targets) == chunk.tolist()
    used = sentinels_in(encoder)
    assert used == SENTINELS[:len(used)] == sentinels_in(targets)  # in increasing order
    noise_tokens += sum(len(s) for s in spans_of_targets(targets).values())
  assert abs(noise_tokens / chunks.size - density) <= 0.5 / tokens_length + 1e-9


def test_build_span_corruption_rows_covers_the_documents():
  rng = np.random.default_rng(5)
  docs = [rng.integers(FIRST_WORD_ID, VOCAB, n) for n in rng.integers(1, 300, 40)]
  rows = obj.build_span_corruption_rows(docs, 64, 6, SENTINELS, EOS, PAD)
  _, targets_length = obj.span_corruption_lengths(64)
  assert rows["encoder_inputs"].shape[1] == 64
  assert rows["decoder_targets"].shape[1] == targets_length
  restored = [t for e, d in zip(rows["encoder_inputs"], rows["decoder_targets"])
              for t in uncorrupt(e, d)]
  flat = [t for d in docs for t in [*d.tolist(), EOS]]
  # Every full chunk is exact; a 1-token tail cannot be corrupted and is dropped.
  assert restored == flat[:len(restored)] and len(flat) - len(restored) <= 1
  real = rows["decoder_targets"] != PAD
  np.testing.assert_array_equal(rows["decoder_weights"], real)
  np.testing.assert_array_equal(rows["encoder_segment_ids"], rows["encoder_inputs"] != PAD)


def test_span_corruption_single_sequence():
  tokens = list(range(200, 300))
  encoder, targets = obj.span_corruption(tokens, 0, SENTINELS, EOS)
  assert uncorrupt(encoder, targets) == tokens
  assert encoder[-1] == EOS and targets[-1] == EOS and targets[0] == SENTINELS[0]
  again = obj.span_corruption(tokens, 0, SENTINELS, EOS)
  np.testing.assert_array_equal(encoder, again[0])


def t5_random_spans_helper(inputs_length, noise_density, mean_span_length):
  """T5's random_spans_helper (no extra tokens per span, no 0.5-density hack)."""
  def lengths(tokens_length):
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_span_length))
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1
  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, lengths(tokens_length)[1]


def test_span_corruption_lengths_match_t5():
  assert obj.span_corruption_lengths(512) == (568, 114)  # T5's published numbers
  for density, mean_span in ((0.15, 3.0), (0.3, 8.0), (0.5, 3.0)):
    for inputs_length in (32, 100, 626, 1024):
      assert (obj.span_corruption_lengths(inputs_length, density, mean_span) ==
              t5_random_spans_helper(inputs_length, density, mean_span))
  for inputs_length in range(3, 300, 13):
    tokens_length, targets_length = obj.span_corruption_lengths(inputs_length)
    encoder, targets = obj.span_corruption(np.arange(tokens_length) + 200, 0, SENTINELS, EOS)
    assert (len(encoder), len(targets)) == (inputs_length, targets_length)


@pytest.mark.parametrize("kwargs, field", [
    (dict(noise_density=0.0), "config.data.noise_density"),
    (dict(noise_density=1.0), "config.data.noise_density"),
    (dict(mean_span_length=0.5), "config.data.mean_span_length"),
])
def test_span_corruption_bad_settings(kwargs, field):
  for call in (lambda: obj.span_corruption_lengths(64, **kwargs),
               lambda: obj.random_spans_noise_mask(64, 0, **kwargs),
               lambda: obj.build_span_corruption_rows([[200] * 99], 64, 0, SENTINELS, **kwargs)):
    with pytest.raises(ValueError, match=f"^{field}=") as error:
      call()
    assert "\n" not in str(error.value)


def test_span_corruption_needs_enough_sentinels():
  with pytest.raises(ValueError, match="config.data.num_sentinels"):
    obj.span_corruption(np.arange(200, 400), 0, SENTINELS[:3], EOS)


# --- prefix LM ----------------------------------------------------------------

def reference_prefix_mask(segments, prefix):
  """mask[b, q, k] by a plain loop, to check the jnp version against."""
  mask = np.zeros(segments.shape + segments.shape[1:], bool)
  for (b, q, k), _ in np.ndenumerate(mask):
    same = segments[b, q] == segments[b, k]
    mask[b, q, k] = same and (k <= q or (prefix[b, q] and prefix[b, k]))
  return mask


def test_prefix_lm_rows_and_mask():
  rng = np.random.default_rng(6)
  docs = [rng.integers(FIRST_WORD_ID, VOCAB, n) for n in rng.integers(1, 40, 40)]
  rows = obj.prefix_lm_rows(docs, 32, 0)
  plain = packing.pack_documents(docs, 32)
  for name in ("inputs", "targets", "segment_ids", "positions"):
    np.testing.assert_array_equal(rows[name], plain[name])
  segments, positions, prefix = rows["segment_ids"], rows["positions"], rows["prefix"]
  weights = rows["weights"]
  assert not (prefix & (segments == 0)).any()
  assert (prefix[positions == 0] | (segments[positions == 0] == 0)).all()
  next_in_prefix = np.pad(prefix, ((0, 0), (0, 1)))[:, 1:] & (
      np.pad(segments, ((0, 0), (0, 1)))[:, 1:] == segments)
  # The loss is on exactly the real targets that are not prefix tokens.
  np.testing.assert_array_equal(weights, plain["weights"] * ~next_in_prefix)
  assert 0.2 < weights.sum() / plain["weights"].sum() < 0.8

  mask = np.asarray(prefix_lm_mask(segments, prefix))
  np.testing.assert_array_equal(mask, reference_prefix_mask(segments, prefix))
  b, t = np.nonzero(weights[:, :-1])
  leaks = mask[b, t, t + 1] & (segments[b, t + 1] == segments[b, t])
  assert not leaks.any()  # no weighted position sees the token it predicts
  both = prefix[:, :, None] & prefix[:, None, :] & (segments[:, :, None] == segments[:, None, :])
  assert (mask[both] & np.swapaxes(mask, 1, 2)[both]).all()  # prefix sees prefix both ways
  assert not (mask & (segments[:, :, None] != segments[:, None, :])).any()
  np.testing.assert_array_equal(obj.prefix_lm_rows(docs, 32, 0)["prefix"], prefix)


# --- per-step determinism ------------------------------------------------------
# (Their speed is measured by benchmarks/data_batches.py, not asserted here.)

def test_batches_depend_only_on_the_generator_state():
  """A resumed run re-draws step s's batch from a generator seeded by (seed, s): the same
  state gives the same batch, another state another one."""
  rng = np.random.default_rng(7)
  tokens, valid = random_tokens(rng, (32, 256))
  word_start = rng.random(tokens.shape) < 0.5
  tokens_length, _ = obj.span_corruption_lengths(256)
  chunks = rng.integers(FIRST_WORD_ID, VOCAB, (32, tokens_length))
  rows = packing.pack_documents([rng.integers(FIRST_WORD_ID, VOCAB, 100)] * 90, 256)
  rows = {name: array[:32] for name, array in rows.items()}
  for fn in (lambda g: obj.mlm_mask(tokens, g, **mask_kwargs(), valid_BT=valid),
             lambda g: obj.mlm_mask(tokens, g, **mask_kwargs(), word_start_BT=word_start),
             lambda g: obj.corrupt_spans(chunks, g, SENTINELS, EOS, PAD),
             lambda g: obj.prefix_lm_split(rows, g)):
    a, b, c = (fn(np.random.default_rng(seed)) for seed in ([0, 5], [0, 5], [0, 6]))
    a, b, c = (x if isinstance(x, dict) else dict(enumerate(x)) for x in (a, b, c))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
