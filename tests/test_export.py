"""Export to and import from Hugging Face transformers, proven by loading the result in
transformers and comparing logits; plain safetensors; sharding; bad inputs; the CLI."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
try:
  import torch
except ImportError:  # the tests that run a transformers model skip; the rest run
  torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="needs torch, which `.[test]` installs on Python 3.11 only: PyPI "
    "has no CPU build of torch for Linux (a CUDA build is several GB); the 3.11 leg runs it")

from cli_utils import cpu_env, one_line_error, run_job  # noqa: E402
from ul2x import partitioning  # noqa: E402
from ul2x.export import files  # noqa: E402
from ul2x.export.importer import import_hf, model_gin  # noqa: E402
from ul2x.export.job import export as export_job  # noqa: E402
from ul2x.model import TransformerConfig  # noqa: E402
from ul2x.tasks import vocabularies  # noqa: E402
from ul2x.trainer import record  # noqa: E402
from ul2x.trainer.checkpoints import Checkpointer, restore_mapped_params  # noqa: E402
from ul2x.trainer.predict import make_predict_fn  # noqa: E402
from ul2x.trainer.setup import setup  # noqa: E402

# Shapes chosen so that a wrong reshape cannot pass: heads x head_dim != emb, odd vocab,
# unequal stack depths, non-default buckets / distance / RoPE wavelength.
# The models below have odd vocabularies, so no tokenizer files (the byte vocabulary's 384
# ids would not fit); tokenizer export is tested with a 384-id model at the end.
export = functools.partial(export_job, tokenizer=None)
T5 = TransformerConfig(vocab_size=101, emb_dim=48, num_heads=3, head_dim=8, mlp_dim=64,
                       num_encoder_layers=3, num_decoder_layers=2, relative_buckets=16,
                       relative_max_distance=24)
# head_dim 16: sqrt(head_dim) is a power of 2, so q_proj's scale round-trips bit for bit.
LLAMA = TransformerConfig(architecture="decoder_only", position="rope", activation="silu",
                          vocab_size=101, emb_dim=48, num_heads=4, head_dim=16, mlp_dim=64,
                          num_decoder_layers=3, rope_max_wavelength=500.0)
MESH = partitioning.create_mesh(devices=jax.devices()[:1])
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _random_params(cfg, seed=0):
  """Initialised params with the norm scales (ones at init) randomised too, so a swapped
  norm would change the logits."""
  flat = traverse_util.flatten_dict(setup(cfg, mesh=MESH, seed=seed).init_state()["params"])
  key = jax.random.key(seed)
  for i, (path, leaf) in enumerate(flat.items()):
    if path[-1] == "scale":
      flat[path] = leaf + 0.3 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)
  return traverse_util.unflatten_dict(flat)


def _scanned(params):
  """The same weights in the scan_layers layout: each stack's layers on a leading axis."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    if stack in params:
      layers = params[stack]["layers"]
      out[stack] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs),
                                           *[layers[i] for i in range(len(layers))])}
  return out


def _save(model_dir, params, step=7):
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"), every=1, max_to_keep=1,
                      async_save=False)
  ckpt.maybe_save(step, {"step": np.int32(step), "params": params}, {"train_batches": 0},
                  final=True)
  ckpt.close()
  return str(model_dir)


def _batch(cfg, seed=0):
  """Random inputs with padding at the ends of rows: (ul2x batch, HF kwargs, mask of
  the logit positions to compare)."""
  rng = np.random.default_rng(seed)
  lengths = np.array([9, 6, 8])
  mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int64)
  tokens = rng.integers(2, cfg.vocab_size, (3, 9)) * mask
  if cfg.architecture == "encoder_decoder":
    targets = rng.integers(2, cfg.vocab_size, (3, 7))
    inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    ours = dict(encoder_input_tokens=tokens, decoder_input_tokens=inputs,
                decoder_target_tokens=targets, decoder_segment_ids=np.ones_like(targets))
    theirs = dict(input_ids=tokens, attention_mask=mask, decoder_input_ids=inputs)
    return ours, theirs, np.ones_like(targets, bool)
  inputs = np.pad(tokens[:, :-1], ((0, 0), (1, 0))) * mask  # id 0 leads, as seqio shifts
  ours = dict(decoder_input_tokens=inputs, decoder_target_tokens=tokens,
              decoder_segment_ids=mask)
  return ours, dict(input_ids=inputs, attention_mask=mask), mask.astype(bool)


def _ul2x_logits(cfg, params, batch):
  model = nnx.merge(setup(cfg, mesh=MESH).graphdef, params)
  return np.asarray(model({k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}))


def _hf_model(path):
  cls = (transformers.T5ForConditionalGeneration
         if files.read_json(os.path.join(path, "config.json"))["model_type"] == "t5"
         else transformers.LlamaForCausalLM)
  return cls.from_pretrained(path).eval()


def _hf_logits(model, kwargs):
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in kwargs.items()}).logits.float().numpy()


def _assert_same_logits(cfg, params, hf_model):
  ours, theirs, compare = _batch(cfg)
  expected = _ul2x_logits(cfg, params, ours)
  assert np.abs(expected[compare]).mean() > 0.1  # logits big enough for a mapping to matter
  np.testing.assert_allclose(_hf_logits(hf_model, theirs)[compare], expected[compare],
                             atol=1e-4, rtol=1e-4)


def _tensors(path):
  return {k: v for f in sorted(os.listdir(path)) if f.endswith(".safetensors")
          for k, v in safetensors_numpy.load_file(os.path.join(path, f)).items()}


def _export_hf(tmp_path, cfg, params, name):
  """Checkpoints `params` unscanned and scanned, exports both; the files must be the
  same. -> the export directory."""
  dirs = []
  for layout, scan in (("unscanned", False), ("scanned", True)):
    ckpt = _save(tmp_path / f"{name}-{layout}", _scanned(params) if scan else params)
    dirs.append(export(checkpoint_path=ckpt, export_dir=str(tmp_path / f"{name}-{layout}-hf"),
                       model_config=dataclasses.replace(cfg, scan_layers=scan), mesh=MESH))
  for file in sorted(os.listdir(dirs[0])):
    with open(os.path.join(dirs[0], file), "rb") as a, open(os.path.join(dirs[1], file), "rb") as b:
      assert a.read() == b.read(), file
  assert sorted(os.listdir(dirs[0])) == sorted(os.listdir(dirs[1]))
  return dirs[0]


def _assert_imports_back(path, tmp_path, cfg, params):
  """import_hf of an export gives the model's config and its parameters bit for bit."""
  assert import_hf(path, str(tmp_path / "imported")) == cfg
  restored = setup(cfg, mesh=MESH).restore_state(str(tmp_path / "imported"))
  assert int(restored["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, restored["params"], params)


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory):
  params = _random_params(T5)
  return _save(tmp_path_factory.mktemp("t5") / "model", params), params


@needs_torch
def test_t5_export_gives_ul2x_logits_in_transformers(tmp_path, t5_checkpoint):
  _, params = t5_checkpoint
  path = _export_hf(tmp_path, T5, params, "t5")
  model = _hf_model(path)
  _assert_same_logits(T5, params, model)
  _assert_same_logits(dataclasses.replace(T5, scan_layers=True), _scanned(params), model)
  # Untied must stay untied: transformers 5 ties T5's head unless the weights differ.
  assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(),
                                np.asarray(params["output"]["logits"]["kernel"]).T)
  assert files.read_json(os.path.join(path, "generation_config.json")) == {
      "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
  _assert_imports_back(path, tmp_path, T5, params)


@needs_torch
def test_tied_t5_export_keeps_the_rescaled_tied_head(tmp_path):
  cfg = dataclasses.replace(T5, tie_embeddings=True, activation="silu")
  params = _random_params(cfg, seed=1)
  path = export(checkpoint_path=_save(tmp_path / "model", params),
                export_dir=str(tmp_path / "hf"), model_config=cfg, mesh=MESH)
  assert "lm_head.weight" not in _tensors(path)
  model = _hf_model(path)
  assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
  _assert_same_logits(cfg, params, model)
  _assert_imports_back(path, tmp_path, cfg, params)


@needs_torch
def test_llama_export_gives_ul2x_logits_in_transformers(tmp_path):
  params = _random_params(LLAMA, seed=2)
  path = _export_hf(tmp_path, LLAMA, params, "llama")
  model = _hf_model(path)
  _assert_same_logits(LLAMA, params, model)
  assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
  _assert_imports_back(path, tmp_path, LLAMA, params)


@needs_torch
def test_tied_llama_exports_an_untied_prescaled_head(tmp_path, capsys):
  cfg = dataclasses.replace(LLAMA, tie_embeddings=True)
  params = _random_params(cfg, seed=3)
  path = export(checkpoint_path=_save(tmp_path / "model", params),
                export_dir=str(tmp_path / "hf"), model_config=cfg, mesh=MESH)
  assert "warning: Llama attends causally" in capsys.readouterr().out
  tensors = _tensors(path)
  np.testing.assert_allclose(tensors["lm_head.weight"],
                             np.asarray(params["embed"]["embedding"]) / np.sqrt(48), rtol=1e-6)
  _assert_same_logits(cfg, params, _hf_model(path))


def _hf_random(model, seed):
  """Re-draws every weight at a scale where attention and norms matter."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight") or "layer_norm" in name:
        p.copy_(1 + 0.3 * noise)
      elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
        p.copy_(noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[1]))
  return model


@needs_torch
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_import_gives_hf_logits_and_export_reproduces_the_tensors(tmp_path, family):
  if family == "t5":  # transformers 5 ties T5's head (to shared, unscaled): ul2x unties it
    hf_cfg = transformers.T5Config(
        vocab_size=101, d_model=48, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
        num_heads=3, relative_attention_num_buckets=16, relative_attention_max_distance=24,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)
    model = transformers.T5ForConditionalGeneration(hf_cfg)
  else:
    hf_cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, head_dim=16, hidden_act="gelu_new",
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = transformers.LlamaForCausalLM(hf_cfg)
  _hf_random(model, seed=4).save_pretrained(tmp_path / "hf")
  cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
  gin_text = (tmp_path / "model" / "model.gin").read_text()
  assert gin_text == model_gin(cfg, str(tmp_path / "hf"))
  job = setup(cfg, mesh=MESH)
  params = job.restore_state(str(tmp_path / "model"))["params"]
  _assert_same_logits(cfg, params, model.eval())
  # Fine-tuning's restore (train.init_checkpoint) reads the same parameters.
  finetune, kept = restore_mapped_params(str(tmp_path / "model" / "checkpoints"), 0,
                                         job.init_state()["params"], job.shardings["params"])
  assert not kept
  jax.tree.map(np.testing.assert_array_equal, finetune, params)
  back = export(checkpoint_path=str(tmp_path / "model"), export_dir=str(tmp_path / "back"),
                model_config=cfg, mesh=MESH)
  original, exported = _tensors(tmp_path / "hf"), _tensors(back)
  assert set(original) <= set(exported)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name


@needs_torch
def test_sharded_and_bfloat16_exports_load(tmp_path, t5_checkpoint):
  ckpt, params = t5_checkpoint
  path = export(checkpoint_path=ckpt, export_dir=str(tmp_path / "sharded"), model_config=T5,
                max_shard_size="20KB", mesh=MESH)
  index = files.read_json(os.path.join(path, files.INDEX))
  shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
  tensors = _tensors(path)
  assert set(index["weight_map"]) == set(tensors)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
  _assert_same_logits(T5, params, _hf_model(path))
  path = export(checkpoint_path=ckpt, export_dir=str(tmp_path / "bf16"), model_config=T5,
                dtype="bfloat16", mesh=MESH)
  model = _hf_model(path)
  assert model.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      model.shared.weight.float().detach().numpy(),
      np.asarray(params["embed"]["embedding"].astype(jnp.bfloat16).astype(jnp.float32)))


def test_plain_safetensors_export_of_a_moe_model(tmp_path):
  cfg = dataclasses.replace(LLAMA, num_experts=2, num_decoder_layers=2, scan_layers=True,
                            group_size=8)
  params = _random_params(cfg)
  path = export(checkpoint_path=_save(tmp_path / "model", params), format="safetensors",
                export_dir=str(tmp_path / "plain"), model_config=cfg, mesh=MESH)
  config = files.read_json(os.path.join(path, "config.json"))
  assert config["format"] == "ul2x" and TransformerConfig(
      **{k: v for k, v in config.items() if k != "format"}) == cfg
  tensors = _tensors(path)
  flat = {"/".join(map(str, p)): v for p, v in traverse_util.flatten_dict(params).items()}
  assert set(tensors) == set(flat)
  for name, value in flat.items():
    np.testing.assert_array_equal(tensors[name], np.asarray(value), err_msg=name)


def _error(fn, **kwargs) -> str:
  """The ValueError's message, which must be one line (gin appends its call site)."""
  with pytest.raises(ValueError) as info:
    fn(**kwargs)
  message = str(info.value).split("\n  In call to configurable")[0]
  assert "\n" not in message
  return message


def test_bad_exports_fail_in_one_line_and_leave_nothing(tmp_path, t5_checkpoint):
  ckpt, _ = t5_checkpoint
  run = dict(checkpoint_path=ckpt, model_config=T5, mesh=MESH)
  assert "holds no checkpoint" in _error(
      export, **{**run, "checkpoint_path": str(tmp_path)}, export_dir=str(tmp_path / "a"))
  moe = dataclasses.replace(T5, num_experts=2, num_encoder_layers=2)
  assert "SwitchTransformers' experts and dense layers are ungated" in _error(
      export, **{**run, "model_config": moe}, export_dir=str(tmp_path / "b"))
  relative_lm = TransformerConfig(architecture="decoder_only", position="relative")
  message = _error(export, **{**run, "model_config": relative_lm}, export_dir=str(tmp_path / "c"))
  assert "position='relative'" in message and "format='safetensors'" in message
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("old")
  assert "not empty" in _error(export, **run, export_dir=str(tmp_path / "full"))
  assert os.listdir(tmp_path / "full") == ["keep.txt"]
  export(**run, export_dir=str(tmp_path / "full"), overwrite=True)
  assert sorted(os.listdir(tmp_path / "full")) == [
      "config.json", "generation_config.json", "model.safetensors"]
  (tmp_path / "file").write_text("a file, not a directory")
  assert "cannot create" in _error(export, **run, export_dir=str(tmp_path / "file" / "out"))
  assert sorted(os.listdir(tmp_path)) == ["file", "full"]  # no staging directory left


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "t5", "feed_forward_proj": "relu"}, "'relu'"),
    ({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}, "grouped"),
    ({"model_type": "llama", "num_attention_heads": 4, "attention_bias": True}, "biases"),
    ({"model_type": "llama", "num_attention_heads": 4,
      "rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ({"model_type": "bert"}, "model_type='bert'"),
])
def test_unsupported_hf_models_are_refused(tmp_path, config, reason):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  assert reason in _error(import_hf, hf_dir=str(tmp_path / "hf"),
                          model_dir=str(tmp_path / "model"))
  assert not (tmp_path / "model").exists()


def test_cli_exports_and_refuses_in_one_line(tmp_path, t5_checkpoint):
  ckpt, _ = t5_checkpoint
  (tmp_path / "model.gin").write_text(model_gin(T5, "the test"))
  env = cpu_env(2)
  args = [sys.executable, "-m", "ul2x.export", f"--gin_file={tmp_path}/model.gin",
          "--gin_file=gin_configs/runs/export.gin", f"--gin.CHECKPOINT_PATH='{ckpt}'",
          f"--gin.EXPORT_DIR='{tmp_path}/hf'"]
  # Started in the repository root, as the docs start it (tests/test_imports.py).
  run = functools.partial(subprocess.run, capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
  result = run(args)  # a checkpoint without a record: which tokenizer is not known
  assert result.returncode == 2 and "without a record of its vocabulary; pass " \
      "--gin.export.tokenizer=" in result.stderr and not (tmp_path / "hf").exists(), \
      result.stderr[-2000:]
  result = run(args + ["--gin.export.tokenizer='byte'"])
  assert result.returncode == 2 and "has 384 ids but the model has vocab_size=101" in \
      result.stderr and not (tmp_path / "hf").exists(), result.stderr[-2000:]
  result = run(args + ["--gin.export.tokenizer=None"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"exported step 7 of {ckpt} to {tmp_path}/hf: hf (t5)" in result.stdout
  assert sorted(os.listdir(tmp_path / "hf")) == [
      "config.json", "generation_config.json", "model.safetensors"]
  assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").d_model == T5.emb_dim
  (tmp_path / "relu").mkdir()
  (tmp_path / "relu" / "config.json").write_text('{"model_type": "t5"}')
  result = run([sys.executable, "-m", "ul2x.import_hf", f"--hf_dir={tmp_path}/relu",
                f"--model_dir={tmp_path}/imported"])
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.startswith("error: T5 feed_forward_proj='relu'")
  assert len(result.stderr.strip().splitlines()) == 1


def test_hf_export_writes_the_recorded_tokenizer_and_import_keeps_it(tmp_path):
  from transformers import AutoTokenizer
  cfg = dataclasses.replace(T5, vocab_size=384)
  params = setup(cfg, mesh=MESH).init_state()["params"]
  model_dir = _save(tmp_path / "model", params)
  record.write(model_dir, cfg, vocabulary=vocabularies.byte_vocabulary())
  path = export_job(checkpoint_path=model_dir, export_dir=str(tmp_path / "hf"))
  tokenizer = AutoTokenizer.from_pretrained(path)
  assert tokenizer("[S2S] ab").input_ids == [b + 3 for b in b"[S2S] ab"] + [1]  # text
  assert tokenizer("[S2S] ab<extra_id_0>", split_special_tokens=False).input_ids == [
      261, 32 + 3, 97 + 3, 98 + 3, 383, 1]
  # Imported, the model keeps the tokenizer it came with and exports it again; without
  # one, the export refuses to guess.
  import_hf(path, str(tmp_path / "imported"))
  again = export_job(checkpoint_path=str(tmp_path / "imported"), export_dir=str(tmp_path / "again"))
  assert (tmp_path / "again" / "tokenizer_config.json").read_bytes() == \
      (tmp_path / "hf" / "tokenizer_config.json").read_bytes()
  os.remove(os.path.join(path, "tokenizer_config.json"))
  import_hf(path, str(tmp_path / "bare"))
  assert "records no vocabulary (imported without tokenizer files)" in _error(
      export_job, checkpoint_path=str(tmp_path / "bare"), export_dir=str(tmp_path / "none"))
  assert again and not (tmp_path / "none").exists()


def test_serving_format_goes_through_the_export_job(tmp_path, t5_checkpoint):
  """The job's artifact decodes the checkpoint's model as ul2x does."""
  from ul2x.export.serving import load_serving
  ckpt, params = t5_checkpoint
  assert "needs inputs_len and max_decode_len in export.serving_options" in _error(
      export, checkpoint_path=ckpt, export_dir=str(tmp_path / "none"), model_config=T5,
      format="serving")
  path = export(checkpoint_path=ckpt, export_dir=str(tmp_path / "serving"), model_config=T5,
                format="serving",
                serving_options={"inputs_len": 9, "max_decode_len": 4, "saved_model": False})
  assert {"serving.json", "greedy.jax_exported", "params.npz"} <= set(os.listdir(path))
  input_ids = np.array([[5, 6, 7, 1, 0, 0, 0, 0, 0], [40, 9, 80, 30, 12, 2, 61, 8, 1]], np.int32)
  ids, scores = load_serving(path)(input_ids)
  want_ids, want_scores = jax.device_get(make_predict_fn(setup(T5, mesh=MESH), max_decode_len=4)(
      params, {"encoder_input_tokens": input_ids}, None))
  assert ids.shape == (2, 4) and ids.tolist() != ids[::-1].tolist()  # rows decode differently
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=1e-5)


def test_serving_options_on_the_command_line_are_refused_in_one_line(tmp_path, t5_checkpoint):
  """docs/serving.md's command, wrong in each way a user meets: one line naming the
  option as the command line spells it, and nothing written."""
  ckpt, _ = t5_checkpoint
  (tmp_path / "model.gin").write_text(model_gin(T5, "the test"))
  args = [f"--gin_file={tmp_path}/model.gin", "--gin_file=gin_configs/runs/export.gin",
          f"--gin.CHECKPOINT_PATH='{ckpt}'", f"--gin.EXPORT_DIR='{tmp_path}/serving'",
          "--gin.export.format='serving'"]
  options = "--gin.export.serving_options={'inputs_len': 9, 'max_decode_len': 4%s}"
  one_line_error(run_job("export", *args, "--gin.export.serving_options={'inputs_len': 9}"),
                 "needs max_decode_len in export.serving_options (given: ['inputs_len'])",
                 "--gin.export.serving_options=\"{'inputs_len': 128, 'max_decode_len': 64}\"")
  one_line_error(run_job("export", *args, options % "", "--gin.export.dtype='bfloat16'"),
                 "float32 parameters, not export.dtype='bfloat16'")
  one_line_error(run_job("export", *args, options % ", 'beam_size': 4"),
                 "unknown option(s) ['beam_size']", "saved_model")
  # The vocabulary refusal comes after the restore, from serving.export_serving.
  one_line_error(run_job("export", *args, options % ""), "vocab_size=101",
                 "--gin.export.serving_options=\"{..., 'saved_model': False}\"")
  assert not (tmp_path / "serving").exists()


@needs_torch
def test_exported_llama_tokenizer_and_generate_continue_as_infer_does(tmp_path):
  """tokenizer(prompt) + generate() greedy in transformers gives infer's
  causal_prompt=True continuation: the tokenizer leads with 0 and appends no EOS."""
  from cli_utils import run_job
  cfg = dataclasses.replace(LLAMA, vocab_size=384, num_decoder_layers=2)
  model_dir = _save(tmp_path / "model", _random_params(cfg, seed=5))
  record.write(model_dir, cfg, vocabulary=vocabularies.byte_vocabulary(),
               task_feature_lengths={"inputs": 16, "targets": 8})
  prompts = ["The cat", "ab [NLG] c"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  result = run_job("infer", "--gin_file=gin_configs/runs/infer.gin",
                   f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.INFER_OUTPUT_DIR='{tmp_path}'",
                   f"--gin.INPUT_FILE='{tmp_path / 'prompts.txt'}'",
                   "--gin.infer.causal_prompt=True")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "prompts-predict-7.jsonl") as f:
    expected = [json.loads(line)["prediction"] for line in f]
  path = export_job(checkpoint_path=model_dir, export_dir=str(tmp_path / "hf"), mesh=MESH)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  model = _hf_model(path)
  for prompt, prediction in zip(prompts, expected):
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs.input_ids[0].tolist() == [0] + [b + 3 for b in prompt.encode()]
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)
    new = out[0, inputs.input_ids.shape[1]:].tolist()
    assert vocabularies.decode_with_reserved(
        vocabularies.byte_vocabulary(), new[:new.index(1)] if 1 in new else new) == prediction
