"""Times greedy decoding: ul2x cached, ul2x uncached and Hugging Face generate(); prints JSON.

One T5 v1.1-shaped encoder-decoder with random weights (`gin_configs/models/small.gin`
sizes by default, float32), batch 8, 128 input and 128 output tokens. Every method runs
all 128 steps: no token can be EOS (ul2x eos_id=-1; HF min_new_tokens=128 and no EOS
id). ul2x decodes with `trainer/predict.py` on one device, cached (the key/value cache)
and uncached (its reference twin, which reruns the whole model at every step); HF with
`T5ForConditionalGeneration.generate` on PyTorch CPU. The weights differ between the
frameworks (each initialises its own), so only the output shapes are compared across
them; ul2x cached and uncached share weights and their tokens are compared. Times are
the best of --repeats rounds, the methods interleaved within each round, after a warm-up
run; ul2x's compile time is reported apart. Run on one CPU device:

  OMP_WAIT_POLICY=PASSIVE JAX_PLATFORMS=cpu .venv/bin/python bench/decode.py

OMP_WAIT_POLICY=PASSIVE matters on a shared machine: PyTorch's OpenMP threads spin at
every barrier by default, and when another job takes a core from one of them a
generate() call can take 10-25 times as long.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from ul2x import partitioning
from ul2x.gin_setup import PACKAGE_DIR
from ul2x.model import TransformerConfig
from ul2x.trainer.predict import make_predict_fn
from ul2x.trainer.setup import setup

NEVER_EOS = -1  # no token id equals it, so every row decodes all max_decode_len steps


def load_config(args) -> TransformerConfig:
  """small.gin's model, with the sizes given on the command line replacing its own."""
  gin.clear_config()
  gin.parse_config_file(os.path.join(PACKAGE_DIR, "gin_configs", "models", "small.gin"))
  cfg = TransformerConfig()
  gin.clear_config()
  sizes = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg)
           if getattr(args, f.name, None) is not None}
  return dataclasses.replace(cfg, **sizes)


def ul2x_decoders(cfg, tokens: np.ndarray, decode_len: int) -> dict:
  """-> {name: (run() -> tokens [batch, decode_len], compile seconds)}, cached and not."""
  job = setup(cfg, mesh=partitioning.create_mesh(devices=jax.devices()[:1]))
  params = job.init_state()["params"]
  batch = {"encoder_input_tokens": jax.device_put(jnp.asarray(tokens), job.batch_sharding)}
  runs = {}
  for name, cached in (("ul2x_cached", True), ("ul2x_uncached", False)):
    predict = make_predict_fn(job, max_decode_len=decode_len, eos_id=NEVER_EOS,
                              method="greedy", cached=cached)
    start = time.perf_counter()
    compiled = predict.lower(params, batch, None).compile()
    compile_s = time.perf_counter() - start
    runs[name] = (lambda c=compiled: jax.block_until_ready(c(params, batch, None))[0],
                  compile_s)
  return runs


def hf_decoder(cfg, tokens: np.ndarray, decode_len: int, threads: int):
  """-> (run() -> tokens [batch, decode_len] from a randomly initialised HF T5 of cfg's
  shape, library versions)."""
  # The `bench` extra (pyproject.toml), imported here so the rest needs only ul2x's deps.
  import torch
  import transformers
  from transformers import T5Config, T5ForConditionalGeneration

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf_cfg = T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim,
      num_heads=cfg.num_heads, d_ff=cfg.mlp_dim, num_layers=cfg.num_encoder_layers,
      num_decoder_layers=cfg.num_decoder_layers,
      feed_forward_proj=f"gated-{cfg.activation}",
      relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance,
      tie_word_embeddings=cfg.tie_embeddings, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
  model = T5ForConditionalGeneration(hf_cfg).eval()
  input_ids = torch.from_numpy(tokens.astype(np.int64))
  mask = torch.ones_like(input_ids)

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=input_ids, attention_mask=mask,
                           max_new_tokens=decode_len, min_new_tokens=decode_len,
                           do_sample=False, num_beams=1, use_cache=True,
                           eos_token_id=None, pad_token_id=0)
    return out[:, 1:].numpy()  # drop the decoder start token

  return run, {"torch": torch.__version__, "transformers": transformers.__version__}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
               "num_encoder_layers", "num_decoder_layers"):
    parser.add_argument(f"--{name}", type=int, default=None, help="default: small.gin's")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="ul2x activation dtype (HF runs float32)")
  parser.add_argument("--scan_layers", type=int, choices=(0, 1), default=None,
                      help="ul2x: scan over the layer stacks (default: small.gin's)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--input_len", type=int, default=128)
  parser.add_argument("--decode_len", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best counts")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count(),
                      help="HF: torch.set_num_threads (default: all cores)")
  args = parser.parse_args()
  if args.scan_layers is not None:
    args.scan_layers = bool(args.scan_layers)
  cfg = load_config(args)

  # Ids from 2 up: 0 is padding and 1 is T5's EOS, which a tokenized input ends with.
  tokens = np.random.default_rng(0).integers(2, cfg.vocab_size,
                                             (args.batch_size, args.input_len), np.int32)
  runs = ul2x_decoders(cfg, tokens, args.decode_len)
  hf_run, versions = hf_decoder(cfg, tokens, args.decode_len, args.torch_threads)
  runs["hf_generate"] = (hf_run, None)

  load_before = os.getloadavg()[0]
  outputs = {name: np.asarray(run()) for name, (run, _) in runs.items()}  # warm-up
  seconds = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, (run, _) in runs.items():
      start = time.perf_counter()
      run()
      seconds[name].append(time.perf_counter() - start)

  generated = args.batch_size * args.decode_len
  results = {}
  for name, (_, compile_s) in runs.items():
    best = min(seconds[name])
    results[name] = {"tokens_per_s": generated / best, "seconds": best,
                     "all_seconds": seconds[name]}
    if compile_s is not None:
      results[name]["compile_s"] = compile_s
  tps = {name: r["tokens_per_s"] for name, r in results.items()}
  shape = [args.batch_size, args.decode_len]
  print(json.dumps({
      "bench": "decode", "machine": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(), "device_kind": jax.devices()[0].device_kind,
      "num_devices": 1, "date": datetime.date.today().isoformat(),
      # Other jobs share the machine; 1-minute load average before and after timing.
      "load_average": [load_before, os.getloadavg()[0]],
      "torch_threads": args.torch_threads,
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
      "versions": {"jax": jax.__version__, **versions},
      "config": {**dataclasses.asdict(cfg), "batch_size": args.batch_size,
                 "input_len": args.input_len, "decode_len": args.decode_len,
                 "method": "greedy", "repeats": args.repeats},
      "results": results,
      "ratios": {"cached_over_uncached": tps["ul2x_cached"] / tps["ul2x_uncached"],
                 "cached_over_hf": tps["ul2x_cached"] / tps["hf_generate"]},
      "sanity": {
          "shapes": {name: list(out.shape) for name, out in outputs.items()},
          "all_shapes_match": all(list(out.shape) == shape for out in outputs.values()),
          "cached_uncached_equal_tokens": float(np.mean(
              outputs["ul2x_cached"] == outputs["ul2x_uncached"])),
          "note": "HF weights are its own random init, so its tokens are not compared",
      },
  }, indent=2))


if __name__ == "__main__":
  main()
