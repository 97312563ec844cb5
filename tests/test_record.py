"""Self-describing checkpoints through the jobs' commands: a step's directory copied alone
carries its record, a task split's cut examples are said and marked as a file's are, and
infer on an imported Hugging Face T5 reads and writes text with the tokenizer it came
with, or refuses in one line where it has none."""

import json
import os
import shutil

import pytest
from cli_utils import one_line_error, rows, run_job

from ul2x.trainer import checkpoints, integrity, record

LENGTHS = {"inputs": 8, "targets": 8}
SHORT = "--gin.TASK_FEATURE_LENGTHS={'inputs': 5, 'targets': 8}"  # cuts inputs past 3 letters


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """MODEL_DIR of a 2-step ul2x_reverse run of the tiny model, keeping only step 2."""
  model_dir = tmp_path_factory.mktemp("run")
  result = run_job("train", "--gin_file=gin_configs/models/tiny.gin",
                   "--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'",
                   f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.TRAIN_STEPS=2",
                   "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'", "--gin.BATCH_SIZE=8",
                   "--gin.train.eval_every=0", "--gin.train.checkpoint_every=1",
                   "--gin.train.keep_checkpoints=1")
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


def test_a_step_copied_alone_is_a_whole_checkpoint(trained, tmp_path):
  step = trained / "checkpoints" / "2"
  assert checkpoints.checkpoint_steps(str(trained / "checkpoints")) == [2]  # keep-N kept 1
  assert (step / "record" / record.RECORD).read_bytes() == (trained / record.RECORD).read_bytes()
  manifest = json.loads((step / integrity.MANIFEST).read_text())
  assert "record/ul2x_model.json" in manifest  # checksummed with the step
  copied = tmp_path / "elsewhere" / "2"
  shutil.copytree(step, copied)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("abcd\nhij\n")
  outputs = {}
  for name, path in (("run", trained), ("copy", copied)):
    result = run_job("infer", "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH='{path}'", f"--gin.INFER_OUTPUT_DIR='{tmp_path / name}'",
                     f"--gin.INPUT_FILE='{prompts}'")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prompts get the mode token '[S2S]' of 'ul2x_reverse'" in result.stdout
    outputs[name] = rows(tmp_path / name / "prompts-predict-2.jsonl")
  assert outputs["copy"] == outputs["run"]
  # The copy's record is read, not a MODEL_DIR's, and its bytes are checked on restore.
  assert record.read(str(copied)).path == str(copied / "record" / record.RECORD)
  with open(copied / "record" / record.RECORD, "a") as f:
    f.write(" ")
  one_line_error(run_job("infer", "--gin_file=gin_configs/runs/infer.gin",
                         f"--gin.CHECKPOINT_PATH='{copied}'",
                         f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'none'}'",
                         f"--gin.INPUT_FILE='{prompts}'"),
                 "is damaged", "record/ul2x_model.json")
  assert not (tmp_path / "none").exists()


def test_a_task_splits_cut_examples_are_said_and_marked(trained, tmp_path):
  result = run_job("infer", "--gin_file=gin_configs/runs/infer.gin", SHORT,
                   f"--gin.CHECKPOINT_PATH='{trained}'", f"--gin.INFER_OUTPUT_DIR='{tmp_path}'",
                   "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'", "--gin.infer.num_examples=16")
  assert result.returncode == 0, result.stderr[-3000:]
  predicted = rows(tmp_path / "ul2x_reverse-validation-predict-2.jsonl")
  cut = [len(r["targets"]) > 3 for r in predicted]  # [S2S], the letters, EOS: over 5
  assert 0 < sum(cut) < 16
  assert [r.get("truncated") for r in predicted] == [["inputs"] if c else None for c in cut]
  assert (f"infer: cut to TASK_FEATURE_LENGTHS: {sum(cut)} of 16 inputs (to 5 tokens); their "
          "rows say \"truncated\"") in result.stdout
  result = run_job("eval", "--gin_file=gin_configs/runs/eval.gin", SHORT,
                   f"--gin.CHECKPOINT_PATH='{trained}'", f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'",
                   "--gin.evaluate.num_examples=16")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"eval: 'ul2x_reverse' cut to TASK_FEATURE_LENGTHS: {sum(cut)} of 16 inputs (to 5 "
          "tokens)") in result.stdout


def _sentencepiece_t5(path):
  """A tiny T5 in transformers' layout, as t5-small comes: a SentencePiece tokenizer
  (spiece.model) with sentinels <extra_id_7..0> after its pieces (pad 0, EOS 1, no BOS),
  weights drawn at a scale where the prompt matters. -> (model, tokenizer)."""
  import numpy as np
  import sentencepiece as spm
  import torch
  import transformers

  from ul2x.tasks import corpus
  text = path / "text.txt"
  text.write_text("\n".join(corpus.corpus_lines("train")[:2000]))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path / "sp"),
                                 vocab_size=200, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 minloglevel=2)
  (path / "hf").mkdir()
  shutil.copy(path / "sp.model", path / "hf" / "spiece.model")
  (path / "hf" / "tokenizer_config.json").write_text(
      json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 8}))
  tokenizer = transformers.AutoTokenizer.from_pretrained(path / "hf")
  config = transformers.T5Config(
      vocab_size=len(tokenizer) + 2, d_model=32, d_kv=8, d_ff=64, num_layers=2,
      num_decoder_layers=2, num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
      tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(config)
  gen = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1:
        p.copy_(1 + 0.3 * noise)
      elif "shared" in name or "relative_attention_bias" in name:
        p.copy_(noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[1]))
  model.save_pretrained(path / "hf")
  tokenizer.save_pretrained(path / "hf")
  return model.eval(), tokenizer


def test_infer_on_an_imported_t5_uses_its_own_tokenizer(tmp_path):
  """Predictions and scores equal transformers' on the same text: the prompts and
  targets were encoded, and the predictions decoded, with the imported tokenizer."""
  torch = pytest.importorskip("torch")
  model, tokenizer = _sentencepiece_t5(tmp_path)
  result = run_job("import_hf", f"--hf_dir={tmp_path / 'hf'}", f"--model_dir={tmp_path / 'model'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "model" / "checkpoints" / "0" / "record" / "hf_tokenizer").is_dir()
  pairs = [("the cat sat on the mat", "a mat"), ("spans <extra_id_0> of text", "<extra_id_0> it"),
           ("hello world", "world")]
  (tmp_path / "prompts.jsonl").write_text("".join(
      json.dumps({"inputs": i, "targets": t}) + "\n" for i, t in pairs))
  sentinel = tokenizer.convert_tokens_to_ids("<extra_id_0>")
  assert sentinel in tokenizer(pairs[1][0]).input_ids  # a sentinel in text is one id
  args = ["--gin_file=gin_configs/runs/infer.gin", f"--gin.CHECKPOINT_PATH='{tmp_path / 'model'}'",
          f"--gin.INPUT_FILE='{tmp_path / 'prompts.jsonl'}'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 6}"]
  out = {}
  for mode in ("predict", "score"):
    result = run_job("infer", *args, f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'out'}'",
                     f"--gin.infer.mode='{mode}'")
    assert result.returncode == 0, result.stderr[-3000:]
    out[mode] = rows(tmp_path / "out" / f"prompts-{mode}-0.jsonl")
  assert any(row["prediction"] for row in out["predict"])
  for (inputs, targets), predicted, scored in zip(pairs, out["predict"], out["score"]):
    encoded = tokenizer(inputs, return_tensors="pt")
    labels = tokenizer(targets, return_tensors="pt").input_ids
    assert len(encoded.input_ids[0]) < 16 and len(labels[0]) <= 6  # nothing cut
    ids = model.generate(**encoded, max_new_tokens=6, do_sample=False, num_beams=1)[0, 1:].tolist()
    ids = [i for i in (ids[:ids.index(1)] if 1 in ids else ids) if i != 0]  # pad dropped
    assert predicted["prediction"] == tokenizer.decode(ids, skip_special_tokens=False)
    with torch.no_grad():
      logits = model(**encoded, labels=labels).logits
    expected = torch.log_softmax(logits, -1)[0].gather(1, labels[0][:, None]).sum().item()
    assert scored["score"] == pytest.approx(expected, abs=1e-4)
  one_line_error(run_job("infer", *args, f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'none'}'",
                         "--gin.infer.mode_token='[S2S]'"),
                 "has no token '[S2S]'", "--gin.infer.mode_token=None")
  # Imported without tokenizer files: refused, not read as bytes.
  for name in os.listdir(tmp_path / "hf"):
    if name not in ("config.json", "model.safetensors", "generation_config.json"):
      os.remove(tmp_path / "hf" / name)
  result = run_job("import_hf", f"--hf_dir={tmp_path / 'hf'}", f"--model_dir={tmp_path / 'bare'}")
  assert result.returncode == 0, result.stderr[-3000:]
  one_line_error(run_job("infer", *args[:1], f"--gin.CHECKPOINT_PATH='{tmp_path / 'bare'}'",
                         *args[2:], f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'none'}'"),
                 "records no vocabulary", f"vocab_size={len(tokenizer) + 2}", "tokenizer files")
  assert not (tmp_path / "none").exists()
