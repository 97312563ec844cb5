"""The training loop's periodic work as hooks (after Levanter's `TrainerHooks`): logging,
evaluation, decoding evaluation, lm-eval, the step watchdog and the profiler are each a
`Hook`; the loop itself only steps, checks, saves and stops."""

import contextlib
import dataclasses
import os

import gin
import jax

from ul2x.trainer.console import say
from ul2x.trainer.steps import summarize


@dataclasses.dataclass
class StepInfo:
  """What a hook sees after a step: `state` is the train state after it, `metrics` the
  step's outputs (on the device), `last` is step == train_steps and `final` also holds on a
  stop request. `pause(first)` is a context for a hook's own work (an evaluation): the other
  hooks' clocks stop inside (`first`: the work compiles), and the time is no step time."""
  step: int
  state: dict
  metrics: dict
  last: bool
  final: bool
  skipped_steps: jax.Array
  job: object
  model_dir: str
  pause: object


class Hook:
  """One piece of the loop's work. The loop enters every hook (`with`) around the run,
  each hook's `around_step(step, compiling)` around each train step, and calls `after(info)`
  after it, in list order; `paused(first)` is entered while another hook works."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return None

  def around_step(self, step: int, compiling: bool):
    return contextlib.nullcontext()

  def after(self, info: StepInfo) -> None:
    pass

  def paused(self, first: bool):
    return contextlib.nullcontext()


class PeriodicHook(Hook):
  """Runs `run(info)` every `every` steps (0: never) and after the last step, inside
  `info.pause` (the first run counts as compiling)."""

  every = 0
  warm = False  # whether it has run (and compiled) once

  def after(self, info: StepInfo) -> None:
    if self.every and (info.step % self.every == 0 or info.last):
      with info.pause(not self.warm):
        self.run(info)
      self.warm = True

  def run(self, info: StepInfo) -> None:
    raise NotImplementedError


class LogHook(Hook):
  """Every `every` steps and at the final step: the progress line (`progress`) and the
  train scalars to TensorBoard; `scalars` holds the last logged ones."""

  def __init__(self, every: int, progress, writer):
    self.every, self.progress, self.writer = every, progress, writer
    self.scalars = {}

  def after(self, info: StepInfo) -> None:
    if info.step % self.every == 0 or info.final:
      metrics = jax.device_get(info.metrics)
      self.scalars = self.progress.report(
          info.step, {**metrics, "skipped_steps": int(info.skipped_steps)})
      self.writer.write(info.step, {**metrics, **self.scalars})


class EvalHook(PeriodicHook):
  """Every `every` steps: loss and accuracy summed over the fixed eval batches `batches`
  (global arrays) with `eval_fn(params, batch)`, to TensorBoard (`writer`) and the console."""

  def __init__(self, every: int, eval_fn, batches: list, writer):
    self.every, self.eval_fn, self.batches, self.writer = every, eval_fn, batches, writer

  def run(self, info: StepInfo) -> None:
    sums = [jax.device_get(self.eval_fn(info.state["params"], b)) for b in self.batches]
    totals = {k: sum(float(s[k]) for s in sums) for k in sums[0]}
    scalars = {k: float(v) for k, v in summarize(totals).items()}
    self.writer.write(info.step, scalars)
    say(f"eval step {info.step}  loss {scalars['loss']:.4f}  acc {scalars['accuracy']:.3f}")


class InferEvalHook(PeriodicHook):
  """Every `every` steps: `evaluator(params)` (decodes and applies the task's metrics,
  `trainer.predict.Evaluator`), to TensorBoard (`writer`) and the console."""

  def __init__(self, every: int, evaluator, writer):
    self.every, self.evaluator, self.writer = every, evaluator, writer

  def run(self, info: StepInfo) -> None:
    results = self.evaluator(info.state["params"])
    self.writer.write(info.step, results)
    say(f"infer eval step {info.step}  " + "  ".join(f"{k} {v:.4g}" for k, v in results.items()))


@gin.configurable
class LmEvalHook(PeriodicHook):
  """lm-eval during training (`train.hooks = [@LmEvalHook()]`): every `every` steps and
  after the last, the harness's `tasks` (names, or YAML tasks under `include_path`) on the
  current parameters; a TensorBoard scalar per task and metric under MODEL_DIR/lm_eval, a
  console line per task, and lm-eval's results JSON in MODEL_DIR/lm_eval/step-<N>/.
  `limit`, `num_fewshot`, `batch_size`, `max_length`, `max_gen_toks`, `mode_token` and
  `prefix_lm` are the lm_eval job's settings (docs/lm_eval.md); `mode_token` None: the
  one the run's task trains with, as the job reads it from the checkpoint's record."""

  def __init__(self, every: int = gin.REQUIRED, tasks=gin.REQUIRED,
               include_path: str | None = None, limit: int | None = None,
               num_fewshot: int | None = None, batch_size: int = 32, max_length: int = 2048,
               max_gen_toks: int = 256, mode_token: str | None = None, prefix_lm: bool = False):
    from ul2x.model.config import check_range
    check_range("LmEvalHook.every", every, 1, integer=True)
    self.every, self.tasks = every, [tasks] if isinstance(tasks, str) else list(tasks)
    if not self.tasks:
      raise ValueError("LmEvalHook.tasks is empty; name at least one lm-eval task, e.g. "
                       "--gin.LmEvalHook.tasks=\"['my_task']\".")
    self.include_path, self.limit, self.num_fewshot = include_path, limit, num_fewshot
    self.options = dict(batch_size=batch_size, max_length=max_length,
                        max_gen_toks=max_gen_toks, mode_token=mode_token, prefix_lm=prefix_lm)
    from ul2x.trainer import lm_eval_model  # lm-eval, an extra: only where a run asks for it
    self.lm_eval_model = lm_eval_model
    self.task_manager = lm_eval_model.find_tasks(self.tasks, include_path)  # indexed once
    self.writer = None

  def run(self, info: StepInfo) -> None:
    directory = os.path.join(info.model_dir, "lm_eval")
    if self.writer is None:  # the first run: the run's record is written by now
      from ul2x.trainer import record
      from ul2x.trainer.reporting import MetricsWriter
      self.lm_eval_model.check_vocabulary(info.model_dir)
      self.writer = MetricsWriter(directory)
      if self.options["mode_token"] is None:
        self.options["mode_token"] = record.trained_mode_token(info.model_dir)
    lm = self.lm_eval_model.UL2XLM(info.job, info.state["params"], **self.options)
    tracker = self.lm_eval_model.EvaluationTracker(
        output_path=os.path.join(directory, f"step-{info.step}"))
    results = self.lm_eval_model.evaluate(
        lm, self.tasks, include_path=self.include_path, num_fewshot=self.num_fewshot,
        limit=self.limit, tracker=tracker, model_name=f"step-{info.step}",
        task_manager=self.task_manager)
    if jax.process_index() == 0:
      tracker.save_results_aggregated(results=results, samples=None)
    scalars = {f"{task}/{k.split(',')[0]}": float(v)
               for task, metrics in results["results"].items() for k, v in metrics.items()
               if isinstance(v, float) and "stderr" not in k}
    self.writer.write(info.step, scalars)
    say(f"lm_eval step {info.step}  " + "  ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
