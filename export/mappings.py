"""The Hugging Face model families ul2x converts to and from, as data: per family the
mapping table (ul2x parameter -> HF tensor, transform; applied by export/hf.py), the
HF config.json a TransformerConfig becomes, and the way back (docs/export.md)."""

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from ul2x.export.hf import COPY, Rule, linear, scaled
from ul2x.model import TransformerConfig
from ul2x.model.layers import NORM_EPS

T5_TOKENS = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
# Decoder-only ul2x inputs start with id 0 (seqio shifts the targets right), so 0 is BOS.
LLAMA_TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
# RoPE has no length limit; HF wants a number, used only by length-dependent RoPE types.
LLAMA_MAX_POSITIONS = 2048
T5_ACTIVATIONS = {"gated-gelu": "gelu", "gated-silu": "silu"}
# jax.nn.gelu is the tanh approximation: HF's gelu_new / gelu_pytorch_tanh.
LLAMA_ACTIVATIONS = {"silu": "silu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def _attention(ours: str, hf: str, names: tuple, q_scale: float = 1.0) -> list[Rule]:
  q, k, v, o = names
  return [Rule(f"{ours}/query/kernel", f"{hf}.{q}.weight", linear(1, q_scale)),
          Rule(f"{ours}/key/kernel", f"{hf}.{k}.weight", linear()),
          Rule(f"{ours}/value/kernel", f"{hf}.{v}.weight", linear()),
          Rule(f"{ours}/out/kernel", f"{hf}.{o}.weight", linear(2))]


def _mlp(ours: str, hf: str, names: tuple) -> list[Rule]:
  return [Rule(f"{ours}/{mine}/kernel", f"{hf}.{theirs}.weight", linear())
          for mine, theirs in zip(("wi_0", "wi_1", "wo"), names)]


def t5_rules(cfg: TransformerConfig) -> list[Rule]:
  """T5ForConditionalGeneration. No attention scaling on either side; the relative
  bias table sits on block 0 of each stack; the untied head is `lm_head`."""
  enc, dec = "encoder/layers/{i}", "decoder/layers/{i}"
  hf_enc, hf_dec = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
  bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  mlp = ("wi_0", "wi_1", "wo")
  return [
      Rule("embed/embedding", "shared.weight", COPY),
      Rule("encoder_bias/rel_embedding", f"encoder.{bias}", linear()),
      Rule(f"{enc}/self_attention_norm/scale", f"{hf_enc}.0.layer_norm.weight", COPY),
      *_attention(f"{enc}/self_attention", f"{hf_enc}.0.SelfAttention", "qkvo"),
      Rule(f"{enc}/mlp_norm/scale", f"{hf_enc}.1.layer_norm.weight", COPY),
      *_mlp(f"{enc}/mlp", f"{hf_enc}.1.DenseReluDense", mlp),
      Rule("encoder_norm/scale", "encoder.final_layer_norm.weight", COPY),
      Rule("decoder_bias/rel_embedding", f"decoder.{bias}", linear()),
      Rule(f"{dec}/self_attention_norm/scale", f"{hf_dec}.0.layer_norm.weight", COPY),
      *_attention(f"{dec}/self_attention", f"{hf_dec}.0.SelfAttention", "qkvo"),
      Rule(f"{dec}/cross_attention_norm/scale", f"{hf_dec}.1.layer_norm.weight", COPY),
      *_attention(f"{dec}/cross_attention", f"{hf_dec}.1.EncDecAttention", "qkvo"),
      Rule(f"{dec}/mlp_norm/scale", f"{hf_dec}.2.layer_norm.weight", COPY),
      *_mlp(f"{dec}/mlp", f"{hf_dec}.2.DenseReluDense", mlp),
      Rule("output/norm/scale", "decoder.final_layer_norm.weight", COPY),
      Rule("output/logits/kernel", "lm_head.weight", linear()),
  ]


def llama_rules(cfg: TransformerConfig) -> list[Rule]:
  """LlamaForCausalLM. Llama divides attention logits by sqrt(head_dim) and ul2x does
  not, so q_proj carries sqrt(head_dim). Our RoPE rotates the two halves of the head
  dim as HF's rotate_half does: no permutation."""
  dec, hf = "decoder/layers/{i}", "model.layers.{i}"
  rules = [
      Rule("embed/embedding", "model.embed_tokens.weight", COPY),
      Rule(f"{dec}/self_attention_norm/scale", f"{hf}.input_layernorm.weight", COPY),
      *_attention(f"{dec}/self_attention", f"{hf}.self_attn",
                  ("q_proj", "k_proj", "v_proj", "o_proj"), math.sqrt(cfg.head_dim)),
      Rule(f"{dec}/mlp_norm/scale", f"{hf}.post_attention_layernorm.weight", COPY),
      *_mlp(f"{dec}/mlp", f"{hf}.mlp", ("gate_proj", "up_proj", "down_proj")),
      Rule("output/norm/scale", "model.norm.weight", COPY),
  ]
  if cfg.tie_embeddings:  # Llama's tied head cannot rescale: an untied, pre-scaled copy
    return rules + [Rule("embed/embedding", "lm_head.weight", scaled(cfg.emb_dim ** -0.5))]
  return rules + [Rule("output/logits/kernel", "lm_head.weight", linear())]


def t5_config(cfg: TransformerConfig) -> dict:
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "is_encoder_decoder": True, "vocab_size": cfg.vocab_size, "d_model": cfg.emb_dim,
      "d_kv": cfg.head_dim, "d_ff": cfg.mlp_dim, "num_heads": cfg.num_heads,
      "num_layers": cfg.num_encoder_layers, "num_decoder_layers": cfg.num_decoder_layers,
      "relative_attention_num_buckets": cfg.relative_buckets,
      "relative_attention_max_distance": cfg.relative_max_distance,
      "feed_forward_proj": f"gated-{cfg.activation}", "layer_norm_epsilon": NORM_EPS,
      "dropout_rate": cfg.dropout_rate,
      # True: T5 ties the head and rescales its logits by 1/sqrt(d_model), as ul2x does.
      "tie_word_embeddings": cfg.tie_embeddings, **T5_TOKENS}


def llama_config(cfg: TransformerConfig) -> dict:
  if cfg.emb_dim % cfg.num_heads:
    raise ValueError(f"transformers' LlamaConfig needs emb_dim={cfg.emb_dim} to be a multiple "
                     f"of num_heads={cfg.num_heads} (it checks hidden_size % heads, even with "
                     "an explicit head_dim); export with format='safetensors'.")
  act = {"silu": "silu", "gelu": "gelu_new"}[cfg.activation]
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_decoder_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
      "head_dim": cfg.head_dim, "hidden_act": act, "rms_norm_eps": NORM_EPS,
      "max_position_embeddings": LLAMA_MAX_POSITIONS,
      # rope_parameters for transformers 5; rope_theta for 4 (5 reads it too).
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_max_wavelength},
      "rope_theta": cfg.rope_max_wavelength,
      "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
      **LLAMA_TOKENS}


def _check_eps(eps: float, key: str) -> None:
  if not math.isclose(eps, NORM_EPS):
    raise ValueError(f"{key}={eps} differs from ul2x's fixed RMSNorm epsilon {NORM_EPS}; "
                     "such a model would not compute the same function in ul2x.")


def t5_from_hf(config: dict, load: Callable) -> tuple[TransformerConfig, dict]:
  """A T5 v1.1 / UL2 config.json and `load() -> its tensors` -> (TransformerConfig, the
  tensors with the head as ul2x holds it: tied (and rescaled) or an explicit lm_head)."""
  proj = config.get("feed_forward_proj", "relu")
  if proj not in T5_ACTIVATIONS:
    raise ValueError(f"T5 feed_forward_proj={proj!r} is not supported: ul2x models have the "
                     f"gated MLP of T5 v1.1 / UL2 ({' or '.join(T5_ACTIVATIONS)}); T5 v1.0's "
                     "'relu' MLP has a single input projection.")
  _check_eps(config.get("layer_norm_epsilon", NORM_EPS), "layer_norm_epsilon")
  # transformers 5 keeps the rescaling flag apart; older configs say it as tie_word_embeddings.
  rescaled = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True))
  tensors = load()
  shared, head = tensors.get("shared.weight"), tensors.get("lm_head.weight")
  tied = rescaled and (head is None or np.array_equal(head, shared))
  if tied:
    tensors.pop("lm_head.weight", None)
  elif shared is not None:
    head = shared if head is None else head
    tensors["lm_head.weight"] = head * np.float32(config["d_model"] ** -0.5 if rescaled else 1)
  cfg = TransformerConfig(
      architecture="encoder_decoder", vocab_size=config["vocab_size"],
      emb_dim=config["d_model"], num_heads=config["num_heads"], head_dim=config["d_kv"],
      mlp_dim=config["d_ff"], num_encoder_layers=config["num_layers"],
      num_decoder_layers=config.get("num_decoder_layers") or config["num_layers"],
      activation=T5_ACTIVATIONS[proj], dropout_rate=config.get("dropout_rate", 0.0),
      tie_embeddings=bool(tied), position="relative",
      relative_buckets=config.get("relative_attention_num_buckets", 32),
      relative_max_distance=config.get("relative_attention_max_distance", 128))
  return cfg, tensors


def llama_from_hf(config: dict, load: Callable) -> tuple[TransformerConfig, dict]:
  """A Llama config.json and `load() -> its tensors` -> (TransformerConfig, tensors);
  always untied, since ul2x's tied head rescales and Llama's does not."""
  heads = config["num_attention_heads"]
  kv_heads = config.get("num_key_value_heads") or heads
  if kv_heads != heads:
    raise ValueError(f"num_key_value_heads={kv_heads} != num_attention_heads={heads}: grouped-"
                     "query attention is not built in ul2x; import a model with full heads.")
  for key in ("attention_bias", "mlp_bias"):
    if config.get(key):
      raise ValueError(f"{key}=True: ul2x layers have no biases; import a model without them.")
  rope = config.get("rope_parameters") or {}
  kind = config.get("rope_scaling") or rope.get("rope_type", "default")
  if kind != "default":
    raise ValueError(f"RoPE scaling {kind!r} is not built in ul2x (plain RoPE only); import "
                     "a model without rope_scaling.")
  act = config.get("hidden_act", "silu")
  if act not in LLAMA_ACTIVATIONS:
    raise ValueError(f"hidden_act={act!r} is not one of {sorted(LLAMA_ACTIVATIONS)}.")
  _check_eps(config.get("rms_norm_eps", NORM_EPS), "rms_norm_eps")
  tensors = load()
  if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  cfg = TransformerConfig(
      architecture="decoder_only", vocab_size=config["vocab_size"],
      emb_dim=config["hidden_size"], num_heads=heads,
      head_dim=config.get("head_dim") or config["hidden_size"] // heads,
      mlp_dim=config["intermediate_size"], num_decoder_layers=config["num_hidden_layers"],
      activation=LLAMA_ACTIVATIONS[act], position="rope", tie_embeddings=False,
      rope_max_wavelength=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))))
  return cfg, tensors


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  rules: Callable  # TransformerConfig -> list[Rule]
  hf_config: Callable  # TransformerConfig -> config.json
  generation_config: dict
  from_hf: Callable  # (config.json, () -> tensors) -> (TransformerConfig, tensors)
  warning: str | None = None  # printed on export


T5 = Family("t5", t5_rules, t5_config, T5_TOKENS, t5_from_hf)
LLAMA = Family(
    "llama", llama_rules, llama_config, LLAMA_TOKENS, llama_from_hf,
    warning="Llama attends causally everywhere: where a ul2x prefix LM attends "
    "bidirectionally over the prompt, the export differs; it is exact for causal use.")
FAMILIES = {"t5": T5, "llama": LLAMA}


def family_for(cfg: TransformerConfig) -> Family:
  """The HF family a ul2x model exports to; raises naming why there is none."""
  if cfg.num_experts:
    raise ValueError(
        f"a MoE model (num_experts={cfg.num_experts}) has no transformers equivalent: "
        "SwitchTransformers' experts and dense layers are ungated ReLU MLPs (wi, wo) where "
        "ul2x's are gated (wi_0, wi_1, wo), and it routes top-1 with one capacity over the "
        "whole batch; export with format='safetensors'.")
  if cfg.architecture == "encoder_decoder":
    return T5
  if cfg.position == "rope":
    return LLAMA
  raise ValueError("a decoder_only model with position='relative' (the T5 bias) has no "
                   "Hugging Face equivalent (Llama uses RoPE); export with "
                   "format='safetensors'.")


def family_of(config: dict, hf_dir: str) -> Family:
  """The family of an HF config.json, by its model_type."""
  kind = config.get("model_type")
  if kind not in FAMILIES:
    raise ValueError(f"{hf_dir}: model_type={kind!r} is not one ul2x imports "
                     f"({', '.join(FAMILIES)}).")
  return FAMILIES[kind]
