"""Every command the docs show runs: the fenced shell blocks of README.md and docs/*.md,
in order, each `python -m ul2x.<job>` in this process as the command runs it
(tests/cli_utils.py), at a tiny size (2 training steps, a few examples), with `/tmp/...`
inside a scratch directory that is also the working directory, and `runs/quickstart` a
2-step run of the quick-start experiment. A block that cannot run here says why on the
line above its fence: `<!-- not run by tests: REASON -->`."""

import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from cli_utils import run_job

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Documents that use another's files come after it (jobs.md writes /tmp/prompts.txt).
DOCS = ["README.md", "docs/jobs.md", *sorted(
    f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if p.name != "jobs.md")]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- not run by tests: (.+?) -->\s*$")
PROGRAMS = re.compile(r"^(\S*python3?|make|printf|cat|ls|cd|for|export|srun|\$\w+|\w+=\S*)$")
SHOWN_ONLY = {"cat", "ls"}  # they print what the commands before them wrote
OUTPUTS = ("EXPORT_DIR", "INFER_OUTPUT_DIR", "EVAL_OUTPUT_DIR")
TINY = {  # appended to each job's flags: the last binding of a name wins
    "train": ["--gin.TRAIN_STEPS=2", "--gin.train.log_every=1", "--gin.train.eval_every=2",
              "--gin.train.eval_batches=1", "--gin.train.checkpoint_every=2"],
    "infer": ["--gin.infer.num_examples=4"],
    "eval": ["--gin.evaluate.num_examples=4"],
}


def commands(body: str) -> list[str]:
  """The block's commands, continuation lines joined; in a transcript, only the lines
  after `$ ` prompts (the rest is output). [] where the block is not shell commands."""
  lines = body.splitlines()
  transcript = any(line.startswith("$ ") for line in lines)
  out, joined, keep = [], "", not transcript
  for line in lines:
    if transcript and not joined:
      keep = line.startswith("$ ")
      line = line[2:] if keep else line
    if not keep:
      continue
    joined += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
    if not line.endswith("\\"):
      out.append(joined.strip())
      joined = ""
  out = [c for c in out if c and not c.startswith("#")]  # comments, #! and #SBATCH lines
  if not out or not PROGRAMS.match(out[0].split()[0]):
    return []
  return out


def blocks():
  """-> [(doc, line, commands, reason not to run or None)]."""
  found = []
  for doc in DOCS:
    text = (ROOT / doc).read_text()
    for match in FENCE.finditer(text):
      language, body = match.groups()
      if language not in ("", "sh", "bash", "shell") or not commands(body):
        continue
      line = text.count("\n", 0, match.start()) + 1
      above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
      skip = SKIP.search(above)
      found.append((doc, line, commands(body), skip and skip.group(1)))
  return found


def files(doc: str) -> dict[str, str]:
  """The files a document writes out in full: fenced blocks whose first line is
  `# NAME.py` or `# NAME.gin` (a task module, an experiment file)."""
  found = {}
  for match in FENCE.finditer((ROOT / doc).read_text()):
    name = re.match(r"# ([\w.]+\.(?:py|gin))\b", match.group(2))
    if name:
      found[name.group(1)] = match.group(2)
  return found


def run_command(command: str, scratch: pathlib.Path, workdir: pathlib.Path) -> None:
  """Runs one documented command in `workdir`, its /tmp/ in `scratch`."""
  words = shlex.split(command.replace("/tmp/", f"{scratch}/tmp/"), comments=True)
  if words[0] == "cd":  # `cd DIR && ...`: the job resolves its gin files wherever it runs
    words = words[words.index("&&") + 1:]
  env = {}
  while words and (words[0].startswith("$") or re.match(r"\w+=", words[0])):
    name, _, value = words.pop(0).partition("=")
    env[name] = value
  if not words or words[0] in SHOWN_ONLY or words == ["make", "test"]:
    return  # an assignment, a look at what was written, or this suite itself
  if words == ["make", "train"]:
    words = [".venv/bin/python", "-m", "ul2x.train",
             "--gin_file=gin_configs/experiments/quickstart.gin", "--gin.MODEL_DIR='runs/quickstart'"]
  if words[0] == "printf":
    subprocess.run(["bash", "-c", shlex.join(words[:-2]) + " > " + words[-1]], cwd=workdir,
                   check=True)
    return
  assert words[0].endswith("python") and words[1] == "-m" and words[2].startswith("ul2x."), (
      f"the docs test cannot run {command!r}; mark its block `<!-- not run by tests: WHY -->`")
  job, args = words[2].removeprefix("ul2x."), words[3:]
  for arg in args:  # a rerun of a documented command writes its outputs anew
    name, _, value = arg.removeprefix("--gin.").removeprefix("--").partition("=")
    if name in (*OUTPUTS, "model_dir"):
      shutil.rmtree(workdir / value.strip("'\""), ignore_errors=True)
  path = [str(workdir)] if env.get("PYTHONPATH") == "." else []
  sys.path[:0] = path
  try:
    result = run_job(job, *args, *TINY.get(job, []))
  finally:
    del sys.path[:len(path)]
  if "unregistered operation" in result.stderr:  # docs/serving.md: jax 0.12 with TF 2.21
    pytest.skip(f"TensorFlow cannot read this jax's StableHLO: {result.stderr.strip()}")
  assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  """/tmp/ of the documented commands, and `runs/quickstart`: the quick-start experiment
  trained for 2 steps, as `make train` would for 600."""
  scratch = tmp_path_factory.mktemp("docs")
  (scratch / "tmp").mkdir()
  result = run_job("train", "--gin_file=gin_configs/experiments/quickstart.gin",
                   f"--gin.MODEL_DIR='{scratch / 'quickstart'}'", *TINY["train"])
  assert result.returncode == 0, result.stderr[-3000:]
  return scratch


def test_the_blocks_are_found():
  """The parser still sees the docs' commands: the quick start's and the jobs' run."""
  run = {(doc, cmds[0].split()[0]) for doc, _, cmds, skip in blocks() if not skip}
  assert {("README.md", "make"), ("docs/export.md", "python")} <= run, run
  assert sum(not skip for *_, skip in blocks()) >= 15


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run(doc, scratch, monkeypatch):
  workdir = scratch / doc.replace("/", "_")
  (workdir / "runs").mkdir(parents=True)
  (workdir / "runs" / "quickstart").symlink_to(scratch / "quickstart")
  for name, text in files(doc).items():
    (workdir / name).write_text(text)
  monkeypatch.chdir(workdir)
  modules = set(sys.modules)
  try:
    for _, line, commands_, skip in (b for b in blocks() if b[0] == doc):
      if skip:
        continue
      for command in commands_:
        try:
          run_command(command, scratch, workdir)
        except AssertionError as e:
          raise AssertionError(f"{doc}:{line}: {e}") from None
  finally:  # a task module of this document is not another's
    for name in set(sys.modules) - modules:
      if getattr(sys.modules[name], "__file__", "") and str(workdir) in sys.modules[name].__file__:
        del sys.modules[name]
