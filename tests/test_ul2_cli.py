"""End to end: a user's task module, imported by a gin file, registers UL2 mixtures over a
local text file and over a TFDS dataset built here, and `python -m ul2x.train` trains
the tiny model 20 steps on each."""

import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
from cli_utils import cpu_env

TASK_MODULE = textwrap.dedent('''\
    """A user's task definitions (what docs/ul2.md shows): two UL2 mixtures."""
    import os
    import random
    import string

    import seqio
    import tensorflow_datasets as tfds

    import ul2x.tasks

    HERE = os.path.dirname(os.path.abspath(__file__))


    def documents(split):
      rng = random.Random(split)
      return [" ".join("".join(rng.choices(string.ascii_lowercase[:8], k=rng.randint(2, 7)))
                       for _ in range(rng.randint(10, 40))) for _ in range(200)]


    class Ul2xTestDocs(tfds.core.GeneratorBasedBuilder):
      """A tiny local TFDS dataset of random documents."""
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "validation")}

      def _generate_examples(self, split):
        for i, doc in enumerate(documents(split)):
          yield i, {"text": doc}


    ul2x.tasks.register_ul2_mixture(
        "test_cli_text", seqio.TextLineDataSource(
            {split: os.path.join(HERE, f"{split}.txt") for split in ("train", "validation")}))
    ul2x.tasks.register_ul2_mixture(
        "test_cli_tfds", seqio.TfdsDataSource("ul2x_test_docs:1.0.0"))
''')

GIN = textwrap.dedent('''\
    import ul2_test_tasks

    TRAIN_STEPS = 20
    TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}
    BATCH_SIZE = 8
    train.log_every = 10
    train.eval_every = 0
    train.async_checkpointing = False
''')


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
  """A directory with the task module, its text files, its gin file and TFDS data."""
  path = tmp_path_factory.mktemp("user")
  (path / "ul2_test_tasks.py").write_text(TASK_MODULE)
  (path / "ul2_test.gin").write_text(GIN)
  sys.path.insert(0, str(path))
  try:
    tasks = importlib.import_module("ul2_test_tasks")
    for split in ("train", "validation"):
      (path / f"{split}.txt").write_text("".join(d + "\n" for d in tasks.documents(split)))
    tasks.Ul2xTestDocs(data_dir=str(path / "tfds")).download_and_prepare()
  finally:
    sys.path.remove(str(path))
  return path


def _train(user_dir, mixture: str, *extra: str) -> None:
  """Runs the CLI from `user_dir` (so gin's `import ul2_test_tasks` finds the module)."""
  env = cpu_env(8, JAX_COMPILATION_CACHE_DIR=str(user_dir / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  args = ["--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin",
          f"--gin_file={user_dir / 'ul2_test.gin'}", f"--gin.MIXTURE_OR_TASK_NAME='{mixture}'",
          f"--gin.MODEL_DIR='{user_dir / mixture}'", *extra]
  result = subprocess.run([sys.executable, "-m", "ul2x.train", *args], capture_output=True,
                          text=True, env=env, cwd=user_dir, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 20/20" in result.stdout
  losses = [float(x) for x in re.findall(r"^step \d+/20\s+loss (\S+)", result.stdout, re.M)]
  assert len(losses) == 2 and losses[1] < losses[0], result.stdout
  assert os.listdir(user_dir / mixture / "checkpoints" / "20")
  assert "import ul2_test_tasks" in (user_dir / mixture / "config.gin").read_text()


def test_cli_trains_on_a_text_file_mixture(user_dir):
  _train(user_dir, "test_cli_text")


def test_cli_trains_on_a_local_tfds_mixture(user_dir):
  _train(user_dir, "test_cli_tfds", f"--tfds_data_dir={user_dir / 'tfds'}")
