"""Eight simulated CPU devices, so sharding is tested without accelerators.

Set before jax is imported anywhere in the test session.
"""

import os

# The suite is compile-bound on tiny shapes: XLA:CPU's lowest backend optimisation level
# about halves compile time and leaves the HLO (sharding, arithmetic) as it is.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Threefry's per-param random draws dominate compiling `init` on CPU (about 3x the
# compile time of rbg, measured on the tiny LLaMA); tests need independence, not the
# cross-platform reproducibility threefry gives.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "unsafe_rbg")
# One persistent compilation cache per test run, shared by the xdist workers and the
# subprocesses the entry-point and kill tests start: identical programs compile once.
# (The path must be the same string everywhere: it is part of the compile options' key.)
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", f"/tmp/llm-test-jax-cache-{_RUN}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The slowest files first, heaviest first (per-file test seconds of a full run), so the
# two xdist workers finish together: `--dist loadfile` hands out whole files in
# collection order, and a slow file handed out last leaves one worker idle to the end.
# xdist's default reorder (by test count) would put few-test slow files (the kill chain,
# the two-process job) last. A stale list costs only balance, never a check.
SLOWEST_FILES = ("test_entrypoints.py", "test_parallel.py", "test_reliability.py",
                 "test_peft.py", "test_finetune.py", "test_sweep.py", "test_decode_state.py",
                 "test_multihost.py", "test_decode_speculative.py", "test_train.py",
                 "test_decode_beam.py", "test_inference.py", "test_quant.py", "test_align.py",
                 "test_moe_model.py", "test_encoder_decoder.py", "test_step_pieces.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False  # keep the order below


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within files
