"""ul2x.kernels: pure per-shard array functions, called inside the caller's shard_map:
ring attention (`ring_attention`) and mixture-of-experts dispatch (`moe_dispatch`)."""
