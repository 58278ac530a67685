"""The compression methods' settings (`config.compress`), nested in `llm.config.Config`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CompressConfig:
  """Distillation and pruning (`llm.compress`)."""

  teacher: str = ""  # distillation: the teacher's workdir (same tokenizer as the student)
  distill_alpha: float = 0.5  # weight of the soft-label KL; 1 - alpha on the hard labels
  distill_temperature: float = 2.0  # softens teacher and student logits; the KL is scaled by T^2
  sparsities: str = "0,0.25,0.5,0.75,0.9"  # pruning: target shares of zero weights
  prune_scopes: str = "global,layer"  # global and/or layer (each matrix to the sparsity)
  nm: str = "2:4"  # N:M structured sparsity (N non-zeros in every M); "" to skip
