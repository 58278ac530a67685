"""Document filters: each is a pure function `(text, params) -> text | None` (None drops
the document; a different text is a repair), so every shard is filtered independently.

The quality rules follow Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al.
2020) in what they measure; the thresholds in `configs/curate.py` are set for this
corpus (Python documentation: short docstrings, code samples, wrapped lines), and
the Gopher values are noted beside each so a crawl can use those instead.
"""

from __future__ import annotations

import collections
import functools
import re
from typing import Mapping, Optional

# --- words and lines -------------------------------------------------------------

_WORD = re.compile(r"\S+")
_TERMINAL = tuple(".!?:;\"')]`")  # a line ending one of these ends a sentence or a clause


def words(text: str) -> list[str]:
  return _WORD.findall(text)


def nonblank_lines(text: str) -> list[str]:
  return [line.strip() for line in text.split("\n") if line.strip()]


def word_count(text: str, params: Mapping) -> Optional[str]:
  """Gopher: 50 <= words <= 100,000."""
  n = len(words(text))
  return text if params["min_words"] <= n <= params["max_words"] else None


def mean_word_length(text: str, params: Mapping) -> Optional[str]:
  """Gopher: mean word length in [3, 10] characters (base64 and minified code are one
  long "word"; tables of numbers are short ones)."""
  ws = words(text)
  mean = sum(map(len, ws)) / len(ws) if ws else 0.0
  return text if params["min_length"] <= mean <= params["max_length"] else None


_SYMBOLS = re.compile(r"#|\.\.\.|\u2026|</?[A-Za-z][^<>\n]{0,40}>|&[a-z]+;|\{\{|\}\}|\|\|")


def symbol_ratio(text: str, params: Mapping) -> Optional[str]:
  """Gopher counts '#' and ellipses per word (<= 0.1); markup soup also shows as tags,
  HTML entities and template braces, so those count as symbols too."""
  n = max(1, len(words(text)))
  return text if len(_SYMBOLS.findall(text)) / n <= params["max_ratio"] else None


def alpha_ratio(text: str, params: Mapping) -> Optional[str]:
  """The share of non-space characters that are letters (any script); Gopher's form of
  the rule is >= 80% of words holding a letter."""
  chars = [c for c in text if not c.isspace()]
  letters = sum(c.isalpha() for c in chars)
  return text if chars and letters / len(chars) >= params["min_ratio"] else None


def line_punctuation(text: str, params: Mapping) -> Optional[str]:
  """C4 keeps only lines ending in terminal punctuation; as a document rule (FineWeb,
  >= 0.12) it drops pages of menus and fragments. Wrapped prose ends few lines with a
  stop, hence a low threshold."""
  lines = nonblank_lines(text)
  ending = sum(line.endswith(_TERMINAL) for line in lines)
  return text if lines and ending / len(lines) >= params["min_fraction"] else None


def duplicate_lines(text: str, params: Mapping) -> Optional[str]:
  """Gopher: lines that repeat an earlier line <= 30% of lines and <= 20% of characters."""
  lines = nonblank_lines(text)
  seen, dup_lines, dup_chars = set(), 0, 0
  for line in lines:
    if line in seen:
      dup_lines += 1
      dup_chars += len(line)
    seen.add(line)
  total_chars = max(1, sum(map(len, lines)))
  ok = (not lines or (dup_lines / len(lines) <= params["max_line_fraction"]
                      and dup_chars / total_chars <= params["max_char_fraction"]))
  return text if ok else None


def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
  return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def top_ngram_fraction(ws: list[str], n: int) -> float:
  """Characters in the most frequent n-gram's occurrences over all word characters."""
  grams = collections.Counter(_ngrams(ws, n))
  if not grams:
    return 0.0
  gram, count = grams.most_common(1)[0]
  return count * sum(map(len, gram)) / max(1, sum(map(len, ws)))


def duplicated_ngram_fraction(ws: list[str], n: int) -> float:
  """Characters of words covered by an n-gram that occurs more than once (Gopher)."""
  grams = collections.Counter(_ngrams(ws, n))
  covered = [False] * len(ws)
  for i, gram in enumerate(_ngrams(ws, n)):
    if grams[gram] > 1:
      covered[i:i + n] = [True] * n
  return sum(len(w) for w, c in zip(ws, covered) if c) / max(1, sum(map(len, ws)))


def duplicate_ngrams(text: str, params: Mapping) -> Optional[str]:
  """Gopher's repetition rules: the top 2/3/4-gram covers <= 20/18/16% of characters;
  characters in duplicated 5..10-grams <= 15..10%. One knob scales them all (1 = Gopher)."""
  ws, scale = [w.lower() for w in words(text)], params["scale"]
  for n, limit in ((2, 0.20), (3, 0.18), (4, 0.16)):
    if top_ngram_fraction(ws, n) > limit * scale:
      return None
  for n, limit in zip(range(5, 11), (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)):
    if duplicated_ngram_fraction(ws, n) > limit * scale:
      return None
  return text


# --- boilerplate -----------------------------------------------------------------

# Phrases, not words: documentation about cookies, JavaScript or logins is content.
_BOILERPLATE = re.compile(
    r"\b(we|this (web)?site) uses? cookies|accept (all )?cookies|cookie (policy|settings)|"
    r"(enable|requires?) javascript|javascript (is )?(required|disabled)|privacy policy|"
    r"terms of (use|service)|all rights reserved|skip to (main )?content|subscribe to|"
    r"newsletter|share (on|this)\b|follow us\b|^\W*(home|menu|back to top|sign (in|up))\W*$|"
    r"\u00a9", re.IGNORECASE)
_NAV_ITEM = re.compile(r"^[\w.&'-]+(\s+[\w.&'-]+){0,2}(\s+[|\u00bb\u203a>\u2022]\s+[\w.&'-]+"
                       r"(\s+[\w.&'-]+){0,2}){2,}$")


def is_boilerplate_line(line: str) -> bool:
  """C4's line rules (cookie / javascript / terms notices) plus navigation bars:
  short items joined by | > >> or bullets."""
  line = line.strip()
  return bool(_BOILERPLATE.search(line) or _NAV_ITEM.match(line))


def boilerplate(text: str, params: Mapping) -> Optional[str]:
  """Removes boilerplate lines; drops the page when they were most of it."""
  lines = text.split("\n")
  keep = [line for line in lines if not (line.strip() and is_boilerplate_line(line))]
  removed = len(lines) - len(keep)
  content = sum(1 for line in lines if line.strip())
  if removed == 0:
    return text
  if not content or removed / content > params["max_fraction"]:
    return None
  return "\n".join(keep).strip()


# --- language --------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _identifier():
  """py3langid's naive Bayes model (97 languages), which ships inside the package:
  nothing is downloaded. Loaded once per process (about a second)."""
  from py3langid.langid import MODEL_FILE, LanguageIdentifier
  return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
  """(ISO 639-1 code, probability) of the most likely language."""
  language, probability = _identifier().classify(text)
  return language, float(probability)


def language_probability(text: str, language_code: str) -> float:
  return dict(_identifier().rank(text)).get(language_code, 0.0)


def languages() -> tuple[str, ...]:
  """The codes the model knows."""
  return tuple(_identifier().nb_classes)


def language(text: str, params: Mapping) -> Optional[str]:
  """Keeps documents with P(params["language"]) >= min_score. The usual rule (fastText
  P(en) >= 0.65) would drop docstrings full of code, which score low but are not
  another language; text in another script scores ~0."""
  return text if language_probability(text, params["language"]) >= params["min_score"] else None


# --- personal data ---------------------------------------------------------------

EMAIL_PLACEHOLDER, PHONE_PLACEHOLDER, IP_PLACEHOLDER = "<EMAIL>", "<PHONE>", "<IP_ADDRESS>"
EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                   r"\.[A-Za-z]{2,}\b")
# Separated groups (optionally +country code, area code in brackets): plain digit runs,
# dates (2024-01-31), versions and decimals never have this shape.
PHONE = re.compile(r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})[ .-]?|\(\d{3}\)[ .-]?"
                   r"|\d{3}[ .-])\d{3,4}[ .-]\d{4}(?![\w-]|\.\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")


def scrub(text: str) -> str:
  """E-mail addresses, phone numbers and IPv4 addresses replaced by placeholders."""
  text = EMAIL.sub(EMAIL_PLACEHOLDER, text)
  text = IPV4.sub(IP_PLACEHOLDER, text)
  return PHONE.sub(PHONE_PLACEHOLDER, text)


def pii(text: str, params: Mapping) -> Optional[str]:
  del params
  return scrub(text)
