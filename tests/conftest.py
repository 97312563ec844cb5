"""Test set-up: 8 simulated CPU devices, set before JAX is imported."""

import os

# XLA:CPU aborts the process when a simulated device's thread waits at a collective past
# its timeout; on 2 busy cores a ring test's worker died that way (likely this), so the
# tests let a collective wait 15 minutes. LLVM's costlier optimisation passes are left
# out (level 1, no expensive passes): the tests' programs are tiny, so compiling is most
# of their time, and this cuts it by about 30% with steps as fast as before (level 0
# compiles faster still but doubles the step time; docs/development.md). Subprocesses get
# the same flags (cli_utils.cpu_env), so a job's numbers there equal its numbers here.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_timeout_seconds=900"
    " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    " --xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# No persistent compilation cache: with jax 0.10.2 on 8 simulated CPU devices, a ring
# attention train step loaded from it by a process that had already run another job hung
# for good in its first step (docs/development.md), the cause of the suite's stalls.

# `python -m pytest` in the repository root puts the root on sys.path; importing ul2x
# first hides our folders there, before any test imports a library that probes a module
# named like one of them (tests/test_imports.py).
import ul2x  # noqa: E402,F401

# Files by their time on 2 cores, longest first (measured 2026-12-07 and 08): `--dist
# loadfile` hands files to the workers in this order, so the last ones handed out are
# short and neither worker waits long for the other at the end.
SLOW_FILES = ("test_train_job.py", "test_docs.py", "test_jobs.py", "test_flash_attention.py",
              "test_multiprocess_data.py", "test_ul2_cli.py", "test_export.py",
              "test_cached_decoding.py", "test_moe_train.py", "test_cli.py", "test_lm_eval.py",
              "test_moe.py", "test_dry_run.py", "test_ring_attention.py", "test_model.py",
              "test_glue.py", "test_serving.py", "test_record.py", "test_train_hooks.py",
              "test_grouped_matmul_pallas.py", "test_partitioning.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))
