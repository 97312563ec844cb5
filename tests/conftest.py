"""Test set-up: 8 simulated CPU devices, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# `python -m pytest` in the repository root puts the root on sys.path; importing ul2x
# first takes it off, before any test imports a library that probes a module named like
# one of our folders (tests/test_imports.py).
import ul2x  # noqa: E402,F401
