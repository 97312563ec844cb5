"""ul2x as an lm-eval model, run through lm-eval itself on local YAML + JSONL tasks (no
hub): its log-likelihoods are infer's scores, its generations infer's greedy decoding
with the stop sequences applied, and the transformers export run through lm-eval's `hf`
model gives the same log-likelihoods and accuracies; the CLI writes lm-eval's results."""

import json
import os
import pathlib

import numpy as np
import pytest

from cli_utils import one_line_error, run_job
from ul2x.model import TransformerConfig
from ul2x.tasks.vocabularies import byte_vocabulary
from ul2x.trainer.checkpoints import Checkpointer
from ul2x.trainer.lm_eval_model import UL2XLM, evaluate
from ul2x.trainer.predict import run_examples
from ul2x.trainer.setup import setup

try:
  import torch
except ImportError:
  torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="needs torch, which `.[test]` installs on Python 3.11 only: the "
    "3.11 leg runs it")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {"causal": "decoder_only_tiny.gin", "prefix": "decoder_only_tiny.gin",
          "encdec": "tiny.gin"}
TASKS = ["lm_test_choice", "lm_test_generate", "lm_test_rolling"]
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]
BATCH = 8
STOP = ["e", " "]
GEN_TOKS = 12


def write_tasks(directory: pathlib.Path, n: int = 12) -> pathlib.Path:
  """A multiple-choice, a generation and a rolling-perplexity task over local JSONL files;
  -> the directory to pass as lm-eval's include_path."""
  rng = np.random.default_rng(0)
  pick = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
  docs = {
      "choice": [{"question": f"Q: {pick(3)}?\nA:", "choices": list(rng.choice(WORDS, 4, False)),
                  "answer": i % 4} for i in range(n)],
      "generate": [{"prompt": pick(2 + i % 3), "target": pick(1)} for i in range(n // 2)],
      "rolling": [{"text": pick(4 + i)} for i in range(n // 2)]}
  common = "dataset_path: json\ntest_split: test\n"
  specific = {
      "choice": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                "metric_list: [{metric: acc}, {metric: acc_norm}]\n",
      "generate": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                  "doc_to_target: '{{target}}'\n"
                  f"generation_kwargs: {{until: {json.dumps(STOP)}, max_gen_toks: {GEN_TOKS}, "
                  "do_sample: false}\nmetric_list: [{metric: exact_match}]\n",
      "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                 "doc_to_target: '{{text}}'\nmetric_list: [{metric: word_perplexity}]\n"}
  for name, rows in docs.items():
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: lm_test_{name}\n{common}dataset_kwargs: {{data_files: {{test: '{data}'}}}}\n"
        + specific[name])
  return directory


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    yield


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
  return write_tasks(tmp_path_factory.mktemp("tasks"))


def model_config(kind: str) -> TransformerConfig:
  import gin
  gin.clear_config()
  gin.parse_config_file(str(ROOT / "gin_configs" / "models" / MODELS[kind]))
  cfg = TransformerConfig()
  gin.clear_config()
  return cfg


def save_checkpoint(model_dir, job, seed: int = 0):
  """A freshly initialised model saved as step 1 of `model_dir` (no training needed to
  compare two ways of computing the same numbers)."""
  state = setup(job.cfg, mesh=job.mesh, seed=seed).init_state()
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"), every=1, max_to_keep=1,
                      async_save=False)
  ckpt.maybe_save(1, {"step": np.int32(1), "params": state["params"]}, {"train_batches": 0},
                  final=True)
  ckpt.close()
  return str(model_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tasks_dir):
  """kind -> (MODEL_DIR, job, params, lm-eval's results with samples)."""
  out = {}
  for kind in MODELS:
    job = setup(model_config(kind))
    model_dir = save_checkpoint(tmp_path_factory.mktemp(kind), job, seed=len(out))
    params = job.restore_state(model_dir)["params"]
    lm = UL2XLM(job, params, batch_size=BATCH, prefix_lm=kind == "prefix")
    out[kind] = (model_dir, job, params, evaluate(lm, TASKS, include_path=str(tasks_dir),
                                                  log_samples=True))
  return out


def infer_scores(job, params, examples, lengths):
  return [r["score"] for r in run_examples(job, params, examples, mode="score",
                                           task_feature_lengths=lengths, batch_size=BATCH)]


def ids(text: str) -> np.ndarray:
  return np.asarray(byte_vocabulary().encode(text), np.int32)


def expected_loglikelihoods(kind, job, params, pairs):
  """log p(continuation | context) by infer's score path: a causal LM's as
  score(context + continuation) - score(context), both read causally from the start
  token; an encoder-decoder's and a prefix LM's with the context as inputs + EOS."""
  if kind == "causal":
    lengths = {"targets": 64}
    whole = infer_scores(job, params, [{"targets": ids(c + x)} for c, x in pairs], lengths)
    context = infer_scores(job, params, [{"targets": ids(c)} for c, _ in pairs], lengths)
    return np.subtract(whole, context)
  examples = [{"inputs": np.append(ids(c), 1), "targets": ids(x)} for c, x in pairs]
  return np.asarray(infer_scores(job, params, examples, {"inputs": 64, "targets": 64}))


@pytest.mark.parametrize("kind", MODELS)
def test_loglikelihoods_are_infer_scores(models, kind):
  _, job, params, results = models[kind]
  requests = [(req, resp) for s in results["samples"]["lm_test_choice"]
              for req, resp in zip(s["arguments"], s["resps"])]
  pairs = [(args[0], args[1]) for args, _ in requests]
  got = np.asarray([resp[0][0] for _, resp in requests])
  np.testing.assert_allclose(got, expected_loglikelihoods(kind, job, params, pairs),
                             atol=1e-5, rtol=1e-6)
  assert len(pairs) == 48 and np.all(got < -5)
  # is_greedy: the continuation is the argmax path (untrained: none of these is)
  assert not any(resp[0][1] for _, resp in requests)


@pytest.mark.parametrize("kind", MODELS)
def test_rolling_loglikelihoods_are_infer_scores(models, kind):
  _, job, params, results = models[kind]
  samples = results["samples"]["lm_test_rolling"]
  pairs = [("", s["arguments"][0][0]) for s in samples]
  got = [s["resps"][0][0] for s in samples]
  want = expected_loglikelihoods(kind, job, params, pairs)  # an empty context: EOS alone
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("kind", ["causal", "encdec"])
def test_generations_are_infer_greedy_with_stop_sequences(models, kind, tmp_path):
  model_dir, _, _, results = models[kind]
  samples = results["samples"]["lm_test_generate"]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"inputs": s["arguments"][0][0]}) + "\n"
                             for s in samples))
  result = run_job("infer", f"--gin_file=gin_configs/models/{MODELS[kind]}",
                   "--gin_file=gin_configs/runs/infer.gin", f"--gin.CHECKPOINT_PATH='{model_dir}'",
                   f"--gin.INFER_OUTPUT_DIR='{tmp_path}'", f"--gin.INPUT_FILE='{prompts}'",
                   "--gin.infer.mode_token=None", f"--gin.infer.causal_prompt={kind == 'causal'}",
                   f"--gin.TASK_FEATURE_LENGTHS={{'inputs': 64, 'targets': {GEN_TOKS}}}")
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "prompts-predict-1.jsonl").open()]
  want = []
  for row in rows:
    text = row["prediction"]
    for stop in STOP:
      text = text.split(stop)[0]
    want.append(text)
  got = [s["resps"][0][0] for s in samples]
  assert got == want
  assert any(len(row["prediction"]) > len(text) for row, text in zip(rows, got))  # cut


def leading_zero_tokenizer(export_dir: str):
  """The exported byte tokenizer, encoding as ul2x's decoder-only models read text: the
  start id 0 first (seqio's shift right), no EOS after."""
  import transformers

  class LeadingZero(transformers.ByT5Tokenizer):
    def build_inputs_with_special_tokens(self, ids, pair=None):
      return [0] + ids + (pair or [])

  return LeadingZero.from_pretrained(export_dir)


def export_hf(model_dir, kind, tmp_path):
  from ul2x.export.job import export
  return export(checkpoint_path=model_dir, export_dir=str(tmp_path / f"{kind}-hf"),
                model_config=model_config(kind), tokenizer="byte")


def untied_t5(export_dir: str):
  """The T5 export with its own head: transformers 5 loads an untied T5 untied (the two
  weights differ), but HFLM then calls `tie_weights()`, which would tie the head to the
  embedding again (docs/lm_eval.md)."""
  import transformers
  model = transformers.T5ForConditionalGeneration.from_pretrained(export_dir).eval()
  model.tie_weights = lambda *args, **kwargs: None
  return model


def hf_lm(export_dir: str, kind: str):
  """lm-eval's `hf` model of an export, on CPU in float32."""
  import transformers
  from lm_eval.models.huggingface import HFLM
  if kind == "encdec":
    return HFLM(pretrained=untied_t5(export_dir), backend="seq2seq", device="cpu",
                batch_size=BATCH, tokenizer=transformers.AutoTokenizer.from_pretrained(export_dir))
  return HFLM(pretrained=export_dir, backend="causal", device="cpu", dtype="float32",
              batch_size=BATCH, tokenizer=leading_zero_tokenizer(export_dir),
              add_bos_token=True, prefix_token_id=0)


@needs_torch
@pytest.mark.parametrize("kind", ["causal", "encdec"])
def test_hf_export_through_lm_eval_gives_the_same_loglikelihoods(models, kind, tasks_dir,
                                                                  tmp_path):
  model_dir, _, _, ours = models[kind]
  theirs = evaluate(hf_lm(export_hf(model_dir, kind, tmp_path), kind), ["lm_test_choice"],
                    include_path=str(tasks_dir), log_samples=True)
  mine, hf = (r["samples"]["lm_test_choice"] for r in (ours, theirs))
  assert [s["arguments"] for s in mine] == [s["arguments"] for s in hf]
  np.testing.assert_allclose([r[0][0] for s in hf for r in s["resps"]],
                             [r[0][0] for s in mine for r in s["resps"]], atol=1e-4)
  for metric in ("acc,none", "acc_norm,none"):
    assert theirs["results"]["lm_test_choice"][metric] == ours["results"]["lm_test_choice"][metric]


def test_cli_writes_lm_evals_results_and_refuses_unknown_tasks(models, tasks_dir, tmp_path):
  model_dir = models["causal"][0]
  args = ["--gin_file=gin_configs/models/decoder_only_tiny.gin",
          "--gin_file=gin_configs/runs/lm_eval.gin", f"--gin.CHECKPOINT_PATH='{model_dir}'",
          f"--gin.LM_EVAL_OUTPUT_DIR='{tmp_path / 'out'}'",
          f"--gin.LM_EVAL_INCLUDE_PATH='{tasks_dir}'", f"--gin.lm_eval.batch_size={BATCH}"]
  result = run_job("lm_eval", *args, "--gin.LM_EVAL_TASKS=['lm_test_choice']")
  assert result.returncode == 0, result.stderr[-2000:]
  written, = (tmp_path / "out").glob("*/results_*.json")
  saved = json.loads(written.read_text())
  ours = models["causal"][3]["results"]["lm_test_choice"]
  assert saved["results"]["lm_test_choice"]["acc,none"] == ours["acc,none"]
  assert "lm_test_choice: acc" in result.stdout
  one_line_error(run_job("lm_eval", *args, "--gin.LM_EVAL_TASKS=['no_such_task']"),
                 "no_such_task", "LM_EVAL_INCLUDE_PATH")
  one_line_error(run_job("lm_eval", *args[:3], f"--gin.LM_EVAL_OUTPUT_DIR='{tmp_path}'",
                         "--gin.LM_EVAL_TASKS=['lm_test_choice']",
                         f"--gin.LM_EVAL_INCLUDE_PATH='{tmp_path / 'missing'}'"),
                 "missing", "not a directory")
