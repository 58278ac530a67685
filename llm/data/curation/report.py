"""What each filter did: documents and bytes in and out, examples, and (when the input
carries true defect labels, as the generated raw corpus does) precision and recall.

Counts are kept per shard and summed, so the report is the same however the work was
split. Labels are counted by their combination ("boilerplate+pii"; "clean" = none),
which is what precision against any set of target defects needs.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

_QUOTE = 240  # characters of a removed document quoted in the report


def empty_stats() -> dict:
  return {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0, "changed": 0,
          "labels_in": {}, "labels_removed": {}, "labels_changed": {},
          "removed_examples": [], "changed_examples": []}


def _combo(labels) -> str:
  return "+".join(sorted(labels)) if labels else "clean"


def _difference(before: str, after: str) -> dict:
  """The first place the texts differ, with some context on each side."""
  i = next((k for k, (a, b) in enumerate(zip(before, after)) if a != b),
           min(len(before), len(after)))
  lo = max(0, i - 60)
  return {"before": before[lo:i + 120], "after": after[lo:i + 120]}


def count(stats: dict, record: Mapping, before: str, after: Optional[str], examples: int):
  """Adds one document's passage through a filter (after None = removed)."""
  stats["docs_in"] += 1
  stats["bytes_in"] += len(before.encode("utf-8"))
  labels = record["labels"]
  combo = _combo(labels) if labels is not None else None

  def bump(key):
    stats[key][combo] = stats[key].get(combo, 0) + 1

  if combo is not None:
    bump("labels_in")
  if after is None:
    if combo is not None:
      bump("labels_removed")
    if len(stats["removed_examples"]) < examples:
      stats["removed_examples"].append({"id": record["id"], "text": before[:_QUOTE]})
    return
  stats["docs_out"] += 1
  stats["bytes_out"] += len(after.encode("utf-8"))
  if after != before:
    stats["changed"] += 1
    if combo is not None:
      bump("labels_changed")
    if len(stats["changed_examples"]) < examples:
      stats["changed_examples"].append({"id": record["id"], **_difference(before, after)})


def merge(parts: Sequence[dict], examples: Optional[int] = None) -> dict:
  total = empty_stats()
  for part in parts:
    for key, value in part.items():
      if isinstance(value, dict):
        for combo, n in value.items():
          total[key][combo] = total[key].get(combo, 0) + n
      elif isinstance(value, list):
        total[key].extend(value)
      else:
        total[key] += value
  if examples is not None:
    total["removed_examples"] = total["removed_examples"][:examples]
    total["changed_examples"] = total["changed_examples"][:examples]
  return total


def _hits(counts: Mapping[str, int], targets: Sequence[str]) -> int:
  return sum(n for combo, n in counts.items() if set(combo.split("+")) & set(targets))


def scores(stats: Mapping, targets: Sequence[str]) -> dict:
  """Precision: share of the documents the filter flagged (removed or changed) that
  carry a target defect. Recall: share of the documents with a target defect that
  reached the filter and were flagged."""
  flagged = _sum_counts(stats["labels_removed"], stats["labels_changed"])
  n_flagged, hits = sum(flagged.values()), _hits(flagged, targets)
  n_targets = _hits(stats["labels_in"], targets)
  return {"precision": hits / n_flagged if n_flagged else None,
          "recall": hits / n_targets if n_targets else None,
          "clean_flagged": flagged.get("clean", 0), "targets_seen": n_targets}


def _sum_counts(*counts: Mapping[str, int]) -> dict:
  out: dict[str, int] = {}
  for c in counts:
    for k, n in c.items():
      out[k] = out.get(k, 0) + n
  return out


def build(chain: Sequence[str], per_phase: Sequence[Sequence[dict]], source: str,
          examples: int, targets: Optional[Mapping[str, Sequence[str]]] = None) -> dict:
  """The report of a run from per-phase, per-shard stats ({filter: stats})."""
  by_filter = {}
  for shards in per_phase:
    for name in shards[0]:
      by_filter[name] = merge([shard[name] for shard in shards], examples)
  rows = [{"filter": name, **by_filter[name]} for name in chain]
  labelled = bool(rows) and sum(rows[0]["labels_in"].values()) == rows[0]["docs_in"]
  for row in rows:
    if labelled and targets and row["filter"] in targets:
      row.update(scores(row, targets[row["filter"]]))
  first, last = rows[0], rows[-1]
  out = {"input": source, "docs_in": first["docs_in"], "bytes_in": first["bytes_in"],
         "docs_out": last["docs_out"], "bytes_out": last["bytes_out"],
         "kept_docs": last["docs_out"] / max(1, first["docs_in"]),
         "kept_bytes": last["bytes_out"] / max(1, first["bytes_in"]), "filters": rows}
  if labelled:
    removed = _sum_counts(*(row["labels_removed"] for row in rows))
    out["labels"] = {}
    for label in _labels(first["labels_in"]):
      n_in, n_removed = _label_total(first["labels_in"], label), _label_total(removed, label)
      out["labels"][label] = {"in": n_in, "removed": n_removed, "kept": n_in - n_removed}
  return out


def _labels(counts: Mapping[str, int]) -> list[str]:
  return sorted({label for combo in counts for label in combo.split("+")})


def _label_total(counts: Mapping[str, int], label: str) -> int:
  return sum(n for combo, n in counts.items() if label in combo.split("+"))


def _pct(x: Optional[float]) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def markdown(report: Mapping) -> str:
  """The report as tables: per filter in order, then per true label when known."""
  lines = [f"input {report['input']}: {report['docs_in']} documents, {report['bytes_in']} "
           f"bytes; kept {report['docs_out']} documents ({_pct(report['kept_docs'])}), "
           f"{report['bytes_out']} bytes ({_pct(report['kept_bytes'])})", "",
           "| filter | docs in | docs out | removed | changed | bytes in | bytes out | "
           "precision | recall | clean flagged |", "|" + "---|" * 10]
  for row in report["filters"]:
    lines.append(f"| {row['filter']} | {row['docs_in']} | {row['docs_out']} | "
                 f"{row['docs_in'] - row['docs_out']} | {row['changed']} | {row['bytes_in']} | "
                 f"{row['bytes_out']} | {_pct(row.get('precision'))} | "
                 f"{_pct(row.get('recall'))} | {row.get('clean_flagged', '-')} |")
  if "labels" in report:
    lines += ["", "| true label | documents | removed by the chain | kept |", "|---|---|---|---|"]
    lines += [f"| {label} | {c['in']} | {c['removed']} ({_pct(c['removed'] / max(1, c['in']))}) "
              f"| {c['kept']} |" for label, c in report["labels"].items()]
  for row in report["filters"]:
    quotes = [f"removed: {' '.join(e['text'].split())[:120]!r}" for e in row["removed_examples"]]
    quotes += [f"changed to: {' '.join(e['after'].split())[:120]!r}"
               for e in row["changed_examples"]]
    if quotes:
      lines += ["", f"{row['filter']}:"] + [f"  - {q}" for q in quotes]
  return "\n".join(lines) + "\n"
