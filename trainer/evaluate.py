"""The eval job: seqio evaluation (the task's postprocessor and metric functions on
decoded predictions) of one checkpoint or of every checkpoint in a directory, skipping
those already evaluated; results to JSON per step, one JSONL row per step, TensorBoard."""

import json
import os

import gin
import jax

from ul2x.model import TransformerConfig
from ul2x.tasks import inference, metrics, pipeline
from ul2x.trainer import checkpoints, record
from ul2x.trainer.console import say
from ul2x.trainer.infer import run_examples, write_jsonl_atomically
from ul2x.trainer.setup import Setup, setup


def metric_tasks(name: str, named_metrics: bool = False) -> list[str]:
  """The task `name`, or a mixture's member tasks, that have metric functions (all of
  them when the metrics are named in gin)."""
  provider = pipeline.mixture_or_task(name)
  tasks = getattr(provider, "tasks", [provider])
  names = [t.name for t in tasks if t.predict_metric_fns or named_metrics]
  if not names:
    raise ValueError(f"{name!r} has no metric functions to evaluate; register the task with "
                     "metric_fns (e.g. register_finetune_task(..., metric_fns=[exact_match])).")
  return names


class Evaluator:
  """Decodes each task's examples with given params and applies the task's metrics."""

  def __init__(self, job: Setup, mixture_or_task_name: str, *, split: str,
               task_feature_lengths: dict, batch_size: int, max_decode_len: int | None,
               num_examples: int | None, metric_names=None):
    self.job, self.batch_size, self.lengths = job, batch_size, task_feature_lengths
    self.max_decode_len = max_decode_len
    self.metric_fns = None if metric_names is None else metrics.metric_fns(metric_names)
    self.examples = {t: inference.task_examples(t, split, task_feature_lengths, num_examples)
                     for t in metric_tasks(mixture_or_task_name, metric_names is not None)}

  def __call__(self, params) -> dict[str, float]:
    """-> {'<task>/<metric>': value}."""
    results = {}
    for task, examples in self.examples.items():
      decoded = run_examples(self.job, params, examples, mode="predict", what=f"eval {task}",
                             task_feature_lengths=self.lengths, batch_size=self.batch_size,
                             max_decode_len=self.max_decode_len)
      vocabulary = inference.targets_vocabulary(task)
      texts = [inference.decode(r["prediction"], vocabulary) for r in decoded]
      _, values = inference.postprocess_and_evaluate(task, examples, texts, self.metric_fns)
      results.update({f"{task}/{k}": float(v) for k, v in values.items()})
    return results


def _steps(path: str, which) -> tuple[str, list[int]]:
  """(checkpoints directory, steps to evaluate): `which` is 'all', 'latest' or a list."""
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


@gin.configurable
def evaluate(*, checkpoint_path: str, output_dir: str, mixture_or_task_name: str | None = None,
             task_feature_lengths: dict | None = None,
             model_config: TransformerConfig | None = None,
             split: str = "validation", batch_size: int = 32,
             max_decode_len: int | None = None, num_examples: int | None = None,
             checkpoint_steps="all", metrics=None, mesh=None) -> list[dict]:
  """Evaluates each chosen checkpoint not yet evaluated in `output_dir`; writes
  `<output_dir>/<name>-<step>.json`, appends a row to `<output_dir>/metrics.jsonl` and
  TensorBoard scalars to `<output_dir>/`, each only after its checkpoint restored and
  was evaluated. `metrics` (names in `tasks.metrics.METRICS`) replaces the tasks' own
  metric functions. The task, the feature lengths and the model default to those the
  checkpoint records. Returns the new rows."""
  from ul2x.trainer.metrics import MetricsWriter  # TensorBoard: TensorFlow
  if max_decode_len is not None and max_decode_len < 1:
    raise ValueError(f"evaluate.max_decode_len={max_decode_len} must be at least 1.")
  directory, steps = _steps(checkpoint_path, checkpoint_steps)
  model_config = record.model_config(checkpoint_path, model_config)
  task_feature_lengths = record.task_feature_lengths(checkpoint_path, task_feature_lengths)
  mixture_or_task_name = record.task(checkpoint_path, mixture_or_task_name)
  job = setup(model_config, mesh=mesh)
  evaluator = Evaluator(job, mixture_or_task_name, split=split,
                        task_feature_lengths=task_feature_lengths, batch_size=batch_size,
                        max_decode_len=max_decode_len, num_examples=num_examples,
                        metric_names=metrics)
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
