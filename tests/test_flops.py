"""The analytic training FLOP count agrees with XLA's cost analysis of the real step."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ul2x.model import TransformerConfig, build_model
from ul2x.model.flops import training_flops_per_example

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
