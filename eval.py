"""The eval job: seqio evaluation (the task's postprocessor and metric functions on
decoded predictions) of one checkpoint or of every checkpoint in a directory, skipping
those already evaluated; results to JSON per step, one JSONL row per step, TensorBoard.

  python -m ul2x.eval --gin_file=gin_configs/runs/eval.gin \
    --gin.CHECKPOINT_PATH="'/tmp/run'" ...

jax, seqio and TensorFlow are imported inside `evaluate`, after `gin_setup` has checked
the config: a config error comes in a fraction of a second."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402


def _steps(path: str, which) -> tuple[str, list[int]]:
  """(checkpoints directory, steps to evaluate): `which` is 'all', 'latest' or a list."""
  from ul2x.trainer import checkpoints
  directory, latest = checkpoints.find_checkpoint(path)
  if os.path.basename(os.path.abspath(path)).isdigit():
    return directory, [latest]  # one step's directory names the step
  if which == "latest":
    return directory, [latest]
  available = checkpoints.checkpoint_steps(directory)
  if which == "all":
    return directory, available
  missing = sorted(set(which) - set(available))
  if missing:
    raise ValueError(f"evaluate.checkpoint_steps asks for {missing}, but {directory} has "
                     f"steps {available}.")
  return directory, sorted(which)


def evaluate(*, checkpoint_path: str, output_dir: str, mixture_or_task_name: str | None = None,
             task_feature_lengths: dict | None = None, model_config=None,
             split: str = "validation", batch_size: int = 32,
             max_decode_len: int | None = None, num_examples: int | None = None,
             checkpoint_steps="all", metrics=None, mesh=None) -> list[dict]:
  """Evaluates each chosen checkpoint not yet evaluated in `output_dir`; writes
  `<output_dir>/<name>-<step>.json`, appends a row to `<output_dir>/metrics.jsonl` and
  TensorBoard scalars to `<output_dir>/`, each only after its checkpoint restored and
  was evaluated. `metrics` (names in `tasks.metrics.METRICS`) replaces the tasks' own
  metric functions. The task, the feature lengths and the model (a `TransformerConfig`)
  default to those the checkpoint records. Returns the new rows."""
  import jax

  from ul2x.tasks.inference import truncation, write_jsonl_atomically
  from ul2x.trainer import record
  from ul2x.trainer.console import say
  from ul2x.trainer.predict import Evaluator
  from ul2x.trainer.reporting import MetricsWriter  # TensorBoard: TensorFlow
  from ul2x.trainer.setup import setup
  if max_decode_len is not None and max_decode_len < 1:
    raise ValueError(f"evaluate.max_decode_len={max_decode_len} must be at least 1.")
  directory, steps = _steps(checkpoint_path, checkpoint_steps)
  model_config, task_feature_lengths, mixture_or_task_name = record.job_settings(
      checkpoint_path, model_config, task_feature_lengths=task_feature_lengths,
      task=mixture_or_task_name)
  job = setup(model_config, mesh=mesh)
  evaluator = Evaluator(job, mixture_or_task_name, split=split,
                        task_feature_lengths=task_feature_lengths, batch_size=batch_size,
                        max_decode_len=max_decode_len, num_examples=num_examples,
                        metric_names=metrics)
  for task, examples in evaluator.examples.items():
    cut = truncation(examples, task_feature_lengths)
    if cut:
      say(f"eval: {task!r} cut to TASK_FEATURE_LENGTHS: {cut}; raise "
          "--gin.TASK_FEATURE_LENGTHS to keep them whole")
  name = f"{mixture_or_task_name}-{split}"
  todo = [s for s in steps if not os.path.exists(os.path.join(output_dir, f"{name}-{s}.json"))]
  if len(todo) < len(steps):
    say(f"skipping steps {sorted(set(steps) - set(todo))}: already evaluated in {output_dir}")
  writer, rows = None, []
  for step in todo:
    params = job.restore_state(directory, step)["params"]
    row = {"step": step, "checkpoint": os.path.join(directory, str(step)), **evaluator(params)}
    say(f"eval step {step}  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()
                                         if isinstance(v, float)))
    if jax.process_index() == 0:
      # Created once a checkpoint has restored: a wrong model or a damaged checkpoint
      # leaves no events file behind.
      writer = writer or MetricsWriter(output_dir)
      write_jsonl_atomically(os.path.join(output_dir, f"{name}-{step}.json"), [row])
      with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
      writer.write(step, {k: v for k, v in row.items() if isinstance(v, float)})
    rows.append(row)
  return rows


def main(argv: list[str]) -> None:
  gin_setup.run_job(evaluate, argv, "Evaluate ul2x checkpoints with seqio metrics.",
                    "ul2x.trainer.predict")


if __name__ == "__main__":
  gin_setup.run_cli(main)
