"""Ablation sweeps: trials as config overrides, run from an Optuna study, reported.

  spec.py     sweep helpers (sweep / product / zipit / chain), names, validation
  study.py    the Optuna study: queue, claims, attempts, heartbeats
  worker.py   a worker process running claimed trials in their own workdirs
  runner.py   the launcher (validate, record, queue, spawn workers)
  results.py  a trial's results from its workdir
  report.py   results.csv / results.md / plots of a sweep directory
  isoflop.py  IsoFLOP (Chinchilla approach 2) fits
"""

from llm.sweep.spec import chain, product, sweep, zipit
