"""The infer job: predictions (decoding) or scores (log-likelihood of given targets) for a
seqio task split or a text / JSONL file of inputs, written as JSONL.

  python -m ul2x.infer --gin_file=gin_configs/runs/infer.gin \
    --gin.CHECKPOINT_PATH="'runs/quickstart'" ...

jax, seqio and TensorFlow are imported inside `infer`, after `gin_setup` has checked the
config: a config error comes in a fraction of a second."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402


def _say_truncated(examples: list[dict], task_feature_lengths: dict) -> None:
  """One line, where any example's text was cut to its feature length."""
  from ul2x.tasks.inference import truncation
  from ul2x.trainer.console import say
  cut = truncation(examples, task_feature_lengths)
  if cut:
    say(f"infer: cut to TASK_FEATURE_LENGTHS: {cut}; their rows say \"truncated\"; raise "
        "--gin.TASK_FEATURE_LENGTHS to keep them whole")


def infer(*, checkpoint_path: str, output_dir: str, task_feature_lengths: dict | None = None,
          mixture_or_task_name: str | None = None, input_file: str | None = None,
          model_config=None, mode: str = "predict", split: str = "validation",
          batch_size: int = 32, max_decode_len: int | None = None,
          num_examples: int | None = None, mode_token: str | None = "auto", seed: int = 0,
          step: int | None = None, overwrite: bool = False, causal_prompt: bool = False,
          mesh=None) -> str:
  """Writes `output_dir/<task or file name>-<mode>-<step>.jsonl`, one row per example:
  `inputs`, `prediction` (predict) or `targets` (score), and `score` (the prediction's
  log-probability, or the given targets' log-likelihood). Inputs come from the task's
  `split` or from `input_file` (.jsonl with 'inputs' [and 'targets'], else one input per
  line, in the checkpoint's vocabulary: `record.text_vocabulary`) led by `mode_token`
  ('[NLU]', '[NLG]', '[S2S]', None for none, or by default, 'auto'
  (`record.TRAINED_MODE_TOKEN`), that of the task the checkpoint was trained on:
  `record.trained_mode_token`); `causal_prompt` continues each line as plain text with a
  decoder-only causal LM (no EOS after it, no bidirectional prefix). `model_config`: a
  `TransformerConfig`, or None for the recorded model. Returns the output path."""
  import jax

  from ul2x.tasks import inference
  from ul2x.trainer import record
  from ul2x.trainer.console import say
  from ul2x.trainer.predict import MODES, run_examples
  from ul2x.trainer.setup import setup
  if mode not in MODES:
    raise ValueError(f"infer.mode={mode!r} is not one of {MODES}; use --gin.infer.mode.")
  if bool(mixture_or_task_name) == bool(input_file):
    raise ValueError("give exactly one of MIXTURE_OR_TASK_NAME and INPUT_FILE (now "
                     f"{mixture_or_task_name!r} and {input_file!r}).")
  if max_decode_len is not None and max_decode_len < 1:
    raise ValueError(f"infer.max_decode_len={max_decode_len} must be at least 1.")
  model_config, task_feature_lengths = record.job_settings(
      checkpoint_path, model_config, step=step, task_feature_lengths=task_feature_lengths)
  if input_file:
    if causal_prompt and (mode == "score" or model_config.architecture != "decoder_only"):
      raise ValueError("infer.causal_prompt=True continues text with a decoder_only model in "
                       f"predict mode, not {model_config.architecture!r} in {mode!r} mode.")
    if mode_token == record.TRAINED_MODE_TOKEN:
      mode_token = record.trained_mode_token(checkpoint_path, step)
    vocabulary = record.text_vocabulary(checkpoint_path, step)
    examples = inference.file_examples(input_file, mode_token=mode_token,
                                       task_feature_lengths=task_feature_lengths,
                                       causal_prompt=causal_prompt, vocabulary=vocabulary)
    name = os.path.splitext(os.path.basename(input_file))[0]
    if mode == "score" and any("targets" not in e for e in examples):
      raise ValueError(f"infer.mode='score' needs 'targets' on every line of {input_file}.")
  else:
    examples = inference.task_examples(mixture_or_task_name, split, task_feature_lengths,
                                       num_examples)
    vocabulary = inference.targets_vocabulary(mixture_or_task_name)
    name = f"{mixture_or_task_name}-{split}"
  examples = examples[:num_examples] if num_examples else examples
  job = setup(model_config, mesh=mesh)
  state = job.restore_state(checkpoint_path, step)
  at = int(state["step"])
  path = os.path.join(output_dir, f"{name}-{mode}-{at}.jsonl")
  if os.path.exists(path) and not overwrite:  # before any decoding work
    raise ValueError(f"{path} exists; pass --gin.infer.overwrite=True or another "
                     "INFER_OUTPUT_DIR to replace it.")
  say(f"{mode}: {len(examples)} examples of {name} with the checkpoint at step {at}")
  _say_truncated(examples, task_feature_lengths)
  results = run_examples(job, state["params"], examples, mode=mode, seed=seed,
                         task_feature_lengths=task_feature_lengths, batch_size=batch_size,
                         max_decode_len=max_decode_len)
  rows = []
  for example, result in zip(examples, results):
    row = {"inputs": example.get("inputs_pretokenized", "")}
    if "targets_pretokenized" in example:
      row["targets"] = example["targets_pretokenized"]
    if mode == "predict":
      row["prediction"] = inference.decode(result["prediction"], vocabulary)
    row["score"] = result["score"]
    if example.get("truncated"):
      row["truncated"] = example["truncated"]
    rows.append(row)
  if jax.process_index() == 0:
    inference.write_jsonl_atomically(path, rows, overwrite)
  say(f"wrote {len(rows)} rows to {path}")
  return path


def main(argv: list[str]) -> None:
  gin_setup.run_job(infer, argv, "Decode or score with a ul2x checkpoint.", "ul2x.trainer.predict")


if __name__ == "__main__":
  gin_setup.run_cli(main)
