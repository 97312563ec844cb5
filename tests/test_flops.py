"""The analytic training FLOP count agrees with XLA's cost analysis of the real step; MFU's
data-sheet peaks by device kind; the train step imports without TensorFlow."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ul2x.model import TransformerConfig, build_model
from ul2x.model.flops import training_flops_per_example
from ul2x.partitioning import topologies

CFG = dict(vocab_size=256, emb_dim=128, num_heads=4, head_dim=32, mlp_dim=512,
           num_encoder_layers=2, num_decoder_layers=2)


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_flop_count_matches_xla(architecture):
  cfg = TransformerConfig(architecture=architecture, **CFG)
  model = build_model(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  enc, dec = jnp.ones((2, 64), jnp.int32), jnp.ones((2, 32), jnp.int32)
  batch = dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=dec)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(batch))

  cost = jax.jit(jax.value_and_grad(loss)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  lengths = {"encoder_input_tokens": 64, "decoder_input_tokens": 32}
  analytic = 2 * training_flops_per_example(cfg, lengths)
  # XLA also counts element-wise work (norms, softmax, activations): a few percent.
  assert 0.98 < cost["flops"] / analytic < 1.10, (cost["flops"], analytic)


@pytest.mark.parametrize("device_kind,peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("cpu", None)])
def test_vendor_peaks_by_the_device_kinds_jax_reports(device_kind, peak):
  """MFU's peak per device kind as JAX names it (a v5p is 'TPU v5', a v5e 'TPU v5 lite')."""
  assert topologies.vendor_peak_flops(device_kind) == peak


def test_the_train_step_and_mfu_helpers_import_no_tensorflow():
  """The accelerator benches (bench/mfu.py) import the model, the train step and the MFU
  helpers on a machine without TensorFlow or seqio."""
  code = ("import sys; import ul2x.trainer.setup, ul2x.trainer.reporting, ul2x.model.flops; "
          "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == "[]"
