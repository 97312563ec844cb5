"""Tests for ul2x.tasks: corpus, vocabulary, denoisers, task registration and trainer batches."""

import numpy as np
import pytest
import seqio

import ul2x.tasks
from ul2x.tasks import corpus, default_tasks, preprocessors, ul2, vocabularies

SMALL = {"inputs": 64, "targets": 32}
VOCAB = vocabularies.byte_vocabulary()
FIRST_SENTINEL = vocabularies.sentinel_id(VOCAB, 0)
LAST_SENTINEL = vocabularies.sentinel_id(VOCAB, vocabularies.NUM_SENTINELS - 1)
ENC_DEC_FEATURES = {
    "encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
    "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids",
    "encoder_positions", "decoder_positions"}
DECODER_FEATURES = {
    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
    "decoder_segment_ids", "decoder_positions", "decoder_causal_attention"}


def _is_sentinel(token) -> bool:
  return LAST_SENTINEL <= token <= FIRST_SENTINEL


def _train_chunks(chunk_length: int, count: int) -> list[list[int]]:
  """The first `count` chunks of the train split's token stream, in file order, as the
  denoisers cut it: documents concatenated, each ended by EOS, then equal chunks."""
  stream = []
  for line in corpus.corpus_lines("train"):
    stream += VOCAB.encode(line) + [VOCAB.eos_id]
    if len(stream) >= chunk_length * count:
      return [stream[i * chunk_length:(i + 1) * chunk_length] for i in range(count)]
  raise AssertionError(f"the train split has fewer than {count} chunks")


def _task_examples(name: str, lengths: dict[str, int], count: int) -> list[dict[str, list[int]]]:
  ds = seqio.get_mixture_or_task(name).get_dataset(
      lengths, split="train", shuffle=False, seed=0, num_epochs=1)
  return [{k: v.tolist() for k, v in ex.items()} for ex in ds.take(count).as_numpy_iterator()]


def _merge_spans(inputs: list[int], targets: list[int]) -> tuple[list[int], list[int]]:
  """Undoes span corruption: (original tokens, noise span lengths). No EOS in the arguments."""
  spans, sentinel = {}, None
  for token in targets:
    if _is_sentinel(token):
      sentinel = token
      spans[sentinel] = []
    else:
      spans[sentinel].append(token)
  merged = []
  for token in inputs:
    merged += spans[token] if _is_sentinel(token) else [token]
  return merged, [len(spans[t]) for t in inputs if _is_sentinel(t)]


def test_corpus_splits_are_real_disjoint_text():
  train, validation = corpus.corpus_lines("train"), corpus.corpus_lines("validation")
  assert len(train) > 1000 and len(validation) > 50
  assert not set(train) & set(validation)
  assert all(len(line) >= 40 for line in train + validation)
  assert sum(line.count(" the ") for line in train) > 1000
  with pytest.raises(ValueError, match="'test'.*'train', 'validation'"):
    corpus.corpus_lines("test")


def test_byte_vocabulary_and_sentinels():
  assert vocabularies.byte_vocabulary() is VOCAB
  assert VOCAB.vocab_size == 3 + 256 + 125 == 384 and VOCAB.eos_id == 1
  assert VOCAB.encode("A") == [ord("A") + 3]
  assert FIRST_SENTINEL == VOCAB.vocab_size - 1 and LAST_SENTINEL == 3 + 256 + 3
  assert [vocabularies.paradigm_token_id(VOCAB, t) for t in vocabularies.PARADIGM_TOKENS] == [
      259, 260, 261]
  with pytest.raises(ValueError, match="sentinel index 122 is out of range"):
    vocabularies.sentinel_id(VOCAB, vocabularies.NUM_SENTINELS)
  with pytest.raises(ValueError, match=r"paradigm token '\[MLM\]' is not one of"):
    vocabularies.paradigm_token_id(VOCAB, "[MLM]")


def test_span_corruption_statistics_and_round_trip():
  # 128/64 gives chunks of 141 tokens: 21 noise tokens in 7 spans (inputs 128 with EOS).
  lengths = {"inputs": 128, "targets": 64}
  chunk_length = preprocessors.span_corruption_chunk_length(lengths)
  assert chunk_length == 141
  assert preprocessors.span_counts(chunk_length, 0.15, 3.0) == (21, 7)
  originals = _train_chunks(chunk_length, 500)
  examples = _task_examples("ul2x_span_corruption", lengths, 500)
  assert len(examples) == 500
  noise_tokens = num_spans = 0
  for original, ex in zip(originals, examples):
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs[-1] == VOCAB.eos_id and targets[-1] == VOCAB.eos_id
    assert len(inputs) == lengths["inputs"] and len(targets) == 21 + 7 + 1
    assert _is_sentinel(targets[0]) and _is_sentinel(inputs[-2])
    merged, span_lengths = _merge_spans(inputs[:-1], targets[:-1])
    assert merged == original
    assert min(span_lengths) >= 1
    noise_tokens += sum(span_lengths)
    num_spans += len(span_lengths)
  assert noise_tokens / (500 * chunk_length) == pytest.approx(0.15, rel=0.05)
  assert noise_tokens / num_spans == pytest.approx(3.0, rel=0.05)


def test_prefix_lm_splits_chunks_without_loss():
  originals = _train_chunks(SMALL["inputs"] - 1, 300)
  examples = _task_examples("ul2x_prefix_lm", SMALL, 300)
  cuts = set()
  for original, ex in zip(originals, examples):
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs[-1] == VOCAB.eos_id and targets[-1] == VOCAB.eos_id
    assert len(inputs) >= 2 and len(targets) >= 2
    assert len(inputs) <= SMALL["inputs"] and len(targets) <= SMALL["targets"]
    assert inputs[:-1] + targets[:-1] == original
    cuts.add(len(inputs))
  assert len(cuts) > 10


def test_feature_lengths_too_short_raise():
  with pytest.raises(ValueError, match="inputs=2, targets=32 are too short for span_corruption"
                                       ".*minimum is inputs=3 and targets=3"):
    preprocessors.span_corruption_chunk_length({"inputs": 2, "targets": 32})
  with pytest.raises(ValueError, match="inputs=64, targets=1 .*minimum is inputs=2"):
    ul2x.tasks.get_dataset("ul2x_prefix_lm", {"inputs": 64, "targets": 1}, "train", 2)
  with pytest.raises(ValueError, match="227 noise spans, but the vocabulary has 122 sentinels"):
    ul2x.tasks.get_dataset("ul2x_span_corruption", {"inputs": 4096, "targets": 1024}, "train", 2)


def _first_batches(name: str, count: int = 3, **kwargs) -> list[dict[str, np.ndarray]]:
  kwargs = {"split": "train", "batch_size": 4, **kwargs}
  ds = ul2x.tasks.get_dataset(name, SMALL, **kwargs)
  return list(ds.take(count).as_numpy_iterator())


def test_same_seed_gives_identical_packed_batches():
  first = _first_batches("ul2x_span_corruption", seed=7)
  again = _first_batches("ul2x_span_corruption", seed=7)
  other = _first_batches("ul2x_span_corruption", seed=8)
  for a, b in zip(first, again):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a["encoder_input_tokens"], c["encoder_input_tokens"])
             for a, c in zip(first, other))


def test_shards_are_disjoint():
  def rows(shard_index):
    batches = _first_batches("ul2x_prefix_lm", count=4, pack=False, shard_index=shard_index,
                             num_shards=2, batch_size=8)
    # Documents' last chunks can be a few tokens that recur (e.g. '".'): skip those.
    examples = [np.concatenate([b["encoder_input_tokens"], b["decoder_target_tokens"]], axis=1)
                for b in batches]
    return {tuple(row) for row in np.concatenate(examples) if np.count_nonzero(row) >= 10}

  shard0, shard1 = rows(0), rows(1)
  assert len(shard0) > 25 and len(shard1) > 25
  assert not shard0 & shard1
  with pytest.raises(ValueError, match="shard_index 2 is not in"):
    ul2x.tasks.get_dataset("ul2x_prefix_lm", SMALL, "train", 2, shard_index=2, num_shards=2)


@pytest.mark.parametrize("architecture,features,pack", [
    ("encoder_decoder", ENC_DEC_FEATURES, True),
    ("decoder_only", DECODER_FEATURES, True),
    ("decoder_only", DECODER_FEATURES, False),
])
def test_batch_features_shapes_and_dtypes(architecture, features, pack):
  (batch,) = _first_batches("ul2x_prefix_lm", count=1, split="validation",
                            architecture=architecture, pack=pack)
  lengths = ul2x.tasks.feature_lengths_for(architecture, SMALL)
  assert set(batch) == features == set(lengths)
  for key, value in batch.items():
    assert value.shape == (4, lengths[key]) and value.dtype == np.int32, key
  if architecture == "decoder_only":
    assert lengths["decoder_target_tokens"] == SMALL["inputs"] + SMALL["targets"]
    assert batch["decoder_causal_attention"].any()
  assert (batch["decoder_segment_ids"] > 0).any()


def test_bad_names_raise_listing_choices():
  with pytest.raises(ValueError, match=r"unknown seqio task or mixture 'nope'; registered: .*"
                                       r"ul2x_prefix_lm, ul2x_reverse, ul2x_span_corruption, "
                                       r"ul2x_ul2, ul2x_ul2_r3_15.*put e.g. `import my_tasks` "
                                       r"in a gin file given with --gin_file"):
    ul2x.tasks.get_dataset("nope", SMALL, "train", 2)
  with pytest.raises(ValueError, match="architecture 'gpt'"):
    ul2x.tasks.feature_lengths_for("gpt", SMALL)


def _first_reverse_example() -> dict:
  task = seqio.get_mixture_or_task("ul2x_reverse")
  ds = task.get_dataset({"inputs": 8, "targets": 8}, split="validation", shuffle=False,
                        use_cached=False)
  return next(ds.as_numpy_iterator())


def test_registration_is_idempotent():
  """Registering again replaces: exactly the default tasks and mixture stay registered,
  each once, the mixture holds the tasks registered now, and the examples do not change."""
  before = _first_reverse_example()
  default_tasks.register_tasks()
  first = {name: seqio.TaskRegistry.get(name) for name in default_tasks.TASK_NAMES}
  default_tasks.register_tasks()
  ours = {name for name in seqio.TaskRegistry.names() if name.startswith("ul2x_")}
  assert ours == set(default_tasks.TASK_NAMES)
  assert [n for n in seqio.MixtureRegistry.names() if n.startswith("ul2x_")] == [
      default_tasks.UL2_MIXTURE_NAME]
  for name in default_tasks.TASK_NAMES:
    assert seqio.TaskRegistry.get(name) is not first[name], name  # replaced, not kept
  mixture = seqio.get_mixture_or_task(default_tasks.UL2_MIXTURE_NAME)
  members = [f"{default_tasks.UL2_MIXTURE_NAME}_{d.name}" for d in ul2.UL2_DENOISERS]
  assert [t.name for t in mixture.tasks] == sorted(members)
  assert all(t is seqio.TaskRegistry.get(t.name) for t in mixture.tasks)
  after = _first_reverse_example()
  assert before.keys() == after.keys()
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])
