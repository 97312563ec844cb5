"""Analytic training FLOPs (forward + backward = 3 x forward matmul FLOPs), used for MFU."""

from ul2x.model.config import TransformerConfig
from ul2x.model.moe import TOP_K, expert_capacity, group_layout


def _layer_flops_per_token(cfg: TransformerConfig, kv_len: int) -> int:
  """Forward FLOPs per token of one self-attention + MLP layer attending over kv_len."""
  hd = cfg.num_heads * cfg.head_dim
  projections = 2 * 4 * cfg.emb_dim * hd  # q, k, v, out
  scores = 2 * 2 * hd * kv_len  # q.k and weights.v
  mlp = 2 * 3 * cfg.emb_dim * cfg.mlp_dim  # wi_0, wi_1, wo
  return projections + scores + mlp


def _moe_flops(cfg: TransformerConfig, num_layers: int, length: int, router: str) -> float:
  """Forward FLOPs that a stack's MoE layers (routed by `router`) add over dense MLPs: the
  router, and in place of the MLP the experts run on every capacity slot (used or not),
  or with dropless dispatch on each token's k choices (no slots)."""
  if not cfg.num_experts:
    return 0
  if cfg.moe_dispatch == "dropless":
    mlps_per_token = TOP_K[router]
  else:
    rows, chunk = group_layout(max(cfg.group_size // length, 1), length, cfg.group_size)
    group = rows * chunk
    mlps_per_token = cfg.num_experts * expert_capacity(group, cfg.num_experts,
                                                       cfg.capacity_factor) / group
  experts = mlps_per_token * 2 * 3 * cfg.emb_dim * (cfg.expert_mlp_dim or cfg.mlp_dim)
  router_logits = 2 * cfg.emb_dim * cfg.num_experts
  dense = 2 * 3 * cfg.emb_dim * cfg.mlp_dim
  return num_layers // cfg.moe_layer_interval * length * (router_logits + experts - dense)


def training_flops_per_example(cfg: TransformerConfig, lengths: dict[str, int]) -> int:
  """Training FLOPs of one example with model feature lengths `lengths`
  (`encoder_input_tokens`, `decoder_input_tokens`), counting full (unmasked) attention."""
  hd = cfg.num_heads * cfg.head_dim
  dec_len = lengths["decoder_input_tokens"]
  logits = 2 * cfg.emb_dim * cfg.vocab_size * dec_len
  decoder = cfg.num_decoder_layers * dec_len * _layer_flops_per_token(cfg, dec_len)
  decoder += _moe_flops(cfg, cfg.num_decoder_layers, dec_len, cfg.decoder_router)
  forward = logits + decoder
  if cfg.architecture == "encoder_decoder":
    enc_len = lengths["encoder_input_tokens"]
    forward += cfg.num_encoder_layers * enc_len * _layer_flops_per_token(cfg, enc_len)
    forward += _moe_flops(cfg, cfg.num_encoder_layers, enc_len, cfg.encoder_router)
    cross_q_out = 2 * 2 * cfg.emb_dim * hd * dec_len + 2 * 2 * hd * enc_len * dec_len
    cross_kv = 2 * 2 * cfg.emb_dim * hd * enc_len
    forward += cfg.num_decoder_layers * (cross_q_out + cross_kv)
  return int(3 * forward)


def tokens_per_example(cfg: TransformerConfig, lengths: dict[str, int]) -> int:
  """Tokens the model reads per example (encoder + decoder positions)."""
  tokens = lengths["decoder_input_tokens"]
  if cfg.architecture == "encoder_decoder":
    tokens += lengths["encoder_input_tokens"]
  return tokens
