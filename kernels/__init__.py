"""ul2x.kernels: pure per-shard array functions, called inside the caller's shard_map:
the inputs and mask every attention shares (`attention_inputs`), ring attention
(`ring_attention`), Pallas flash attention (`flash_attention`), mixture-of-experts
dispatch with capacity (`moe_dispatch`) and dropless grouped-matmul dispatch
(`grouped_matmul`, with the Pallas grouped matmul of `grouped_matmul_pallas` for GPU
and `grouped_matmul_tpu` for TPU), and the Pallas and shard_map utilities they all
share (`utils`, a leaf). Which implementation runs is model/'s choice."""
