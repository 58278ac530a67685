"""A raw corpus to curate: the embedded corpus degraded the way crawled text is.

Clean documents get navigation and cookie lines, planted personal data, exact copies
(re-spaced) and near copies (a few words edited); junk documents are added: markup
soup, base64 blobs, very short fragments, text in other scripts and repeated spam
lines. Everything is drawn from one seeded generator, and every document carries the
true list of its defects (`labels`, empty = clean) and the personal data planted in
it (`pii`), so a curation run can be scored filter by filter.

Duplicates are labelled by output order: the first copy of a document is the one a
deduplicator should keep; later exact copies are `exact_duplicate`, later edited ones
`near_duplicate`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from llm.data import cache

DEFECTS = ("boilerplate", "pii", "exact_duplicate", "near_duplicate", "markup", "base64",
           "fragment", "other_script", "repetitive")
# The defects each filter of `llm.data.curation` is meant to catch, for its precision
# and recall; a filter flags a document by dropping or changing it.
TARGETS = {
    "boilerplate": ("boilerplate",), "word_count": ("fragment",),
    "mean_word_length": ("base64", "other_script"),  # CJK text has no spaces: long "words"
    "symbol_ratio": ("markup",), "alpha_ratio": ("markup", "base64", "other_script"),
    "line_punctuation": ("markup", "base64", "fragment", "repetitive"),
    "duplicate_lines": ("repetitive",), "duplicate_ngrams": ("repetitive",),
    "language": ("other_script",), "exact_dedup": ("exact_duplicate",),
    "near_dedup": ("near_duplicate", "exact_duplicate"), "pii": ("pii",),
}


@dataclasses.dataclass(frozen=True)
class Rates:
  """Per clean document: the chance of each degradation, or the number of junk
  documents of each kind made per clean document."""

  boilerplate: float = 0.15
  pii: float = 0.10
  exact_duplicate: float = 0.08  # 1-3 copies each
  near_duplicate: float = 0.08
  markup: float = 0.08
  base64: float = 0.04
  fragment: float = 0.10
  other_script: float = 0.06
  repetitive: float = 0.04


_HEADERS = ("Home | About | Blog | Contact", "Skip to main content",
            "Products | Pricing | Docs | Support | Sign in", "Menu",
            "Home > Library > Reference > {word}", "Docs » Reference » {word}")
_FOOTERS = ("We use cookies to improve your experience. Accept all cookies.",
            "This site requires JavaScript to be enabled.",
            "\u00a9 2024 Example Media. All rights reserved.",
            "Privacy Policy | Terms of Use | Contact us",
            "Subscribe to our newsletter for weekly updates.",
            "Share this: Twitter | Facebook | LinkedIn", "Follow us on Mastodon", "Back to top")
_PII_SENTENCES = ("For questions about this page, write to {email}.",
                  "Contact {name} at {email} or call {phone}.",
                  "The build server for these examples runs at {ip}.",
                  "Support line: {phone} (weekdays).",
                  "Report problems to {email} or to the admin host {ip}.")
_PHONES = ("+1 ({a}) {b}-{c}", "({a}) {b}-{c}", "{a}-{b}-{c}", "{a}.{b}.{c}",
           "+44 20 {b} {c}", "+49 30 {b} {c}")
_SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "to", "vi", "dan", "el", "or", "pe", "ju")
_CYRILLIC = dict(zip("abcdefghijklmnopqrstuvwxyz", "абцдефгхийклмнопкрстуввхыз"))
_GREEK = dict(zip("abcdefghijklmnopqrstuvwxyz", "αβψδεφγηιξκλμνοπκρστθωωχυζ"))
_TAGS = ("div", "span", "a", "td", "li", "p", "b", "script")


def _word_list(text: str) -> list[str]:
  return re.findall(r"[A-Za-z]{2,}", text) or ["text"]


def _name(rng) -> str:
  return "".join(rng.choice(_SYLLABLES, int(rng.integers(2, 4)))).capitalize()


def _email(rng) -> str:
  domain = rng.choice(("example.org", "mail.example.com", "corp-example.net"))
  return f"{_name(rng).lower()}.{_name(rng).lower()}@{domain}"


def _phone(rng) -> str:
  digits = lambda n: "".join(str(d) for d in rng.integers(0, 10, n))
  return str(rng.choice(_PHONES)).format(a="5" + digits(2), b=digits(3), c=digits(4))


def _ip(rng) -> str:
  first = rng.choice(("10.0", "192.168", "172.16", "203.0"))
  return f"{first}.{rng.integers(0, 256)}.{rng.integers(1, 255)}"


def plant_pii(text: str, rng) -> tuple[str, list[str]]:
  """`text` with one or two sentences of made-up personal data inserted between
  paragraphs, and the planted strings."""
  paragraphs, planted = text.split("\n\n"), []
  for _ in range(int(rng.integers(1, 3))):
    values = {"email": _email(rng), "phone": _phone(rng), "ip": _ip(rng), "name": _name(rng)}
    sentence = str(rng.choice(_PII_SENTENCES))
    planted += [values[k] for k in ("email", "phone", "ip") if "{" + k + "}" in sentence]
    paragraphs.insert(int(rng.integers(0, len(paragraphs) + 1)), sentence.format(**values))
  return "\n\n".join(paragraphs), planted


def add_boilerplate(text: str, rng) -> str:
  word = str(rng.choice(_word_list(text))).capitalize()
  head = [str(h).format(word=word) for h in rng.choice(_HEADERS, int(rng.integers(1, 3)),
                                                       replace=False)]
  foot = list(rng.choice(_FOOTERS, int(rng.integers(1, 4)), replace=False))
  return "\n".join(head + [text] + [str(f) for f in foot])


def respace(text: str, rng) -> str:
  """An exact duplicate after normalisation: whitespace and case changed."""
  out = re.sub(r" ", lambda m: "  " if rng.random() < 0.05 else " ", text)
  out = "\n".join(line + " " * int(rng.integers(0, 3)) for line in out.split("\n"))
  return out.upper() if rng.random() < 0.2 else "\n" + out + "\n"


def edit_words(text: str, rng, fraction: float) -> str:
  """A near duplicate: about `fraction` of the words replaced, deleted or doubled."""
  tokens = re.split(r"( +)", text)
  vocabulary = _word_list(text)
  for i in range(0, len(tokens), 2):
    if tokens[i] and rng.random() < fraction:
      action = rng.integers(0, 3)
      tokens[i] = (str(rng.choice(vocabulary)) if action == 0 else
                   "" if action == 1 else f"{tokens[i]} {tokens[i]}")
  return "".join(tokens)


def markup_soup(source: str, rng) -> str:
  ws = _word_list(source)
  lines = []
  for _ in range(int(rng.integers(10, 40))):
    tag, w = rng.choice(_TAGS), rng.choice(ws, 3)
    lines.append(rng.choice((f'<{tag} class="{w[0]}">{w[1]} {w[2]}</{tag}>',
                             f"&nbsp;&raquo; {{{{ {w[0]} }}}} ## {w[1]} ...",
                             f"|| {w[0]} || {w[1]} || #{w[2]} ||",
                             f'<a href="/{w[0]}/{w[1]}">#</a> &amp; <{tag}/>')))
  return "\n".join(lines)


def base64_blob(rng) -> str:
  blob = base64.b64encode(rng.bytes(int(rng.integers(300, 3000)))).decode()
  kind = rng.choice(("image/png", "application/octet-stream", "font/woff2"))
  return "\n".join([f"data:{kind};base64,"] + [blob[i:i + 76] for i in range(0, len(blob), 76)])


def fragment(source: str, rng) -> str:
  ws = source.split()
  n = int(rng.integers(3, 16))
  start = int(rng.integers(0, max(1, len(ws) - n)))
  return " ".join(ws[start:start + n])


def other_script(source: str, rng) -> str:
  """The text carried into Cyrillic or Greek letter by letter, or into CJK characters
  word by word: another script, and to a language identifier not English."""
  script = rng.integers(0, 3)
  if script == 2:
    to_cjk = lambda m: "".join(chr(0x4E00 + (hash_word(m.group(0)) >> (5 * k)) % 20000)
                               for k in range(1 + len(m.group(0)) // 4))
    return re.sub(r"[A-Za-z]+", to_cjk, source)
  table = _CYRILLIC if script == 0 else _GREEK
  return "".join(table.get(c.lower(), c) for c in source)


def hash_word(word: str) -> int:
  return int(cache.fingerprint(word)[:12], 16)


def repetitive(source: str, rng) -> str:
  lines = [line for line in source.split("\n") if len(line.split()) >= 3] or [source[:80]]
  spam = [str(s) for s in rng.choice(lines, int(rng.integers(1, 3)))]
  return "\n".join(spam[int(rng.integers(0, len(spam)))] for _ in range(int(rng.integers(8, 30))))


def _normalized(text: str) -> str:
  return " ".join(text.lower().split())


def generate(documents: Sequence[str], seed: int = 0, rates: Rates = Rates()) -> list[dict]:
  """Records {"id", "text", "labels", "pii"} of the degraded corpus, in a shuffled order."""
  rng = np.random.default_rng(seed)
  items = []  # (text, labels, planted, duplicate group or -1)
  for group, doc in enumerate(documents):
    text, labels, planted = doc, [], []
    if rng.random() < rates.boilerplate:
      text, labels = add_boilerplate(text, rng), labels + ["boilerplate"]
    if rng.random() < rates.pii:
      text, planted = plant_pii(text, rng)
      labels = labels + ["pii"]
    items.append((text, labels, planted, group))
    if rng.random() < rates.exact_duplicate:
      items += [(respace(text, rng), labels, planted, group)
                for _ in range(int(rng.integers(1, 4)))]
    if rng.random() < rates.near_duplicate:
      items.append((edit_words(text, rng, rng.uniform(0.01, 0.04)), labels, planted, group))
  makers = {"markup": markup_soup, "fragment": fragment, "other_script": other_script,
            "repetitive": repetitive, "base64": lambda source, r: base64_blob(r)}
  for kind, make in makers.items():
    for _ in range(int(round(getattr(rates, kind) * len(documents)))):
      source = documents[int(rng.integers(0, len(documents)))]
      items.append((make(source, rng), [kind], [], -1))
  order = rng.permutation(len(items))
  records, first_of_group = [], {}
  for i, item in enumerate(items[j] for j in order):
    text, labels, planted, group = item
    if group >= 0 and group in first_of_group:
      same = _normalized(text) == _normalized(first_of_group[group])
      labels = labels + ["exact_duplicate" if same else "near_duplicate"]
    elif group >= 0:
      first_of_group[group] = text
    records.append({"id": i, "text": text, "labels": labels, "pii": planted})
  return records


def write_jsonl(records: Iterable[dict], path: str) -> None:
  """JSON lines the curation tool and the data pipeline read (`jsonl:PATH`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  cache.atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                  for r in records), mode="w")


def label_counts(records: Iterable[dict]) -> dict[str, int]:
  counts = dict.fromkeys(("clean",) + DEFECTS, 0)
  for record in records:
    for label in record["labels"] or ["clean"]:
      counts[label] += 1
  return counts
