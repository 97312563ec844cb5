"""The training job: mesh, sharded state, data, jitted steps, the loop and its hooks,
checkpoints."""

import contextlib
import functools
import os

import gin
import jax
import numpy as np

from ul2x import partitioning
from ul2x.partitioning import report
from ul2x.model import TransformerConfig
from ul2x.model.config import check_range
from ul2x.model.flops import tokens_per_example, training_flops_per_example
from ul2x.tasks import pipeline
from ul2x.trainer import checkpoints, record, upcycling
from ul2x.trainer.checkpoints import Checkpointer
from ul2x.trainer.console import say
from ul2x.trainer.data import DataStream, check_data_shards
from ul2x.trainer.dry_run import DryRun
from ul2x.trainer.dry_run import dry_run as dry_run_report
from ul2x.trainer.hooks import EvalHook, Hook, InferEvalHook, LogHook, StepInfo
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.predict import Evaluator
from ul2x.trainer.preemption import StopRequest
from ul2x.trainer.profiling import StepProfiler, check_profile_steps
from ul2x.trainer.reporting import MetricsWriter, Progress, peak_flops_per_device
from ul2x.trainer.setup import Setup, setup
from ul2x.trainer.watchdog import StepWatchdog


def _check_batch_size(batch_size: int, num_microbatches: int, mesh, rules):
  spec = partitioning.batch_spec(rules, mesh)
  axes = partitioning.mesh_axes(spec[0] if len(spec) else None)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  need = np.lcm(shards * num_microbatches, jax.process_count())
  if batch_size % need:
    raise ValueError(
        f"batch_size={batch_size} must be divisible by {need} (batch shards {shards} x "
        f"num_microbatches {num_microbatches}, and {jax.process_count()} hosts); change "
        "--gin.train.batch_size, --gin.train.num_microbatches or the mesh.")


def _check_finite(nonfinite: int, on_nonfinite: str, checked: int, step: int, ckpt):
  """Stops ('stop') on a non-finite step since the last check, before anything is saved."""
  if nonfinite and on_nonfinite == "stop":
    kept = ckpt.latest_step()
    kept = "none" if kept is None else f"step {kept}"
    raise ValueError(
        f"the loss, gradients or updated parameters became non-finite between steps "
        f"{checked + 1} and {step}; "
        f"stopped without saving, so the newest checkpoint ({kept}) keeps the last good "
        "state. Lower the learning rate, clip gradients "
        "(--gin.create_optimizer.grad_clip_norm=1.0) or set "
        "--gin.train.on_nonfinite=\"'skip'\".")


def _restore_intact(job: Setup, directory: str, steps: list[int], fallback: bool,
                    train_stream: DataStream):
  """-> (state, data position) of the newest checkpoint that reads back whole, with
  `train_stream` moved to its position. With `fallback`, a damaged newer one is renamed
  `<step>.damaged` (kept for a look, and out of the way of the step's next save)."""
  for step in reversed(steps):
    try:
      restored = checkpoints.restore(directory, step, job.abstract_state(), job.shardings,
                                     data_stream=train_stream)
    except checkpoints.DamagedCheckpointError as e:
      if not fallback:
        raise ValueError(f"{e} Delete it to resume from an earlier checkpoint, or set "
                         "--gin.train.fallback_to_intact_checkpoint=True.") from None
      if jax.process_index() == 0:
        os.replace(os.path.join(directory, str(step)),
                   os.path.join(directory, f"{step}.damaged"))
      say(f"warning: {e} Moved it to {step}.damaged; trying the checkpoint before it.")
      continue
    say(f"resumed from {directory} at step {step}")
    return restored
  raise ValueError(f"no checkpoint in {directory} reads back whole (steps {steps}); "
                   "restore the files, or train from scratch in another MODEL_DIR.")


def _initial_state(job: Setup, *, init_checkpoint, init_assignment_map,
                   init_optimizer_state: bool, init_from_dense_checkpoint):
  """A fresh run's state: initialised, then fine-tuning's restore or MoE upcycling."""
  state = job.init_state()
  if init_checkpoint:
    directory, step = checkpoints.find_checkpoint(init_checkpoint)
    if init_optimizer_state:
      restored = job.restore_state(directory, step)
      state = {**restored, "step": state["step"]}
    else:
      state["params"], kept = checkpoints.restore_mapped_params(
          directory, step, state["params"], job.shardings["params"], init_assignment_map)
      if kept:
        say(f"fine-tuning: {len(kept)} parameter(s) kept as initialised: {', '.join(kept)}")
    say(f"fine-tuning from {directory} at step {step}")
  if init_from_dense_checkpoint:
    state["params"] = upcycling.restore_upcycled_params(
        init_from_dense_checkpoint, state["params"], job.shardings["params"], job.cfg)
  return state


@gin.configurable
def train(*, model_dir: str, train_steps: int, mixture_or_task_name: str,
          task_feature_lengths: dict, model_config: TransformerConfig | None = None,
          optimizer=None, mesh=None, batch_size: int = 16, num_microbatches: int = 1,
          z_loss: float = 1e-4, seed: int = 0, pack: bool = True, data_shards: int = 1,
          log_every: int = 10,
          eval_every: int = 100, eval_batches: int = 4, eval_split: str = "validation",
          checkpoint_every: int = 500, keep_checkpoints: int = 3,
          async_checkpointing: bool = True, logical_axis_rules=None,
          moe_aux_loss: float = 1e-2, router_z_loss: float = 1e-3,
          init_from_dense_checkpoint: str | None = None, init_checkpoint: str | None = None,
          init_assignment_map=(), init_optimizer_state: bool = False,
          infer_eval_every: int = 0, infer_eval_task: str | None = None,
          infer_eval_examples: int | None = 64, infer_eval_metrics=None,
          on_nonfinite: str = "stop",
          fallback_to_intact_checkpoint: bool = True,
          max_replicated_param_bytes: int | None = None, profile_steps=None,
          step_timeout_s: float | None = 1800.0, hooks=(),
          dry_run: DryRun | None = None) -> dict:
  """Trains until `train_steps`, resuming from the latest checkpoint in `model_dir`.

  `optimizer` is `(tx, schedule)` (gin: `train.optimizer = @create_optimizer()`),
  default `create_optimizer(train_steps)`; `mesh` defaults to `create_mesh()`.
  A fresh run with `init_checkpoint` (fine-tuning) starts from that checkpoint's
  params, renamed by `init_assignment_map` ([(regex, replacement or None)], see
  `checkpoints.restore_mapped_params`), at step 0 with a fresh optimizer state, or
  with its optimizer state too if `init_optimizer_state`. A fresh MoE run with
  `init_from_dense_checkpoint` (a dense run's MODEL_DIR) starts from that
  checkpoint's params, each MLP copied into every expert. Every `infer_eval_every`
  steps (0: never) the model decodes `infer_eval_examples` examples of `eval_split` of
  `infer_eval_task` (default: the training task) and logs the task's metrics, or the
  metrics named in `infer_eval_metrics` (keys of `tasks.metrics.METRICS`).

  A non-finite loss or gradient either stops the job (`on_nonfinite='stop'`: an error
  before the next save, so the newest checkpoint stays the last good state) or skips
  that step's update (`'skip'`, counted as `skipped_steps`). SIGTERM or SIGINT finish
  the current step, save a checkpoint there and return. A damaged latest checkpoint
  stops the job with one line, or with `fallback_to_intact_checkpoint` the job
  resumes from the newest intact earlier one, saying which it skipped.

  The batches are a function of `seed`, the step and `data_shards` (the number of
  seqio shards a global batch is cut into; each process reads only the shards holding
  its rows), not of the process count; each checkpoint holds the input iterators'
  state, so a job resumes at any step, on any number of processes, in constant time
  and with the batches an uninterrupted run would have had (docs/data.md).

  At start-up one line names the parameters the mesh leaves fully replicated; one
  over `max_replicated_param_bytes` (None: no limit) stops the job. `profile_steps`
  `(first, last)` traces those steps into MODEL_DIR/profile/ (docs/training.md).
  When no step finishes within `step_timeout_s` seconds (None: no limit; the first
  step's compilation and the first evaluations' do not count), every thread's stack
  goes to MODEL_DIR/hang-<process>.txt and the process exits with status 3.
  `hooks` are more `trainer.hooks.Hook`s, run after each step after the built-in ones
  (logging, evaluation, decoding evaluation), e.g. `train.hooks = [@LmEvalHook()]`.
  With `dry_run` (the CLI's --dry_run) nothing is trained, read or written: the train
  step is compiled for the mesh and `dry_run.dry_run`'s report is returned.

  Returns the last logged metrics (a dict of floats).
  """
  integers = dict(train_steps=(train_steps, 1), batch_size=(batch_size, 1),
                  num_microbatches=(num_microbatches, 1), log_every=(log_every, 1),
                  checkpoint_every=(checkpoint_every, 1), keep_checkpoints=(keep_checkpoints, 1),
                  eval_every=(eval_every, 0), eval_batches=(eval_batches, 0),
                  infer_eval_every=(infer_eval_every, 0))
  for name, (value, least) in integers.items():
    check_range("train." + name, value, least, integer=True)
  for name, value in dict(z_loss=z_loss, moe_aux_loss=moe_aux_loss,
                          router_z_loss=router_z_loss).items():
    check_range("train." + name, value, 0)
  if step_timeout_s is not None:
    check_range("train.step_timeout_s", step_timeout_s, 0, low_open=True)
  if on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"train.on_nonfinite={on_nonfinite!r} is not 'stop' or 'skip'.")
  check_profile_steps(profile_steps, train_steps)
  max_replicated_param_bytes = report.byte_limit(max_replicated_param_bytes,
                                                 "train.max_replicated_param_bytes")
  cfg = _model_config(model_dir, model_config, init_checkpoint)
  job = setup(cfg, mesh=mesh, rules=logical_axis_rules, seed=seed,
              optimizer=optimizer or create_optimizer(train_steps))
  _check_batch_size(batch_size, num_microbatches, job.mesh, job.rules)
  check_data_shards(data_shards, batch_size)
  replicated = _report_replicated(job, max_replicated_param_bytes)
  step_options = dict(num_microbatches=num_microbatches, z_loss=z_loss,
                      moe_aux_loss=moe_aux_loss, router_z_loss=router_z_loss,
                      dropout_seed=seed, skip_nonfinite=on_nonfinite == "skip")
  if dry_run is not None:
    pipeline.check_feature_lengths(pipeline.mixture_or_task(mixture_or_task_name),
                                   task_feature_lengths)
    return dry_run_report(job, dry_run, batch_size=batch_size,
                          task_feature_lengths=task_feature_lengths,
                          step_options=step_options, replicated=replicated)
  # Data and evaluation are checked before anything is written into MODEL_DIR.
  data = _datasets(job, mixture_or_task_name, task_feature_lengths, batch_size=batch_size,
                   seed=seed, pack=pack, data_shards=data_shards, eval_split=eval_split,
                   eval_batches=eval_batches if eval_every else 0)
  infer_eval = infer_eval_every and Evaluator(
      job, infer_eval_task or mixture_or_task_name, split=eval_split,
      task_feature_lengths=task_feature_lengths, batch_size=batch_size,
      max_decode_len=None, num_examples=infer_eval_examples, metric_names=infer_eval_metrics)
  directory = os.path.join(model_dir, "checkpoints")
  saved = checkpoints.checkpoint_steps(directory)
  if saved:  # before the checkpoint manager lists the steps
    state, data_position = _restore_intact(job, directory, saved,
                                           fallback_to_intact_checkpoint, data[0])
    writers = data_position.get("process_count", jax.process_count())
    if writers != jax.process_count():
      say(f"the checkpoint was written by {writers} process(es) and this job has "
          f"{jax.process_count()}; the batches continue unchanged.")
    data_position = {**data_position, "process_count": jax.process_count(),
                     "data_shards": data_shards}
  else:  # before the checkpoint manager creates anything in MODEL_DIR
    state = _initial_state(job, init_checkpoint=init_checkpoint,
                           init_assignment_map=init_assignment_map,
                           init_optimizer_state=init_optimizer_state,
                           init_from_dense_checkpoint=init_from_dense_checkpoint)
    data_position = {"train_batches": 0, "process_count": jax.process_count(),
                     "data_shards": data_shards}
  _write_config(model_dir, job, mixture_or_task_name, task_feature_lengths)
  ckpt = Checkpointer(directory, every=checkpoint_every, max_to_keep=keep_checkpoints,
                      async_save=async_checkpointing)
  try:
    start = int(state["step"])
    if start >= train_steps:
      say(f"already trained to step {start} (train_steps={train_steps}) in {model_dir}; "
          "raise TRAIN_STEPS or use a new MODEL_DIR to train more.")
      return {}
    lengths = pipeline.feature_lengths_for(job.cfg.architecture, task_feature_lengths)
    progress = Progress(train_steps, batch_size * tokens_per_example(job.cfg, lengths),
                        batch_size * training_flops_per_example(job.cfg, lengths),
                        peak_flops_per_device())
    log, all_hooks = _hooks(job, data, model_dir=model_dir, start=start,
                            train_steps=train_steps, progress=progress, log_every=log_every,
                            z_loss=z_loss, eval_every=eval_every,
                            infer_eval_every=infer_eval_every, infer_eval=infer_eval,
                            profile_steps=profile_steps, step_timeout_s=step_timeout_s,
                            extra=hooks)
    _loop(job, state, data_position, ckpt, data[0], all_hooks, model_dir=model_dir,
          start=start, train_steps=train_steps, step_options=step_options,
          check_every=log_every, on_nonfinite=on_nonfinite, progress=progress)
    return log.scalars
  finally:
    ckpt.close()


def _datasets(job: Setup, name: str, task_feature_lengths: dict, *, batch_size: int,
              seed: int, pack: bool, data_shards: int, eval_split: str, eval_batches: int):
  """-> (this host's DataStream of train batches, its rows of the first `eval_batches`
  eval batches (numpy) or None); raises for an unknown task or split, or one that
  yields no example."""
  kwargs = dict(batch_size=batch_size, data_shards=data_shards, sharding=job.batch_sharding,
                architecture=job.cfg.architecture, pack=pack, seed=seed)
  train_stream = DataStream(name, task_feature_lengths, "train", **kwargs)
  train_stream.check_saveable()  # now, not at the first checkpoint
  if not eval_batches:
    return train_stream, None
  eval_stream = DataStream(name, task_feature_lengths, eval_split, **kwargs)
  return train_stream, [next(eval_stream) for _ in range(eval_batches)]


def _report_replicated(job: Setup, limit: int | None) -> list:
  """Says which parameters the mesh leaves fully replicated (one line); raises if the
  largest is over `limit` bytes (already checked by `report.byte_limit`)."""
  abstract_params = job.abstract_state()["params"]
  specs = jax.tree.map(lambda s: s.spec, job.shardings["params"])
  replicated = report.replicated_params(abstract_params, job.param_axes, specs, job.mesh,
                                        job.rules)
  if replicated:
    say(report.replicated_summary(replicated, len(jax.tree.leaves(abstract_params))))
  report.check_replicated(replicated, limit, "train.max_replicated_param_bytes")
  return replicated


def _model_config(model_dir: str, given: TransformerConfig | None,
                  init_checkpoint: str | None) -> TransformerConfig:
  """`given`, else the gin model over the record of the run being resumed (changes to
  its FIXED fields refused) or of the checkpoint fine-tuning starts from (any field may
  change), else the gin model alone."""
  if given is None and checkpoints.checkpoint_steps(os.path.join(model_dir, "checkpoints")):
    return record.model_config(model_dir)
  if given is None and init_checkpoint:
    return record.model_config(init_checkpoint, fixed=False)
  return given or TransformerConfig()  # gin fills in the model file's bindings


def _write_config(model_dir: str, job: Setup, task: str, task_feature_lengths: dict) -> None:
  """MODEL_DIR/config.gin, the full gin config of the run; MODEL_DIR/ul2x_model.json, what
  its checkpoints are (trainer/record.py); MODEL_DIR/model-info.txt, the layout of every
  state leaf (process 0)."""
  if jax.process_index() != 0:
    return
  from ul2x.trainer.record import task_mode_tokens
  provider = pipeline.mixture_or_task(task)
  gin_token = gin.get_bindings("prepend_mode_token").get("mode_token")
  try:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
      f.write(gin.config_str())
    record.write(model_dir, job.cfg, vocabulary=provider.output_features["targets"].vocabulary,
                 task=task, mode_tokens=sorted(task_mode_tokens(provider, gin_token),
                                               key=lambda t: t or ""),
                 task_feature_lengths=task_feature_lengths)
    with open(os.path.join(model_dir, "model-info.txt"), "w") as f:
      f.write(report.model_info(job.abstract_state(), job.shardings, job.param_axes, job.mesh))
  except OSError as e:
    raise ValueError(f"cannot write MODEL_DIR {model_dir!r} ({e.strerror}); choose a "
                     "writable directory with --gin.MODEL_DIR.") from None


def _hooks(job: Setup, data, *, model_dir, start, train_steps, progress, log_every, z_loss,
           eval_every, infer_eval_every, infer_eval, profile_steps, step_timeout_s,
           extra) -> tuple[LogHook, list[Hook]]:
  """(the logging hook, every hook in the order they run after a step)."""
  train_writer = MetricsWriter(os.path.join(model_dir, "train"))
  eval_writer = MetricsWriter(os.path.join(model_dir, "eval"))
  log = LogHook(log_every, progress, train_writer)
  hooks = [StepWatchdog(step_timeout_s, model_dir, start),
           StepProfiler(profile_steps, os.path.join(model_dir, "profile"), start), log]
  if data[1]:
    hooks.append(EvalHook(eval_every, job.eval_step(z_loss=z_loss),
                          [job.global_batch(b) for b in data[1]], eval_writer))
  if infer_eval:
    hooks.append(InferEvalHook(infer_eval_every, infer_eval, eval_writer))
  return log, hooks + list(extra)


def _loop(job: Setup, state, data_position, ckpt, train_stream, hooks: list[Hook], *,
          model_dir, start, train_steps, step_options, check_every, on_nonfinite,
          progress) -> None:
  """Steps from `start` to `train_steps`: after each step the non-finite check (every
  `check_every` steps and before a save), then the hooks, then the checkpoint; a stop
  request ends the loop after saving. Checkpoints and stops stay here, not in hooks: a
  save must follow the check, and a stop must follow the save."""
  step_fn = job.train_step(**step_options)
  nonfinite, checked = 0, start
  progress.mark(start)

  @contextlib.contextmanager
  def pause(step: int, first: bool):
    with contextlib.ExitStack() as paused:
      for hook in hooks:
        paused.enter_context(hook.paused(first))
      yield
    progress.mark(step)  # the hook's time is no step time

  with StopRequest() as stop, contextlib.ExitStack() as entered:
    for hook in hooks:
      entered.enter_context(hook)
    for step in range(start + 1, train_steps + 1):
      compiling = step == start + 1
      with contextlib.ExitStack() as around:
        for hook in hooks:
          around.enter_context(hook.around_step(step, compiling))
        batch = job.global_batch(next(train_stream))
        with progress.paused("compile", compiling):
          state, metrics = step_fn(state, batch)
      data_position["train_batches"] += 1
      nonfinite = nonfinite + metrics["nonfinite"]  # on the device: no sync per step
      stopping = stop.requested()
      final = step == train_steps or stopping
      if step % check_every == 0 or final or ckpt.due(step):
        _check_finite(int(nonfinite), on_nonfinite, checked, step, ckpt)
        checked = step
      info = StepInfo(step, state, metrics, last=step == train_steps, final=final,
                      skipped_steps=nonfinite, job=job, model_dir=model_dir,
                      pause=functools.partial(pause, step))
      for hook in hooks:
        hook.after(info)
      with progress.paused("save", ckpt.due(step, final)):
        ckpt.maybe_save(step, state, data_position, final=final, data_stream=train_stream)
      if stopping:
        ckpt.wait()
        say(f"stopped by {stop.signal_name or 'a peer'} at step {step}: checkpoint saved in "
            f"{ckpt.directory}; run the same command again to resume.")
        return
  ckpt.wait()
  say(f"checkpoints: {ckpt.directory}\ntensorboard: {os.path.abspath(model_dir)} "
      f"(tensorboard --logdir {os.path.abspath(model_dir)})")
