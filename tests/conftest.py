"""Test-wide settings: fully offline, quiet, small thread pools (2-core machine)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# One persistent XLA compilation cache for the session, shared by the xdist workers and the CLI processes the
# tests start. Why: most of the suite's CPU time is compiling the same small programs again -- a straight
# run and its resumed twin, every trainer test's tiny heads -- because each run builds new closures, which
# jax's in-memory cache cannot match. The persistent cache matches on the compiled program itself, so a
# second run of the same shapes loads the first one's executable (the same binary: bit-for-bit tests are
# unaffected). Set here, in the controller, before the workers start (they inherit the environment); a
# fresh directory per session, removed at its end: nothing carries over between runs of the suite.
_CACHE_ENV = "A2V_TEST_XLA_CACHE"
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
  import tempfile
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="a2v_jax_test_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_CACHE_ENV])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  if _OWN_CACHE:
    import shutil
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
