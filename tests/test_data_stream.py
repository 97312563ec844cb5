"""The trainer's input stream: a restored position continues the batches without
replaying them, and a position of another stream is refused."""

import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

import ul2x.tasks  # registers the default tasks
import ul2x.trainer.data
from ul2x import partitioning
from ul2x.trainer.checkpoints import IncompatibleCheckpointError
from ul2x.trainer.data import DataStream


def stream(data_shards: int = 2) -> DataStream:
  mesh = partitioning.create_mesh(data=8)
  return DataStream("ul2x_span_corruption", {"inputs": 32, "targets": 16}, "train",
                    batch_size=8, data_shards=data_shards,
                    sharding=NamedSharding(mesh, PartitionSpec("data")),
                    architecture="encoder_decoder", pack=True, seed=0)


def assert_same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(directory with the state after 5 batches, the 3 batches that follow)."""
  directory = str(tmp_path_factory.mktemp("position"))
  straight = stream()
  for _ in range(5):
    next(straight)
  straight.save(directory)
  return directory, [next(straight) for _ in range(3)]


def test_restore_continues_without_replaying(saved, monkeypatch):
  directory, following = saved
  resumed = stream()

  def no_replay(*args, **kwargs):
    raise AssertionError("the restored stream replayed batches with Dataset.skip")

  monkeypatch.setattr(tf.data.Dataset, "skip", no_replay)
  resumed.restore(directory)
  batches = [next(resumed) for _ in range(3)]
  for got, expected in zip(batches, following):
    assert_same(got, expected)
  fresh = next(stream())  # what a lost position would give: detectably different
  assert not np.array_equal(fresh["encoder_input_tokens"], batches[0]["encoder_input_tokens"])


def test_global_batch_is_the_shards_side_by_side():
  halves = [next(iter(ul2x.tasks.get_dataset(
      "ul2x_span_corruption", {"inputs": 32, "targets": 16}, "train", 4, seed=0,
      shard_index=k, num_shards=2))) for k in range(2)]
  whole = next(stream(data_shards=2))
  for name in whole:
    np.testing.assert_array_equal(whole[name], np.concatenate([h[name] for h in halves]))


def test_a_position_of_another_stream_is_refused(saved):
  directory, _ = saved
  with pytest.raises(IncompatibleCheckpointError, match=r"data_shards=2, this job 4; resume "
                                                        r"with --gin.train.data_shards=2"):
    stream(data_shards=4).restore(directory)


def test_a_checkpoint_without_iterator_states_is_replayed(saved):
  _, following = saved
  legacy = stream()
  legacy.replay({"train_batches": 5, "process_count": 2})
  assert_same(next(legacy), following[0])
  with pytest.raises(IncompatibleCheckpointError, match="data_shards=1"):
    stream().replay({"train_batches": 5, "process_count": 1})


def test_a_pipeline_tf_data_cannot_save_stops_the_job_before_any_write(tmp_path):
  """A task whose pipeline holds a py_function is refused at start-up in one line, before
  any step runs and before MODEL_DIR is written, not at the first checkpoint."""
  import seqio

  from ul2x.model import TransformerConfig
  from ul2x.tasks import registry
  from ul2x.trainer.loop import train

  def examples(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    ids = tf.data.Dataset.range(1000).map(
        lambda i: tf.py_function(lambda x: x % 7 + 3, [i], tf.int64))
    ids = ids.map(lambda t: tf.cast(t, tf.int32))
    return ids.map(lambda t: {"inputs": tf.fill([4], t), "targets": tf.fill([3], t)})

  vocab = seqio.PassThroughVocabulary(size=384, eos_id=1)
  registry.register_task(
      "test_py_function", source=seqio.FunctionDataSource(examples, splits=["train"]),
      output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")},
      preprocessors=[seqio.preprocessors.append_eos])
  model_dir = tmp_path / "run"
  with pytest.raises(ValueError, match="'test_py_function' cannot be checkpointed"):
    train(model_dir=str(model_dir), train_steps=2, mixture_or_task_name="test_py_function",
          task_feature_lengths={"inputs": 8, "targets": 8}, eval_every=0,
          model_config=TransformerConfig(), batch_size=8)
  assert not model_dir.exists()


@pytest.mark.parametrize("unsaveable, reason", [
    (lambda ids: ids.map(lambda i: tf.py_function(lambda x: x, [i], tf.int64)),
     "EagerPyFunc is stateful."),
    # tf.data raises UnimplementedError saving this one, FailedPreconditionError checking it.
    (lambda ids: ids.apply(tf.data.experimental.prefetch_to_device("/cpu:0")), None)],
    ids=["py_function", "prefetch_to_device"])
def test_check_saveable_and_save_refuse_a_pipeline_in_one_same_line(
    tmp_path, monkeypatch, unsaveable, reason):
  def get_dataset(*args, **kwargs):
    return unsaveable(tf.data.Dataset.range(1000)).map(lambda i: {"targets": tf.fill([4], i)})

  monkeypatch.setattr(ul2x.trainer.data.pipeline, "get_dataset", get_dataset)
  data = stream(data_shards=1)
  messages = []
  for refuse in (data.check_saveable, lambda: (next(data), data.save(str(tmp_path)))):
    with pytest.raises(ValueError, match=r"^the input pipeline of 'ul2x_span_corruption' "
                       r"cannot be checkpointed \(.+\): every dataset op must be one tf.data "
                       r"can save") as refused:
      refuse()
    messages.append(str(refused.value))
  for message in messages:
    assert "\n" not in message and "{{function_node" not in message and "[Op:" not in message
  if reason:
    assert messages[0] == messages[1] and f"({reason})" in messages[0]
