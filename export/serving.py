"""The serving artifact of a trained model: its decoding exported with `jax.export`
(token ids in, ids and scores out, any batch size), its parameters beside it, and the
loader that runs it with jax and numpy alone (docs/serving.md).

Importing this module imports nothing of ul2x.model, ul2x.trainer or TensorFlow, so
that `load_serving` runs where ul2x's model code is absent; `export_serving` imports
them when it is called.
"""

import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "ul2x-serving"
MANIFEST = "serving.json"
PARAMS = "params.npz"
FUNCTIONS = {"greedy": "greedy.jax_exported", "sample": "sample.jax_exported"}
SAVED_MODEL = "saved_model"
EOS_ID = 1  # both ul2x vocabularies' EOS (tasks/vocabularies.py)
# tasks.vocabularies.PARADIGM_TOKENS, spelled out (tests/test_serving.py holds the two
# equal): the loader imports no other ul2x module, and vocabularies imports TensorFlow.
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")


def export_serving(job, params, directory: str, *, inputs_len: int, max_decode_len: int,
                   mode_token: str | None = None, saved_model: bool = True,
                   platforms: tuple[str, ...] = ("cpu",), batch_size: int | None = None,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[str]:
  """Writes the serving artifacts of `job`'s model with `params` into `directory` (which
  exists and is empty) -> the paths of the files written.

  greedy.jax_exported: `serve(params, input_ids int32 [b, inputs_len]) -> (output_ids
  int32 [b, max_decode_len], scores float32 [b])`, b any batch size (or `batch_size`,
  which MoE models need: their routing groups rows by batch size); sample.jax_exported:
  the same with a `seed` int32 [] third argument, sampling with `temperature`, `top_k`,
  `top_p`. `params` is {name: array}, the arrays of params.npz. Both decode as
  `make_predict_fn` does (cached; EOS 1, then 0s). input_ids are the encoder inputs
  (encoder_decoder) or the prefix-LM prompt without the leading 0 (decoder_only), each
  0-padded and ending in EOS as the tasks make them. `platforms`: those the functions
  are lowered for, e.g. ('cpu', 'cuda'). `saved_model`: also write the text-in,
  text-out TF SavedModel (byte vocabulary only), whose inputs lead with `mode_token`
  ('[NLU]', '[NLG]', '[S2S]' or None).
  """
  _check_arguments(directory, inputs_len, mode_token, saved_model, batch_size, job.cfg)
  from ul2x.partitioning.param_names import flat_names  # here: the loader imports no ul2x
  flat = {name: np.asarray(leaf) for name, leaf in flat_names(jax.device_get(params)).items()}
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  fns = _serving_fns(_single_device(job), jax.tree.structure(params), list(flat),
                     max_decode_len=max_decode_len, sampling=sampling)
  if saved_model:  # first: it is the part that can be refused (docs/serving.md)
    from ul2x.export import serving_tf  # TensorFlow: only when the SavedModel is asked for
    serving_tf.save_text_model(fns["greedy"], flat, os.path.join(directory, SAVED_MODEL),
                               inputs_len=inputs_len, mode_token=mode_token,
                               platforms=platforms, batch_size=batch_size)
  b = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
  specs = ({n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in flat.items()},
           jax.ShapeDtypeStruct((b, inputs_len), jnp.int32))
  for method, args in (("greedy", specs),
                       ("sample", specs + (jax.ShapeDtypeStruct((), jnp.int32),))):
    exported = jax.export.export(fns[method], platforms=platforms)(*args)
    with open(os.path.join(directory, FUNCTIONS[method]), "wb") as f:
      f.write(exported.serialize())
  np.savez(os.path.join(directory, PARAMS), **flat)
  manifest = dict(format=FORMAT, architecture=job.cfg.architecture, inputs_len=inputs_len,
                  max_decode_len=max_decode_len, batch_size=batch_size,
                  mode_token=mode_token, eos_id=EOS_ID, vocab_size=job.cfg.vocab_size,
                  platforms=list(platforms), params=PARAMS, functions=FUNCTIONS,
                  sampling=sampling, saved_model=SAVED_MODEL if saved_model else None)
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  return sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                for name in names)


# export_serving's options: the keys of the export job's `export.serving_options`.
OPTIONS = tuple(name for name, p in inspect.signature(export_serving).parameters.items()
                if p.kind is p.KEYWORD_ONLY)


def _passing(name: str, value) -> str:
  """How to pass export_serving's option `name=value`, in Python and to the export job."""
  return (f"pass {name}={value} (export job: --gin.export.serving_options=\"{{..., "
          f"'{name}': {value}}}\")")


def _check_arguments(directory: str, inputs_len: int, mode_token, saved_model: bool,
                     batch_size: int | None, cfg) -> None:
  if not os.path.isdir(directory) or os.listdir(directory):
    raise ValueError(f"serving directory {directory!r} must exist and be empty; create it "
                     "or pass an empty one.")
  if inputs_len < 1:
    raise ValueError(f"inputs_len={inputs_len} must be at least 1; pass the task's "
                     "'inputs' feature length.")
  if mode_token is not None and mode_token not in MODE_TOKENS:
    raise ValueError(f"mode_token {mode_token!r} is not one of {', '.join(MODE_TOKENS)}; "
                     "pass one of them, or None for no mode token.")
  if saved_model and cfg.vocab_size != 384:
    raise ValueError(f"the text SavedModel reads and writes the byte vocabulary (384 ids) "
                     f"but the model has vocab_size={cfg.vocab_size}; {_passing('saved_model', False)} "
                     "and tokenize outside (the jax.export functions take ids).")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1, or None for any.")
  if cfg.num_experts and batch_size is None:
    raise ValueError(f"a MoE model (num_experts={cfg.num_experts}) routes rows in groups "
                     "that depend on the batch size (model/moe.py group_layout), so its "
                     "decoding cannot be exported for any batch size; "
                     f"{_passing('batch_size', 'N')} and pad requests to N rows.")


def _single_device(job):
  """`job`'s model on a mesh of one device: the artifact runs on one device, and its
  shardings must not name devices the server may lack."""
  from ul2x import partitioning
  from ul2x.trainer.setup import setup
  if job.mesh.size == 1:
    return job
  # Every axis explicitly: gin may bind the job's multi-device sizes to create_mesh.
  mesh = partitioning.create_mesh(data=1, fsdp=1, expert=1, sequence=1, tensor=1,
                                  devices=jax.devices()[:1])
  return setup(job.cfg, mesh=mesh, rules=job.rules)


def _serving_fns(job, treedef, names: list[str], *, max_decode_len: int,
                 sampling: dict) -> dict:
  """{'greedy': jitted (flat params, input_ids) -> (ids, scores), 'sample': jitted
  (flat params, input_ids, seed) -> (ids, scores)}: `make_predict_fn`'s decoding."""
  from ul2x.model.contract import prompt_features
  from ul2x.trainer.predict import make_predict_fn
  common = dict(max_decode_len=max_decode_len, eos_id=EOS_ID, cached=True)
  greedy = make_predict_fn(job, method="greedy", **common)
  sample = make_predict_fn(job, method="sample", **common, **sampling)
  architecture = job.cfg.architecture

  def nested(flat):
    return jax.tree.unflatten(treedef, [flat[name] for name in names])

  def serve_greedy(params, input_ids):
    return greedy(nested(params), prompt_features(architecture, input_ids), None)

  def serve_sample(params, input_ids, seed):
    return sample(nested(params), prompt_features(architecture, input_ids),
                  jax.random.key(seed))

  return {"greedy": jax.jit(serve_greedy), "sample": jax.jit(serve_sample)}


def load_serving(directory: str, method: str = "greedy"):
  """The artifact of `export_serving` in `directory`, with jax and numpy only ->
  `serve(input_ids int32 [b, inputs_len]) -> (output_ids int32 [b, max_decode_len],
  scores float32 [b])`; for method 'sample', `serve(input_ids, seed: int)`. Each new
  batch size compiles once."""
  manifest_path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise ValueError(f"{directory!r} holds no {MANIFEST}; pass a directory written by "
                     "ul2x.export.serving.export_serving.")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or method not in manifest.get("functions", {}):
    raise ValueError(f"{manifest_path} has format {manifest.get('format')!r} and methods "
                     f"{sorted(manifest.get('functions', {}))}; expected format {FORMAT!r} "
                     f"and method {method!r}: pass one of its methods.")
  with open(os.path.join(directory, manifest["functions"][method]), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(directory, manifest["params"])) as stored:
    params = {name: jax.device_put(stored[name]) for name in stored.files}
  call = jax.jit(exported.call)
  rows = manifest["batch_size"] or "batch"
  inputs_len = manifest["inputs_len"]

  def serve(input_ids, *seed):
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] != inputs_len or rows not in (
        "batch", input_ids.shape[0]):
      raise ValueError(f"input_ids have shape {input_ids.shape}; the artifact takes "
                       f"[{rows}, {inputs_len}]: pad with 0 or truncate to it.")
    return call(params, input_ids, *(jnp.int32(s) for s in seed))

  return serve
