"""The serving artifact (export/serving.py): its jax.export functions, reloaded in a
process without ul2x's model code, decode as make_predict_fn does at batch sizes 1 and 3;
its TF SavedModel turns text into the text of ul2x's greedy decode + inference.decode."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from ul2x import partitioning
from ul2x.export import serving, serving_tf
from ul2x.model import TransformerConfig
from ul2x.tasks import inference
from ul2x.tasks.vocabularies import PARADIGM_TOKENS
from ul2x.trainer.predict import make_predict_fn
from ul2x.trainer.setup import setup

ED = TransformerConfig(emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64)  # 384 ids: bytes
DO = dataclasses.replace(ED, architecture="decoder_only", position="rope", activation="silu")
INPUTS_LEN, MAX_LEN, SEED = 16, 10, 7
TEXTS = ["hello", "Grüße, 世界", "an input longer than sixteen bytes is cut"]
MODE = {"encoder_decoder": "[S2S]", "decoder_only": "[NLG]"}
PLATFORMS = {"encoder_decoder": ("cpu",), "decoder_only": ("cpu", "cuda")}

# Run in a fresh interpreter: loads each artifact with the loader alone and decodes.
LOADER_SCRIPT = """
import json, sys
import numpy as np
from ul2x.export.serving import load_serving
out = {}
for name, request in json.load(sys.stdin).items():
  ids = np.asarray(request["input_ids"], np.int32)
  greedy, sample = (load_serving(request["directory"], m) for m in ("greedy", "sample"))
  runs = {"greedy_1": greedy(ids[:1]), "greedy_3": greedy(ids), "sample_3": sample(ids, %d)}
  out[name] = {k: [np.asarray(x).tolist() for x in v] for k, v in runs.items()}
out["modules"] = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("ul2x", "flax", "tensorflow", "seqio"))
print(json.dumps(out))
""" % SEED


def _examples(tmp_path, architecture):
  path = tmp_path / "inputs.jsonl"
  path.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in TEXTS))
  return inference.file_examples(str(path), mode_token=MODE[architecture],
                                 task_feature_lengths={"inputs": INPUTS_LEN})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
  """{architecture: dict(job, params, directory, files, batch, input_ids)}."""
  mesh = partitioning.create_mesh(devices=jax.devices()[:1])
  out = {}
  for architecture, cfg in (("encoder_decoder", ED), ("decoder_only", DO)):
    job = setup(cfg, mesh=mesh)
    params = job.init_state()["params"]
    directory = tmp_path_factory.mktemp(architecture)
    # decoder_only is also lowered for CUDA, which needs no GPU, and must still run on CPU.
    export = functools.partial(serving.export_serving, job, params, str(directory),
                               inputs_len=INPUTS_LEN, max_decode_len=MAX_LEN,
                               mode_token=MODE[architecture], platforms=PLATFORMS[architecture])
    refused = None
    try:
      files = export(saved_model=architecture == "encoder_decoder")
    except ValueError as e:  # this TF reads older StableHLO than this jax writes
      if "unregistered operation" not in str(e):
        raise
      refused = f"TensorFlow cannot read this jax's StableHLO: {e}"
      files = export(saved_model=False)
    examples = _examples(tmp_path_factory.mktemp("inputs"), architecture)
    batch, _ = next(inference.predict_batches(examples, architecture=architecture,
                                              task_feature_lengths={"inputs": INPUTS_LEN},
                                              batch_size=len(examples)))
    input_ids = np.stack([np.pad(ex["inputs"], (0, INPUTS_LEN - len(ex["inputs"])))
                          for ex in examples])
    out[architecture] = dict(job=job, params=params, directory=str(directory), files=files,
                             batch=batch, input_ids=input_ids, saved_model_refused=refused)
  return out


def test_artifact_layout(artifacts):
  ed = artifacts["encoder_decoder"]
  names = {os.path.relpath(f, ed["directory"]) for f in ed["files"]}
  assert {"serving.json", "params.npz", "greedy.jax_exported", "sample.jax_exported"} <= names
  manifest = json.load(open(os.path.join(ed["directory"], "serving.json")))
  assert manifest["inputs_len"] == INPUTS_LEN and manifest["mode_token"] == "[S2S]"
  do = artifacts["decoder_only"]
  assert "saved_model" not in os.listdir(do["directory"])
  with open(os.path.join(do["directory"], "greedy.jax_exported"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert exported.platforms == ("cpu", "cuda")
  # The parameters are arguments, not constants baked into the module.
  assert os.path.getsize(f.name) < os.path.getsize(os.path.join(do["directory"],
                                                                 "params.npz")) / 2


def test_reloaded_without_model_code_decodes_as_ul2x(artifacts):
  request = {name: {"directory": a["directory"], "input_ids": a["input_ids"].tolist()}
             for name, a in artifacts.items()}
  result = subprocess.run([sys.executable, "-c", LOADER_SCRIPT], input=json.dumps(request),
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  served = json.loads(result.stdout)
  assert served.pop("modules") == ["ul2x", "ul2x.export", "ul2x.export.serving"]
  for name, a in artifacts.items():
    predict = make_predict_fn(a["job"], max_decode_len=MAX_LEN)
    sample = make_predict_fn(a["job"], max_decode_len=MAX_LEN, method="sample")
    want = {"greedy": jax.device_get(predict(a["params"], a["batch"], None)),
            "sample": jax.device_get(sample(a["params"], a["batch"], jax.random.key(SEED)))}
    for run, (tokens, scores) in served[name].items():
      method, rows = run.split("_")
      ref_tokens, ref_scores = (x[:int(rows)] for x in want[method])
      np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"{name} {run}")
      np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=1e-5)
    assert len({tuple(row) for row in want["greedy"][0]}) > 1  # rows decode differently


def test_saved_model_text_in_text_out(artifacts):
  ed = artifacts["encoder_decoder"]
  if ed["saved_model_refused"]:
    pytest.skip(ed["saved_model_refused"])
  assert os.path.join(ed["directory"], "saved_model", "saved_model.pb") in ed["files"]
  tokens, scores = jax.device_get(make_predict_fn(ed["job"], max_decode_len=MAX_LEN)(
      ed["params"], ed["batch"], None))
  loaded = tf.saved_model.load(os.path.join(ed["directory"], "saved_model"))
  served = loaded.signatures["serving_default"](inputs=tf.constant(TEXTS))
  np.testing.assert_array_equal(served["output_ids"].numpy(), tokens)
  assert [t.decode("utf-8") for t in served["outputs"].numpy()] == [
      inference.decode(row) for row in tokens]
  np.testing.assert_allclose(served["scores"].numpy(), scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode_token", [None, "[NLU]"])
@pytest.mark.parametrize("inputs_len", [1, 2, 8])
def test_text_encoding_equals_file_examples(tmp_path, mode_token, inputs_len):
  texts = ["", "a", "héllo wörld", "日本語のテキスト"]
  path = tmp_path / "inputs.jsonl"
  path.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in texts))
  examples = inference.file_examples(str(path), mode_token=mode_token,
                                     task_feature_lengths={"inputs": inputs_len})
  want = np.stack([np.pad(ex["inputs"], (0, inputs_len - len(ex["inputs"])))
                   for ex in examples])
  got = serving_tf.encode_texts(tf.constant(texts), inputs_len=inputs_len,
                                mode_token=mode_token)
  np.testing.assert_array_equal(got.numpy(), want)


def test_text_decoding_equals_inference_decode():
  """Random ids: bytes that are often invalid UTF-8, mode tokens, sentinels, unk, EOS."""
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 384, (200, 24)).astype(np.int32)
  leads = rng.rand(*ids.shape) < 0.3
  ids[leads] = rng.randint(0xC0 + 3, 0xF8 + 3, leads.sum())  # bytes that open UTF-8 runs
  ids[rng.rand(*ids.shape) < 0.03] = 1
  got = serving_tf.decode_ids(tf.constant(ids), tf.constant(serving_tf.id_pieces()))
  assert [t.decode("utf-8") for t in got.numpy()] == [inference.decode(row) for row in ids]


def test_bad_arguments_are_refused(tmp_path, artifacts):
  ed = artifacts["encoder_decoder"]
  full, empty = tmp_path / "full", tmp_path / "empty"
  full.mkdir()
  (full / "x").write_text("")
  empty.mkdir()
  with pytest.raises(ValueError, match="must exist and be empty"):
    serving.export_serving(ed["job"], ed["params"], str(full), inputs_len=4,
                           max_decode_len=4)
  assert serving.MODE_TOKENS == PARADIGM_TOKENS
  with pytest.raises(ValueError, match=r"mode_token '\[X\]' is not one of"):
    serving.export_serving(ed["job"], ed["params"], str(empty), inputs_len=4,
                           max_decode_len=4, mode_token="[X]")
  job = setup(dataclasses.replace(ED, vocab_size=64), mesh=ed["job"].mesh)
  with pytest.raises(ValueError, match="vocab_size=64; pass saved_model=False"):
    serving.export_serving(job, None, str(empty), inputs_len=4, max_decode_len=4)
  with pytest.raises(ValueError, match=r"the artifact takes \[batch, 16\]"):
    serving.load_serving(ed["directory"])(np.zeros((2, 5), np.int32))
  with pytest.raises(ValueError, match="method 'beam'"):
    serving.load_serving(ed["directory"], "beam")
  assert not os.listdir(empty)


def test_moe_needs_a_batch_size_and_its_saved_model_is_refused(tmp_path, artifacts):
  """MoE routing groups rows by batch size, and lax.top_k lowers to a StableHLO op that
  TF 2.21's XlaCallModule cannot read (docs/serving.md): the export says so and writes
  nothing."""
  moe = dataclasses.replace(ED, num_experts=2, moe_layer_interval=2, group_size=4,
                            capacity_factor=2.0)
  job = setup(moe, mesh=artifacts["encoder_decoder"]["job"].mesh)
  params = job.init_state()["params"]
  kwargs = dict(inputs_len=4, max_decode_len=2)
  with pytest.raises(ValueError, match="pass batch_size=N"):
    serving.export_serving(job, params, str(tmp_path), **kwargs)
  with pytest.raises(ValueError, match="vhlo.composite_v2.*Pass saved_model=False"):
    serving.export_serving(job, params, str(tmp_path), batch_size=2, **kwargs)
  assert not os.listdir(tmp_path)
