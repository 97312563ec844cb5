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

# Files of minutes first: `--dist loadfile` hands files to workers in this order, so that
# no worker starts a long file when the other is nearly done.
SLOW_FILES = ("test_train_job.py", "test_multiprocess_data.py", "test_jobs.py",
              "test_docs.py", "test_flash_attention.py", "test_ul2_cli.py", "test_cli.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))
