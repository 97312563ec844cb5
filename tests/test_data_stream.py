"""The trainer's input stream: a restored position continues the batches without
replaying them, and a position of another stream is refused."""

import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

import ul2x.tasks  # registers the default tasks
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
