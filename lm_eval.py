"""The lm_eval job: a checkpoint on EleutherAI's LM Evaluation Harness tasks, through the
ul2x lm-eval model (trainer/lm_eval_model.py); lm-eval's results JSON written.

  python -m ul2x.lm_eval --gin_file=gin_configs/runs/lm_eval.gin \
    --gin.CHECKPOINT_PATH="'/tmp/run'" ...

jax, lm-eval, seqio and TensorFlow are imported inside `run_lm_eval`, after `gin_setup`
has checked the config: a config error comes in a fraction of a second."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402


def run_lm_eval(*, checkpoint_path: str, output_dir: str, tasks: list[str],
                include_path: str | None = None, model_config=None,
                num_fewshot: int | None = None, limit: int | None = None,
                batch_size: int = 32, max_length: int = 2048, max_gen_toks: int = 256,
                mode_token: str | None = "auto", prefix_lm: bool = False,
                log_samples: bool = False, step: int | None = None, mesh=None) -> dict:
  """Evaluates the checkpoint on lm-eval `tasks` (names of lm-eval's tasks or of YAML
  tasks under `include_path`) and writes lm-eval's results JSON
  (`output_dir/<checkpoint>/results_<date>.json`, and the samples with `log_samples`).
  `model_config`: a `TransformerConfig`, or None for the recorded model; `mode_token`
  'auto' (`record.TRAINED_MODE_TOKEN`): that of the task the checkpoint was trained on.
  -> lm-eval's results dict."""
  import jax

  from ul2x.trainer import lm_eval_model, record
  from ul2x.trainer.console import say
  from ul2x.trainer.setup import setup
  if isinstance(tasks, str):
    tasks = [tasks]
  if not tasks:
    raise ValueError("LM_EVAL_TASKS is empty; name at least one lm-eval task, e.g. "
                     "--gin.LM_EVAL_TASKS=\"['my_task']\".")
  if max_gen_toks < 1 or max_length < 2:
    raise ValueError(f"lm_eval.max_gen_toks={max_gen_toks} and lm_eval.max_length={max_length} "
                     "must be at least 1 and 2.")
  lm_eval_model.check_vocabulary(checkpoint_path, step)
  job = setup(record.model_config(checkpoint_path, model_config, step=step), mesh=mesh)
  state = job.restore_state(checkpoint_path, step)
  if mode_token == record.TRAINED_MODE_TOKEN:
    mode_token = record.trained_mode_token(checkpoint_path, step)
  lm = lm_eval_model.UL2XLM(job, state["params"], batch_size=batch_size, max_length=max_length,
                            max_gen_toks=max_gen_toks, mode_token=mode_token,
                            prefix_lm=prefix_lm)
  at = int(state["step"])
  say(f"lm_eval: {', '.join(tasks)} with the checkpoint at step {at}")
  tracker = lm_eval_model.EvaluationTracker(output_path=output_dir)
  results = lm_eval_model.evaluate(lm, tasks, include_path=include_path,
                                   num_fewshot=num_fewshot, limit=limit,
                                   log_samples=log_samples, tracker=tracker,
                                   model_name=f"{checkpoint_path}-{at}")
  samples = results.pop("samples", None)
  if jax.process_index() == 0:
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"] if samples else ():
      tracker.save_results_samples(task_name=task, samples=samples[task])
  for task, metrics in results["results"].items():
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if isinstance(v, float) and "stderr" not in k)
    say(f"{task}: {shown}")
  say(f"wrote lm-eval results to {output_dir}")
  return results


def main(argv: list[str]) -> None:
  gin_setup.run_job(run_lm_eval, argv, "Evaluate a ul2x checkpoint on lm-eval tasks.",
                    "ul2x.trainer.lm_eval_model", name="lm_eval")


if __name__ == "__main__":
  gin_setup.run_cli(main)
