"""lm-eval requests per second: ul2x's lm-eval model (trainer/lm_eval_model.py) against
lm-eval's own `hf` model (HFLM, torch) on the transformers export of the same checkpoint,
same process, same CPU. The task is a local multiple-choice task (`--docs` questions of 4
choices: 4 loglikelihood requests each), run through `lm_eval.simple_evaluate` for both.
Each model runs the task once to warm up (ul2x compiles its shapes there), then
`--repeats` timed times; the best is reported. Prints JSON. (Not bench/lm_eval.py: run
as a script, that name would be the `lm_eval` that lm-eval's own modules import.)

  JAX_PLATFORMS=cpu .venv/bin/python bench/lm_eval_speed.py           (.venv: needs torch)
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

WORDS = ("apple river stone cloud green tiger piano lemon orange window garden silver "
         "yellow market bridge castle").split()


def write_task(directory: str, docs: int) -> None:
  rng = np.random.default_rng(0)
  with open(os.path.join(directory, "choice.jsonl"), "w") as f:
    for i in range(docs):
      question = " ".join(rng.choice(WORDS, 12))
      f.write(json.dumps({"question": f"Q: {question}?\nA:", "answer": i % 4,
                          "choices": [" ".join(rng.choice(WORDS, 3)) for _ in range(4)]}) + "\n")
  with open(os.path.join(directory, "choice.yaml"), "w") as f:
    f.write(f"task: bench_choice\ndataset_path: json\ntest_split: test\n"
            f"dataset_kwargs: {{data_files: {{test: '{directory}/choice.jsonl'}}}}\n"
            "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
            "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
            "metric_list: [{metric: acc}]\n")


def timed(lm, include_path: str, repeats: int) -> tuple[float, dict]:
  from ul2x.trainer.lm_eval_model import evaluate
  evaluate(lm, ["bench_choice"], include_path=include_path)
  best, results = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    results = evaluate(lm, ["bench_choice"], include_path=include_path)
    best = min(best, time.perf_counter() - start)
  return best, results["results"]["bench_choice"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model_gin", default="gin_configs/models/decoder_only_tiny.gin")
  parser.add_argument("--docs", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")

  import gin
  import jax
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM

  from ul2x.export.job import export
  from ul2x.model import TransformerConfig
  from ul2x.trainer.checkpoints import Checkpointer
  from ul2x.trainer.lm_eval_model import UL2XLM
  from ul2x.trainer.setup import setup

  gin.parse_config_file(args.model_gin)
  cfg = TransformerConfig()
  if cfg.architecture != "decoder_only":
    raise SystemExit("bench/lm_eval_speed.py compares a decoder-only (Llama) export; pass a "
                     "decoder_only model gin file.")
  work = tempfile.mkdtemp()
  write_task(work, args.docs)
  job = setup(cfg)
  params = job.init_state()["params"]
  ckpt = Checkpointer(os.path.join(work, "run", "checkpoints"), every=1, max_to_keep=1,
                      async_save=False)
  ckpt.maybe_save(1, {"step": np.int32(1), "params": params}, {"train_batches": 0}, final=True)
  ckpt.close()
  hf_dir = export(checkpoint_path=os.path.join(work, "run"), export_dir=os.path.join(work, "hf"),
                  model_config=cfg, tokenizer="byte")

  class LeadingZero(transformers.ByT5Tokenizer):
    """ul2x's decoder-only layout: the start id 0 first, no EOS after."""

    def build_inputs_with_special_tokens(self, ids, pair=None):
      return [0] + ids + (pair or [])

  ours = UL2XLM(job, params, batch_size=args.batch_size)
  theirs = HFLM(pretrained=hf_dir, backend="causal", device="cpu", dtype="float32",
                batch_size=args.batch_size, tokenizer=LeadingZero.from_pretrained(hf_dir),
                add_bos_token=True, prefix_token_id=0)
  requests = 4 * args.docs
  ours_s, ours_metrics = timed(ours, work, args.repeats)
  theirs_s, theirs_metrics = timed(theirs, work, args.repeats)
  print(json.dumps({
      "model": args.model_gin, "parameters": sum(p.size for p in jax.tree.leaves(params)),
      "requests": requests, "batch_size": args.batch_size,
      "ul2x_requests_per_s": round(requests / ours_s, 1),
      "hf_requests_per_s": round(requests / theirs_s, 1),
      "ul2x_over_hf": round(theirs_s / ours_s, 2),
      "acc": {"ul2x": ours_metrics["acc,none"], "hf": theirs_metrics["acc,none"]},
      "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
      "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
  main()
