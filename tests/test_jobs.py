"""The job family end to end through the command line: train the tiny model on the
learnable `ul2x_reverse` task, decode it with `ul2x.infer` (greedy, beam, score), evaluate
every checkpoint with `ul2x.eval`, fine-tune from it, and each bad input's one line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from cli_utils import cpu_env, one_line_error, rows, run_job

# Two simulated devices (data=2): a sharded batch at a fraction of eight devices' cost.
# The Makefile runs pytest with --dist loadfile, so the trained fixture is built once.
ENV = cpu_env(2)
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}"
MODEL = "--gin_file=gin_configs/models/tiny.gin"
TRAIN = [MODEL, "--gin_file=gin_configs/runs/pretrain.gin", LENGTHS,
         "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'", "--gin.BATCH_SIZE=32",
         "--gin.train.log_every=100", "--gin.train.eval_every=0",
         "--gin.learning_rate_schedule.schedule='constant'",
         "--gin.learning_rate_schedule.learning_rate=0.005",
         "--gin.learning_rate_schedule.warmup_steps=20"]
STEPS = 500


def cli(job: str, *args):
  return subprocess.run([sys.executable, "-m", f"ul2x.{job}", *args], capture_output=True,
                        text=True, env=ENV, timeout=600)


def infer_args(checkpoint, out) -> list[str]:
  return [MODEL, "--gin_file=gin_configs/runs/infer.gin", LENGTHS,
          f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.INFER_OUTPUT_DIR='{out}'"]


def infer(checkpoint, out, *args):
  return cli("infer", *infer_args(checkpoint, out), *args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """MODEL_DIR of a 500-step run with checkpoints at steps 200, 400 and 500."""
  model_dir = tmp_path_factory.mktemp("reverse")
  result = cli("train", *TRAIN, f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}",
               "--gin.train.checkpoint_every=200")
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


def exact_match(predictions):
  """Percent of rows whose prediction is the target, from the JSONL alone."""
  hits = [r["prediction"] == r["targets"] for r in predictions]
  return 100.0 * sum(hits) / len(hits)


def test_infer_decodes_the_trained_task_and_eval_agrees(trained, tmp_path):
  result = infer(trained, tmp_path, "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'")
  assert result.returncode == 0, result.stderr[-3000:]
  greedy = rows(tmp_path / f"ul2x_reverse-validation-predict-{STEPS}.jsonl")
  assert len(greedy) == 200 and set(greedy[0]) == {"inputs", "targets", "prediction", "score"}
  # The inputs as given, without the [S2S] the model reads: as a file's lines are.
  assert all(r["inputs"][::-1] == r["targets"] for r in greedy)
  # Learned (an untrained model reverses ~0%); the figure varies with the host's CPU, as
  # XLA's float32 code does: 88% on an AVX-512 AMD EPYC, over 90% on another host.
  assert exact_match(greedy) >= 80.0, exact_match(greedy)
  assert "infer 200/200" in result.stdout

  out = tmp_path / "eval"
  args = [MODEL, "--gin_file=gin_configs/runs/eval.gin", LENGTHS,
          f"--gin.CHECKPOINT_PATH='{trained}'", f"--gin.EVAL_OUTPUT_DIR='{out}'",
          "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'"]
  result = cli("eval", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  # Off a terminal, one progress line per checkpoint: the last.
  progress = [line for line in result.stdout.splitlines() if "ex/s" in line]
  assert len(progress) == 3 and all("eval ul2x_reverse 200/200" in p for p in progress), \
      result.stdout
  evaluated = rows(out / "metrics.jsonl")
  assert [r["step"] for r in evaluated] == [200, 400, STEPS]
  assert evaluated[-1]["ul2x_reverse/exact_match"] == pytest.approx(exact_match(greedy))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
  # The rerun names only the checkpoint: model, lengths and task come from its record.
  again = run_job("eval", args[1], args[3], args[4])
  assert again.returncode == 0 and "skipping steps [200, 400, 500]" in again.stdout, \
      again.stderr[-2000:]
  assert len(rows(out / "metrics.jsonl")) == 3

  # Beam search (alpha 0: raw log-probabilities) finds sequences at least as likely.
  beam_dir = tmp_path / "beam"
  result = infer(trained, beam_dir, "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'",
                 "--gin.make_predict_fn.method='beam'", "--gin.make_predict_fn.alpha=0.0",
                 "--gin.infer.num_examples=64")
  assert result.returncode == 0, result.stderr[-3000:]
  beam = rows(beam_dir / f"ul2x_reverse-validation-predict-{STEPS}.jsonl")
  assert all(b["score"] >= g["score"] - 1e-4 for b, g in zip(beam, greedy))


def test_infer_on_a_file_predicts_and_scores(trained, tmp_path):
  inputs = tmp_path / "prompts.jsonl"
  inputs.write_text('{"inputs": "abcd", "targets": "dcba"}\n{"inputs": "hij", "targets": "hij"}\n')
  common = ["--gin.INPUT_FILE='%s'" % inputs, "--gin.infer.mode_token='[S2S]'"]
  result = run_job("infer", *infer_args(trained, tmp_path), *common)
  assert result.returncode == 0, result.stderr[-3000:]
  predicted = rows(tmp_path / f"prompts-predict-{STEPS}.jsonl")
  assert [r["prediction"] for r in predicted] == ["dcba", "jih"]
  result = run_job("infer", *infer_args(trained, tmp_path), *common, "--gin.infer.mode='score'")
  assert result.returncode == 0, result.stderr[-3000:]
  scored = rows(tmp_path / f"prompts-score-{STEPS}.jsonl")
  assert scored[0]["score"] == pytest.approx(predicted[0]["score"], abs=1e-4)
  assert scored[1]["score"] < scored[0]["score"] - 5  # 'hij' is not the reversal
  # Nothing is written over existing results.
  before = (tmp_path / f"prompts-predict-{STEPS}.jsonl").read_text()
  one_line_error(run_job("infer", *infer_args(trained, tmp_path), *common), "exists",
                 "--gin.infer.overwrite=True")
  assert (tmp_path / f"prompts-predict-{STEPS}.jsonl").read_text() == before


def test_infer_says_which_prompts_it_cut(trained, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"inputs": "abcdefghijabcdefghij"}\n{"inputs": "abcd", "targets": "dcba"}\n')
  result = run_job("infer", *infer_args(trained, tmp_path), f"--gin.INPUT_FILE='{prompts}'")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "cut to TASK_FEATURE_LENGTHS: 1 of 2 inputs (to 16 tokens)" in result.stdout
  long, short = rows(tmp_path / f"prompts-predict-{STEPS}.jsonl")
  assert long["inputs"] == "abcdefghijabcdefghij" and long["truncated"] == ["inputs"]
  assert set(short) == {"inputs", "targets", "prediction", "score"}
  assert short["prediction"] == short["targets"] == "dcba"


def test_bad_inputs_give_one_line(trained, tmp_path):
  """In this process, as the commands run them (tests/cli_utils.py)."""
  task = "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'"
  one_line_error(run_job("infer", *infer_args(tmp_path / "empty", tmp_path), task),
                 "holds no checkpoint")
  args = infer_args(trained, tmp_path)
  one_line_error(run_job("infer", *args, "--gin.INPUT_FILE='/nonexistent.jsonl'"),
                 "/nonexistent.jsonl")
  bad = tmp_path / "in" / "bad.jsonl"
  bad.parent.mkdir()
  bad.write_text('{"inputs": "ab"}\nnot json\n')
  one_line_error(run_job("infer", *args, f"--gin.INPUT_FILE='{bad}'"), "line 2")
  one_line_error(run_job("infer", *args, task, "--gin.infer.max_decode_len=0"),
                 "max_decode_len=0")
  # The checkpoint's record refuses a gin model that contradicts it, naming the field.
  one_line_error(run_job("infer", *args, task, "--gin.TransformerConfig.emb_dim=64"),
                 "TransformerConfig.emb_dim=64", "trained with emb_dim=128", "ul2x_model.json")
  one_line_error(run_job("infer", *args, task, "--gin.TransformerConfig.vocab_size=512"),
                 "TransformerConfig.vocab_size=512", "trained with vocab_size=384")
  eval_args = [MODEL, "--gin_file=gin_configs/runs/eval.gin", LENGTHS,
               f"--gin.CHECKPOINT_PATH='{trained}'", f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'"]
  one_line_error(run_job("eval", *eval_args, task.replace("ul2x_reverse", "ul2x_span_corruption")),
                 "no metric functions")
  one_line_error(run_job("eval", *eval_args, task, "--gin.evaluate.metrics=['bleurt']"),
                 "unknown metric(s) ['bleurt']")
  assert not list(tmp_path.glob("*.jsonl"))


def test_fine_tuning_needs_an_assignment_map_for_new_parameters(trained, tmp_path):
  finetune = [*TRAIN[:1], "--gin_file=gin_configs/runs/finetune.gin", *TRAIN[2:5],
              f"--gin.INITIAL_CHECKPOINT_PATH='{trained}'", "--gin.TRAIN_STEPS=2",
              "--gin.train.log_every=1", "--gin.TransformerConfig.num_decoder_layers=3"]
  result = run_job("train", *finetune, f"--gin.MODEL_DIR='{tmp_path / 'a'}'")
  one_line_error(result, "decoder/layers/2/", "train.init_assignment_map")
  assert not (tmp_path / "a" / "checkpoints").exists()
  # No model gin file: the pretrained checkpoint's recorded model, the binding over it.
  result = run_job("train", *finetune[1:], f"--gin.MODEL_DIR='{tmp_path / 'b'}'",
                   "--gin.train.init_assignment_map=[(r'decoder/layers/2/.*', None)]")
  assert result.returncode == 0, result.stderr[-3000:]
  tuned = json.loads((tmp_path / "b" / "ul2x_model.json").read_text())
  pretrained = json.loads((trained / "ul2x_model.json").read_text())
  assert tuned["model"] == {**pretrained["model"], "num_decoder_layers": 3}
  assert "kept as initialised" in result.stdout and "fine-tuning from" in result.stdout
  first = next(line for line in result.stdout.splitlines() if line.startswith("step 1/2"))
  # Chance is ln(384) = 5.95; a fresh model starts there, a pretrained one far below.
  assert float(first.split("loss ")[1].split()[0]) < 3.0, first


def _copy_run(trained, path, task: str | None = None, extra_config: str = ""):
  """A MODEL_DIR holding a copy of `trained`'s last checkpoint, as saved before records
  (without its step's copy of the record), and its config.gin, with
  MIXTURE_OR_TASK_NAME replaced by `task` and `extra_config` appended."""
  step = path / "checkpoints" / str(STEPS)
  shutil.copytree(trained / "checkpoints" / str(STEPS), step)
  shutil.rmtree(step / "record")
  manifest = json.loads((step / "ul2x_files.json").read_text())
  (step / "ul2x_files.json").write_text(json.dumps(
      {name: v for name, v in manifest.items() if not name.startswith("record/")}))
  config = (trained / "config.gin").read_text()
  if task:
    config = config.replace("MIXTURE_OR_TASK_NAME = 'ul2x_reverse'",
                            f"MIXTURE_OR_TASK_NAME = '{task}'")
  (path / "config.gin").write_text(config + extra_config)
  return path


def _truncate_largest_file(step_dir):
  files = [os.path.join(root, n) for root, _, names in os.walk(step_dir) for n in names]
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(100)


def test_a_refused_checkpoint_leaves_no_output(trained, tmp_path):
  """Eval, infer and export restore the checkpoint before they create anything."""
  task = "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'"
  wrong = ("--gin.TransformerConfig.emb_dim=64",)
  damaged = _copy_run(trained, tmp_path / "damaged")
  _truncate_largest_file(damaged / "checkpoints" / str(STEPS))
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("abcd\n")
  for checkpoint, extra, reason in ((trained, wrong, "emb_dim=128"), (damaged, (), "is damaged")):
    out = tmp_path / "out"
    eval_args = [MODEL, "--gin_file=gin_configs/runs/eval.gin", LENGTHS, task,
                 f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.EVAL_OUTPUT_DIR='{out}'"]
    one_line_error(run_job("eval", *eval_args, *extra), reason)
    assert not out.exists()
    for inputs in (task, f"--gin.INPUT_FILE='{prompts}'"):
      one_line_error(run_job("infer", *infer_args(checkpoint, out), inputs, *extra), reason)
      assert not out.exists()
    one_line_error(run_job("export", MODEL, "--gin_file=gin_configs/runs/export.gin",
                           f"--gin.CHECKPOINT_PATH='{checkpoint}'",
                           f"--gin.EXPORT_DIR='{out / 'hf'}'",
                           "--gin.export.format='safetensors'", *extra), reason)
    assert not out.exists()


def test_infer_on_a_file_leads_with_the_trained_tasks_mode_token(trained, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("abcd\nhij\n")

  def run(checkpoint, out, *args):
    result = run_job("infer", *infer_args(checkpoint, tmp_path / out),
                     f"--gin.INPUT_FILE='{prompts}'", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, rows(tmp_path / out / f"prompts-predict-{STEPS}.jsonl")

  said = "infer: prompts get the mode token '[S2S]' of 'ul2x_reverse'"
  stdout, auto = run(trained, "auto")  # ul2x_reverse leads its inputs with [S2S]
  assert said in stdout and [r["prediction"] for r in auto] == ["dcba", "jih"]
  stdout, none = run(trained, "none", "--gin.infer.mode_token=None")  # an explicit None wins
  assert "infer: prompts get" not in stdout
  assert all(abs(n["score"] - a["score"]) > 1e-3 for n, a in zip(none, auto))

  # A run whose task led with no mode token: prompts get none, as before, silently.
  plain = _copy_run(trained, tmp_path / "plain", "ul2x_span_corruption")
  stdout, untold = run(plain, "plain")
  assert "infer:" not in stdout and untold == none
  # A mixture of tasks with different mode tokens: none, and a line saying so.
  mixture = _copy_run(trained, tmp_path / "mixture", "ul2x_ul2")
  stdout, mixed = run(mixture, "mixture")
  assert "'ul2x_ul2', which the checkpoint was trained on, leads its inputs with [NLG], " \
      "[NLU], [S2S]" in stdout and mixed == none
  # A task that chose its mode token in gin and is not registered here: refused, not
  # guessed.
  unknown = _copy_run(trained, tmp_path / "unknown", "my_qa",
                      "prepend_mode_token.mode_token = '[NLU]'\n")
  result = run_job("infer", *infer_args(unknown, tmp_path / "refused"),
                   f"--gin.INPUT_FILE='{prompts}'")
  one_line_error(result, "'my_qa' is not registered here",
                 "--gin.infer.mode_token=\"'[NLU]'\"")
  assert not (tmp_path / "refused").exists()


def test_a_recorded_checkpoint_needs_no_model_gin_file(trained, tmp_path):
  """Training records the model, vocabulary, task, mode token and feature lengths; infer,
  eval and export of the checkpoint need nothing else and give what they give with the
  gin model file."""
  saved = json.loads((trained / "ul2x_model.json").read_text())
  assert saved["model"]["emb_dim"] == 128 and saved["model"]["vocab_size"] == 384
  assert saved["vocabulary"] == {"type": "byte"} and saved["task"] == "ul2x_reverse"
  assert saved["mode_tokens"] == ["[S2S]"]
  assert saved["task_feature_lengths"] == {"inputs": 16, "targets": 16}
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("abcd\nhij\n")
  outputs = {}
  for name, model in (("gin", [MODEL, LENGTHS]), ("record", [])):
    out = tmp_path / name
    result = run_job("infer", *model, "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH='{trained}'", f"--gin.INFER_OUTPUT_DIR='{out}'",
                     f"--gin.INPUT_FILE='{prompts}'")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_job("eval", *model, "--gin_file=gin_configs/runs/eval.gin",
                     f"--gin.CHECKPOINT_PATH='{trained}'", f"--gin.EVAL_OUTPUT_DIR='{out}'",
                     "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'",
                     "--gin.evaluate.checkpoint_steps='latest'", "--gin.evaluate.num_examples=8")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_job("export", *model, "--gin_file=gin_configs/runs/export.gin",
                     f"--gin.CHECKPOINT_PATH='{trained}'", f"--gin.EXPORT_DIR='{out / 'hf'}'")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = {f: (out / "hf" / f).read_bytes() for f in sorted(os.listdir(out / "hf"))}
    outputs[name] = (rows(out / f"prompts-predict-{STEPS}.jsonl"),
                     {k: v for k, v in rows(out / "metrics.jsonl")[0].items() if "/" in k},
                     exported)
  assert outputs["record"] == outputs["gin"]
  predicted, _, exported = outputs["record"]
  assert [r["prediction"] for r in predicted] == ["dcba", "jih"]  # [S2S] from the record
  assert "tokenizer_config.json" in exported  # the recorded byte vocabulary
  # A binding that says how to run the model (not what it is) is taken.
  result = run_job("infer", *infer_args(trained, tmp_path / "bf16")[1:],
                   f"--gin.INPUT_FILE='{prompts}'", "--gin.TransformerConfig.dtype='bfloat16'")
  assert result.returncode == 0, result.stderr[-3000:]


def test_a_checkpoint_without_a_record_needs_the_model_gin_file(trained, tmp_path):
  old = _copy_run(trained, tmp_path / "old")  # checkpoint and config.gin, no record
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("abcd\n")
  file = f"--gin.INPUT_FILE='{prompts}'"
  result = run_job("infer", *infer_args(old, tmp_path / "out"), file)
  assert result.returncode == 0, result.stderr[-3000:]
  assert rows(tmp_path / "out" / f"prompts-predict-{STEPS}.jsonl")[0]["prediction"] == "dcba"
  one_line_error(run_job("infer", *infer_args(old, tmp_path / "none")[1:], file),
                 "records no model", "--gin_file=gin_configs/models/tiny.gin")
  one_line_error(run_job("infer", *infer_args(old, tmp_path / "none"), file,
                         "--gin.TransformerConfig.emb_dim=64"), "shape", "model config")
  one_line_error(run_job("export", MODEL, "--gin_file=gin_configs/runs/export.gin",
                         f"--gin.CHECKPOINT_PATH='{old}'", f"--gin.EXPORT_DIR='{tmp_path / 'hf'}'"),
                 "without a record of its vocabulary", "--gin.export.tokenizer")
  assert not (tmp_path / "none").exists() and not (tmp_path / "hf").exists()


def test_infer_reads_and_writes_text_in_the_recorded_vocabulary(tmp_path):
  """A checkpoint recorded with a SentencePiece vocabulary: infer encodes a prompts
  file's text and decodes predictions with it, not with bytes (a fresh model suffices:
  the CLI's scores and predictions equal infer's own functions over SentencePiece ids)."""
  import dataclasses

  import numpy as np
  from ul2x.model import TransformerConfig
  from ul2x.tasks import inference, vocabularies
  from ul2x.tasks.train_vocab import train_vocab
  from ul2x.trainer import record
  from ul2x.trainer.checkpoints import Checkpointer
  from ul2x.trainer.predict import run_examples
  from ul2x.trainer.setup import setup

  train_vocab(str(tmp_path / "spm"), 400)
  vocab = vocabularies.sentencepiece_vocabulary(str(tmp_path / "spm.model"), 8)
  cfg = dataclasses.replace(TransformerConfig(emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                                              num_encoder_layers=1, num_decoder_layers=1),
                            vocab_size=vocab.vocab_size)
  job = setup(cfg)
  params = job.init_state()["params"]
  ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), every=1, max_to_keep=1,
                      async_save=False)
  ckpt.maybe_save(1, {"step": np.int32(1), "params": params}, {"train_batches": 0}, final=True)
  ckpt.close()
  lengths = {"inputs": 16, "targets": 8}
  record.write(str(tmp_path / "run"), cfg, vocabulary=vocab, task_feature_lengths=lengths)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"inputs": "the quick brown fox", "targets": "jumps"}) + "\n")
  examples = inference.file_examples(str(prompts), vocabulary=vocab, task_feature_lengths=lengths)
  for mode in ("score", "predict"):
    out = tmp_path / mode
    result = run_job("infer", "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH='{tmp_path / 'run'}'",
                     f"--gin.INFER_OUTPUT_DIR='{out}'", f"--gin.INPUT_FILE='{prompts}'",
                     f"--gin.infer.mode='{mode}'")
    assert result.returncode == 0, result.stderr[-3000:]
    row, = rows(out / f"prompts-{mode}-1.jsonl")
    expected, = run_examples(job, params, examples, mode=mode, task_feature_lengths=lengths,
                             batch_size=32)
    assert row["score"] == pytest.approx(expected["score"], abs=1e-5)
    if mode == "predict":
      assert row["prediction"] == inference.decode(expected["prediction"], vocab)
