"""UL2 mixtures in the trainer's pipeline: determinism across epochs and resumes, host
shards, both architectures, registration over user sources, vocabularies, mode tokens
for fine-tuning, and clear errors for unusable data."""

import functools
import random
import string

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import ul2x.tasks
from ul2x.tasks import finetune, train_vocab, ul2, vocabularies

LENGTHS = {"inputs": 32, "targets": 32}
VOCAB = vocabularies.byte_vocabulary()
S2S = vocabularies.paradigm_token_id(VOCAB, "[S2S]")
PARADIGM_IDS = {vocabularies.paradigm_token_id(VOCAB, t) for t in vocabularies.PARADIGM_TOKENS}
LOWEST_SENTINEL = vocabularies.sentinel_id(VOCAB, vocabularies.NUM_SENTINELS - 1)


def _function_source(lines_by_split: dict[str, list[str]]) -> seqio.FunctionDataSource:
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"text": lines_by_split[split]})
  return seqio.FunctionDataSource(dataset_fn, splits=tuple(lines_by_split))


def _random_documents(count: int, seed: int) -> list[str]:
  """Distinct random-letter documents: no 24-character string occurs in two of them."""
  rng = random.Random(seed)
  return [" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
                   for _ in range(rng.randint(20, 60))) for _ in range(count)]


def _batches(name: str, count: int, lengths=LENGTHS, **kwargs) -> list[dict[str, np.ndarray]]:
  kwargs = {"split": "train", "batch_size": 4, **kwargs}
  return list(ul2x.tasks.get_dataset(name, lengths, **kwargs).take(count).as_numpy_iterator())


def _source_texts(examples) -> list[str]:
  """The runs of source text in UL2 examples: the S-denoiser's chunks (prefix + target)
  and the kept and noise runs between span-corruption sentinels."""
  texts = []
  for ex in examples:
    inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
    for row in [inputs[1:] + targets] if inputs[0] == S2S else [inputs[1:], targets]:
      run = []
      for token in row + [0]:
        if 3 <= token < 259:
          run.append(token)
        elif run:
          texts.append(VOCAB.decode(run))
          run = []
  return texts


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_same_batches_and_skip_resumes_exactly():
  first = _batches("ul2x_ul2", 6, seed=7)
  # The trainer resumes by rebuilding the pipeline and skipping the batches it consumed.
  # (Only a dataset's first pass is fixed: iterating it again reshuffles, as tf.data does.)
  rebuilt = ul2x.tasks.get_dataset("ul2x_ul2", LENGTHS, "train", 4, seed=7)
  _assert_batches_equal(first[4:], list(rebuilt.skip(4).take(2).as_numpy_iterator()))
  # Another seed: other corruption in every member (and another mixing order).
  member = seqio.get_mixture_or_task("ul2x_ul2_x3_50")
  seeded = [next(member.get_dataset(LENGTHS, split="train", seed=seed).as_numpy_iterator())
            for seed in (7, 8)]
  assert not np.array_equal(seeded[0]["inputs"], seeded[1]["inputs"])


def test_repeated_epochs_corrupt_differently_and_deterministically():
  # Each document and its EOS make one X-denoiser chunk: every epoch has the same chunks.
  lengths = {"inputs": 24, "targets": 24}
  chunk = ul2x.tasks.preprocessors.span_corruption_chunk_length(lengths, 0.5, 3.0, "[NLG]")
  docs = ["".join(random.Random(i).choices(string.ascii_lowercase, k=chunk - 1))
          for i in range(5)]
  ul2.register_ul2_mixture("test_ul2_epochs", _function_source({"train": docs}))
  task = seqio.get_mixture_or_task("test_ul2_epochs_x3_50")

  def three_epochs():
    ds = task.get_dataset(lengths, split="train", shuffle=False, seed=3, num_epochs=3)
    return list(ds.as_numpy_iterator())

  examples = three_epochs()
  assert len(examples) == 15
  _assert_batches_equal(examples, three_epochs())
  for i in range(5):
    same_chunk = [examples[i + 5 * epoch] for epoch in range(3)]
    assert all(text in docs[i] for text in _source_texts(same_chunk))  # the same text
    assert len({tuple(ex["inputs"]) for ex in same_chunk}) == 3        # new corruption


def test_host_shards_read_disjoint_documents():
  docs = _random_documents(80, seed=0)

  def shuffled_docs(split, shuffle_files, seed=None):  # as the embedded corpus: seeded shuffle
    ds = tf.data.Dataset.from_tensor_slices({"text": docs})
    return ds.shuffle(len(docs), seed=seed) if shuffle_files and seed is not None else ds

  ul2.register_ul2_mixture("test_ul2_shards", seqio.FunctionDataSource(
      shuffled_docs, splits=("train",)))
  grams = []
  for shard in range(2):  # one epoch each (every epoch reshuffles, identically on all hosts)
    ds = seqio.get_mixture_or_task("test_ul2_shards").get_dataset(
        LENGTHS, split="train", seed=5, shard_info=seqio.ShardInfo(shard, 2), num_epochs=1)
    texts = _source_texts(ds.as_numpy_iterator())
    grams.append({text[j:j + 24] for text in texts for j in range(len(text) - 23)})
  assert min(len(g) for g in grams) > 300
  assert not grams[0] & grams[1]
  joined = "|".join(docs)  # EOS ends each document, so no run of text crosses two
  assert all(gram in joined for gram in grams[0] | grams[1])


def test_decoder_only_concatenates_inputs_and_targets():
  (batch,) = _batches("ul2x_ul2", 1, architecture="decoder_only")
  tokens, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  causal, segments = batch["decoder_causal_attention"], batch["decoder_segment_ids"]
  assert tokens.shape == (4, LENGTHS["inputs"] + LENGTHS["targets"])
  for row in range(tokens.shape[0]):
    for segment in set(segments[row].tolist()) - {0}:
      where = np.flatnonzero(segments[row] == segment)
      prefix = int(causal[row, where].sum()) - 1  # inputs, then the first target's position
      assert tokens[row, where[0]] in PARADIGM_IDS
      assert tokens[row, where[prefix - 1]] == VOCAB.eos_id  # inputs end with EOS
      assert not weights[row, where[:prefix]].any() and weights[row, where[prefix:]].all()
      assert (batch["decoder_positions"][row, where] == np.arange(where.size)).all()


def test_register_over_text_tfrecord_and_function_sources(tmp_path):
  docs = _random_documents(60, seed=1)
  text_file = tmp_path / "docs.txt"
  text_file.write_text("".join(d + "\n" for d in docs))
  record_file = str(tmp_path / "docs.tfrecord")
  with tf.io.TFRecordWriter(record_file) as writer:
    for d in docs:
      feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[d.encode()]))
      writer.write(tf.train.Example(features=tf.train.Features(
          feature={"body": feature})).SerializeToString())
  sources = {
      "text": (seqio.TextLineDataSource({"train": str(text_file)}), "text"),
      "tfrecord": (seqio.TFExampleDataSource(
          {"train": record_file}, {"body": tf.io.FixedLenFeature([], tf.string)}), "body"),
      "function": (_function_source({"train": docs}), "text"),
  }
  joined = "".join(docs)  # the texts below leave out the EOS that ends each document
  for kind, (source, text_key) in sources.items():
    mixture = ul2x.tasks.register_ul2_mixture(f"test_ul2_{kind}", source, text_key=text_key)
    assert [t.name for t in mixture.tasks] == sorted(
        f"test_ul2_{kind}_{d.name}" for d in ul2.UL2_DENOISERS)
    # The S-denoiser's examples are contiguous text of the source, in stream order.
    ds = seqio.get_mixture_or_task(f"test_ul2_{kind}_s").get_dataset(
        LENGTHS, split="train", shuffle=False, seed=0)
    for ex in ds.take(20).as_numpy_iterator():
      text = VOCAB.decode([t for t in ex["inputs"][1:].tolist() + ex["targets"].tolist()
                           if t > VOCAB.eos_id])
      assert text in joined, (kind, text)
  with pytest.raises(ValueError, match=r"features \['body'\] but no 'text'; pass text_key="):
    ul2x.tasks.register_ul2_mixture("test_ul2_badkey", sources["tfrecord"][0])
    ul2x.tasks.get_dataset("test_ul2_badkey", LENGTHS, "train", 2)
  with pytest.raises(ValueError, match=r"unknown seqio task or mixture 'test_ul2_nope'; "
                                       r"registered: .*test_ul2_function, test_ul2_function_r3_15"):
    ul2x.tasks.get_dataset("test_ul2_nope", LENGTHS, "train", 2)


def test_unusable_data_gives_clear_errors(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  ul2x.tasks.register_ul2_mixture("test_ul2_empty", seqio.TextLineDataSource({"train": str(empty)}))
  with pytest.raises(ValueError, match=r"task 'test_ul2_empty_r3_15' split 'train' shard 0 of 1 "
                                       r"yields no examples: its source .* is empty"):
    ul2x.tasks.get_dataset("test_ul2_empty", LENGTHS, "train", 2)
  ul2x.tasks.register_ul2_mixture("test_ul2_short", _function_source({"train": ["Too short."]}))
  with pytest.raises(ValueError, match=r"'test_ul2_short_r3_15' .* its source's 1 examples hold "
                                       r"fewer tokens than one example needs"):
    ul2x.tasks.get_dataset("test_ul2_short", LENGTHS, "train", 2)
  with pytest.raises(ValueError, match=r"task 'test_ul2_short_r3_15' has no split 'validation'"):
    ul2x.tasks.get_dataset("test_ul2_short", LENGTHS, "validation", 2)


def test_sentencepiece_vocabulary_trained_locally(tmp_path):
  corpus_file = tmp_path / "corpus.txt"
  lines = ul2x.tasks.corpus.corpus_lines("train")[:300]
  corpus_file.write_text("".join(line + "\n" for line in lines))
  prefix = str(tmp_path / "spm")
  assert train_vocab.train_vocab(prefix, 500, [str(corpus_file)]) == 503
  # More sentinels than the byte vocabulary's 122: X (mu=3, r=0.5) at 512/512 needs 127.
  vocab = vocabularies.sentencepiece_vocabulary(prefix + ".model", num_sentinels=200)
  assert vocab.vocab_size == 703 and vocabularies.num_sentinels_of(vocab) == 200
  ids = {t: vocabularies.paradigm_token_id(vocab, t) for t in vocabularies.PARADIGM_TOKENS}
  assert list(ids.values()) == [500, 501, 502]
  assert ids["[NLG]"] in vocab.encode("[NLG] typed as text")
  assert vocabularies.sentinel_id(vocab, 0) == 702 and vocabularies.sentinel_id(vocab, 199) == 503
  ul2x.tasks.register_ul2_mixture("test_ul2_spm", seqio.TextLineDataSource(
      {"train": str(corpus_file)}), vocabulary=vocab)
  long = {"inputs": 512, "targets": 512}
  ds = seqio.get_mixture_or_task("test_ul2_spm_x3_50").get_dataset(
      long, split="train", shuffle=False, seed=0)
  ex = next(ds.as_numpy_iterator())
  assert ex["inputs"][0] == ids["[NLG]"] and ex["targets"][0] == vocabularies.sentinel_id(vocab, 0)
  assert (ex["targets"] > 702 - 127).sum() == 127 and len(ex["targets"]) <= 512
  text = vocabularies.decode_with_reserved(vocab, ex["inputs"])
  assert text.startswith("[NLG]") and "<extra_id_126>" in text
  with pytest.raises(ValueError, match=r"127 noise spans, but the vocabulary has 122 sentinels; "
                                       r"use task_feature_lengths of at most inputs=\d+, targets="):
    seqio.get_mixture_or_task("ul2x_ul2_x3_50").get_dataset(long, split="train")
  with pytest.raises(ValueError, match="not a ul2x vocabulary"):
    vocabularies.sentinel_id(seqio.PassThroughVocabulary(size=10), 0)
  with pytest.raises(ValueError, match=r"cannot load SentencePiece model .*train_vocab"):
    vocabularies.sentencepiece_vocabulary(str(tmp_path / "missing.model"))


def test_finetune_task_prepends_mode_token_from_gin():
  pairs = {"train": [("What is 2 + 2?", "4"), ("Capital of France?", "Paris")]}

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    questions, answers = zip(*pairs[split])
    return tf.data.Dataset.from_tensor_slices({"question": list(questions),
                                               "answer": list(answers)})

  source = seqio.FunctionDataSource(dataset_fn, splits=("train",))
  get = functools.partial(ul2x.tasks.get_dataset, "test_ul2_qa", LENGTHS, "train", 2, pack=False)
  ul2x.tasks.register_finetune_task("test_ul2_qa", source, inputs_key="question",
                                    targets_key="answer")
  with pytest.raises(ValueError, match=r"no mode token chosen .*prepend_mode_token.mode_token"):
    get()
  try:
    gin.bind_parameter("prepend_mode_token.mode_token", "[NLG]")
    (batch,) = list(get().take(1).as_numpy_iterator())
  finally:
    gin.clear_config()
  inputs = batch["encoder_input_tokens"][0]
  assert inputs[0] == vocabularies.paradigm_token_id(VOCAB, "[NLG]")
  assert VOCAB.decode(inputs[1:].tolist()) == "What is 2 + 2?"
  assert VOCAB.decode(batch["decoder_target_tokens"][0].tolist()) == "4"
  finetune.register_finetune_task("test_ul2_qa", source, inputs_key="question",
                                  targets_key="answer", mode_token="[S2S]")
  (batch,) = list(get().take(1).as_numpy_iterator())
  assert batch["encoder_input_tokens"][0][0] == S2S
  with pytest.raises(ValueError, match=r"mode_token '\[XYZ\]' is not one of \[NLU\], \[NLG\]"):
    finetune.register_finetune_task("test_ul2_qa", source, mode_token="[XYZ]")
