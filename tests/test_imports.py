"""No folder or module of ours is a top-level module, whichever way a documented command
starts Python in the repository root (`python -m pytest`, `python -m ul2x.<job>`): both put
the root on `sys.path`, where our `kernels/` would shadow Hugging Face's `kernels`, which
transformers probes. `ul2x/__init__.py` hides our names there; a user's own module in the
root still imports (docs/data.md registers tasks that way)."""

import pathlib
import subprocess
import sys

import ul2x

ROOT = pathlib.Path(__file__).resolve().parents[1]
OURS = sorted({p.name if p.is_dir() else p.stem for p in ROOT.iterdir()
               if not p.name.startswith((".", "_")) and (p.is_dir() or p.suffix == ".py")
               and (p.name if p.is_dir() else p.stem).isidentifier()})

CHECK = f"""
import importlib.util, pathlib, sys
import ul2x
for name in {OURS!r}:
  spec = importlib.util.find_spec(name)
  places = list(spec.submodule_search_locations or []) if spec else []
  if spec and spec.origin:
    places.append(spec.origin)
  assert all(pathlib.Path(p).resolve().parent != pathlib.Path({str(ROOT)!r}) for p in places), (
      name, places)
import my_module_in_the_root
print("ok")
"""


def test_every_name_in_the_root_is_hidden():
  assert {"kernels", "model", "tasks", "export", "trainer", "tests", "train"} <= set(OURS)
  assert set(OURS) - {"runs", "build"} <= ul2x.OWN_NAMES, "add the new name to OWN_NAMES"


def test_no_name_of_ours_is_a_top_level_module_from_the_root(tmp_path):
  """`python -m ul2x.<job>`, `python -m pytest` and `python -c` all put the working
  directory first on `sys.path`; a job's first import is `ul2x`, and tests/conftest.py's."""
  user_module = ROOT / "my_module_in_the_root.py"
  user_module.write_text("")
  try:
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    without = subprocess.run([sys.executable, "-c", CHECK.replace("import ul2x\n", "")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
  finally:
    user_module.unlink()
  assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-2000:]
  assert "AssertionError: ('bench'" in without.stderr, "the check cannot tell: " + without.stderr
