"""Eight simulated CPU devices, so sharding is tested without accelerators.

Set before jax is imported anywhere in the test session.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
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
