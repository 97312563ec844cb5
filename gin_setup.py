"""The shared CLI start-up of every job (train, infer, eval, lm_eval, export): T5X's flags,
the gin config checked by gin's parser alone before the job's heavy imports (a missing
file, a syntax error, a parameter one of our configurables does not have, a macro a run
file declares `%gin.REQUIRED` and leaves unset), then loaded in full; configuration errors
as one line and exit status 2."""

import argparse
import ast
import contextlib
import importlib
import inspect
import logging
import os
import re
import sys
import tokenize

import gin
from gin import config_parser

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ConfigError(ValueError):
  """A bad command line or gin configuration; the CLI prints it on one line."""


def parse_flags(argv: list[str], description: str, add_flags=None) -> argparse.Namespace:
  """Parses T5X flags, and the job's own that `add_flags(parser)` adds; `--gin.NAME=VALUE`
  becomes the binding `NAME = VALUE`."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable), searched in --gin_search_paths")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="gin binding 'NAME = VALUE' (repeatable)")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated directories searched for gin files")
  parser.add_argument("--tfds_data_dir", default=None, help="local TFDS data directory")
  parser.add_argument("--coordinator_address", default=None, help="multi-host: HOST:PORT")
  parser.add_argument("--process_count", type=int, default=1, help="multi-host: host count")
  parser.add_argument("--process_index", type=int, default=0, help="multi-host: this host")
  parser.add_argument("--distributed_timeout", type=int, default=300,
                      help="multi-host: seconds to wait for every process to join")
  parser.add_argument("--peer_timeout", type=int, default=60,
                      help="multi-host: seconds of silence after which a process is "
                      "taken for dead (one line, exit 2)")
  parser.add_argument("--verbosity", type=int, default=0, choices=(0, 1),
                      help="0: ul2x's own lines and the warnings that matter; 1: also "
                      "TensorFlow's start-up lines and seqio's warnings")
  if add_flags is not None:
    add_flags(parser)
  gin_args = [a for a in argv if a.startswith("--gin.")]
  args, unknown = parser.parse_known_args([a for a in argv if not a.startswith("--gin.")])
  if unknown:
    raise ConfigError(f"unknown flag(s) {unknown}; see --help.")
  for arg in gin_args:
    name, sep, value = arg[len("--gin."):].partition("=")
    if not sep:
      raise ConfigError(f"{arg!r} needs a value: --gin.{name}=VALUE.")
    args.gin_bindings.append(f"{name} = {value}")
  return args


class _GinPathNotFoundFilter(logging.Filter):
  """gin logs 'Path not found' for every search path it tries before the one that
  holds an included file; those are not errors, a missing file raises anyway."""

  def filter(self, record):
    return record.msg != "Path not found: %s"


logging.getLogger().addFilter(_GinPathNotFoundFilter())


def _find_gin_file(name: str, search: list[str]) -> str:
  for directory in search:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise ConfigError(f"gin file {name!r} not found in {search}; check --gin_file or "
                    "add its directory to --gin_search_paths.")


def _gin_files(args: argparse.Namespace) -> tuple[list[str], list[str]]:
  """(the paths of the --gin_file files, the directories searched for gin files)."""
  # User directories first, so their files shadow ours; then cwd, then the package.
  search = [p for p in args.gin_search_paths.split(",") if p] + [os.getcwd(), PACKAGE_DIR]
  search = list(dict.fromkeys(os.path.abspath(p) for p in search))
  if not args.gin_file:
    raise ConfigError("no --gin_file given; e.g. --gin_file=gin_configs/runs/pretrain.gin.")
  return [_find_gin_file(f, search) for f in args.gin_file], search


_GIN_REQUIRED = "%gin.REQUIRED"  # a macro's value as gin's parser reads it, and as gin keeps it


def _check_required(macro_value, required: list[str]) -> None:
  """Raises for the first of the `required` macros that is unset (None, or left
  `%gin.REQUIRED`): `macro_value(name)` is its value after every file and binding."""
  for name in required:
    value = macro_value(name)
    if value is None or repr(value) == _GIN_REQUIRED:
      raise ConfigError(f"required macro {name} is not set; pass --gin.{name}=VALUE.")


class _Reference(str):
  """A `@configurable` or `%MACRO` as `check_config` reads it: its text."""

  def __repr__(self):
    return str(self)


class _TextOnly(config_parser.ParserDelegate):
  """gin's parser with nothing looked up: no configurable need be registered."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return _Reference(f"@{scoped_configurable_name}")

  def macro(self, macro_name):
    return _Reference(f"%{macro_name}")


class _Read:
  """What `check_config` reads of the gin files and bindings: the unscoped macros they
  bind (as text), the macros they declare `%gin.REQUIRED` (in order), and their
  parameter bindings (BindingStatements with an argument name)."""

  def __init__(self):
    self.macros, self.required, self.parameters = {}, [], []


def _read_statements(statements, search: list[str], read: _Read) -> bool:
  """Adds what gin `statements` and their includes bind and declare to `read`; False
  where an include is not found here (the full parse reports it)."""
  for statement in statements:
    if isinstance(statement, config_parser.IncludeStatement):
      name = statement.filename
      found = [p for p in ([name] if os.path.isabs(name) else
                           [os.path.join(d, name) for d in [os.getcwd(), *search]])
               if os.path.isfile(p)]
      if not found or not _read_file(found[0], search, read):
        return False
    elif isinstance(statement, config_parser.BindingStatement) and statement.arg_name:
      read.parameters.append(statement)
    elif isinstance(statement, config_parser.BindingStatement) and not statement.scope:
      read.macros[statement.selector] = statement.value
      if repr(statement.value) == _GIN_REQUIRED and statement.selector not in read.required:
        read.required.append(statement.selector)
  return True


def _read_file(path: str, search: list[str], read: _Read) -> bool:
  """`_read_statements` of the gin file `path`; a syntax error in it as a ConfigError."""
  try:
    with open(path) as f:
      return _read_statements(config_parser.ConfigParser(f, _TextOnly()), search, read)
  except tokenize.TokenError as e:
    raise ConfigError(f"gin: {path} ends inside a bracket or string; close it.") from e
  except SyntaxError as e:
    raise ConfigError(f"gin: {' '.join(str(e).split())}") from e


def _read_config(args: argparse.Namespace) -> _Read | None:
  """What the gin files and bindings bind and declare, read by gin's parser alone; None
  where an include is not found here. Raises ConfigError for a missing file or a syntax
  error."""
  files, search = _gin_files(args)
  read = _Read()
  for path in files:
    if not _read_file(path, search, read):
      return None
  bindings = []
  for binding in args.gin_bindings:
    try:
      statements = list(config_parser.ConfigParser(binding, _TextOnly()))
    except (SyntaxError, tokenize.TokenError) as e:
      reason = ("it ends inside a bracket or string" if isinstance(e, tokenize.TokenError)
                else e.msg.rstrip("."))
      reason = reason[max(reason.find("Failed to parse"), 0):]  # not an ast node's repr
      raise ConfigError(f"gin: cannot parse the binding {binding!r} ({reason}); check its "
                        "quotes and brackets: --gin.NAME=VALUE, a string as \"'text'\".") from e
    bindings += statements
  if not _read_statements(bindings, search, read):
    return None
  return read


# The package's folders whose modules define gin configurables (pyproject's packages).
_MODULE_FOLDERS = ("", "model", "kernels", "partitioning", "tasks", "trainer", "export")


def _is_configurable(decorator) -> str | bool:
  """A `@gin.configurable` / `@gin.register` decorator: its explicit name, else True."""
  call = decorator if isinstance(decorator, ast.Call) else None
  target = call.func if call else decorator
  if not (isinstance(target, ast.Attribute) and target.attr in ("configurable", "register")
          and isinstance(target.value, ast.Name) and target.value.id == "gin"):
    return False
  if call and call.args and isinstance(call.args[0], ast.Constant):
    return call.args[0].value
  named = [k.value.value for k in (call.keywords if call else ())
           if k.arg == "name" and isinstance(k.value, ast.Constant)]
  return named[0] if named else True


def _accepted(node) -> set[str] | None:
  """The parameter names a function or class definition accepts; None where any name
  may be (**kwargs, or a class whose __init__ is not in its own body or fields)."""
  if isinstance(node, ast.ClassDef):
    init = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    if init:
      return _accepted(init[0])
    dataclass = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
    if not dataclass or node.bases:
      return None
    return {n.target.id for n in node.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
  if node.args.kwarg is not None:
    return None
  a = node.args
  return {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}


def _static_configurables() -> dict[str, list[tuple[str, set | None]]]:
  """short name -> [(the module-qualified name, its parameters or None)] of every
  `@gin.configurable` in the package's modules, read from their source (no imports)."""
  found = {}
  for folder in _MODULE_FOLDERS:
    directory = os.path.join(PACKAGE_DIR, folder)
    for name in sorted(os.listdir(directory)):
      if not name.endswith(".py"):
        continue
      with open(os.path.join(directory, name)) as f:
        tree = ast.parse(f.read())
      module = ".".join(["ul2x", *([folder] if folder else []), name[:-3]])
      for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
          for decorator in node.decorator_list:
            named = _is_configurable(decorator)
            if named:
              short = named if isinstance(named, str) else node.name
              found.setdefault(short, []).append((f"{module}.{short}", _accepted(node)))
  return found


def _where(location) -> str:
  """gin's way of saying where a binding is."""
  line = " ".join((location.line_content or "").split())
  if location.filename:
    return f'In file "{location.filename}", line {location.line_num} {line}'
  return f"In bindings string line {location.line_num} {line}"


def _check_parameters(statements, known: dict) -> None:
  """Raises, as gin's full parse would, for the first binding of a parameter that one of
  our configurables (found in the source, or `known`: name -> parameters of one
  registered already) does not have; a configurable not ours is left to gin."""
  index = None
  for statement in statements:
    short = statement.selector.rsplit(".", 1)[-1]
    if short in known:
      candidates = [(short, known[short])]
    else:
      index = _static_configurables() if index is None else index
      candidates = [(full, accepted) for full, accepted in index.get(short, ())
                    if f".{full}".endswith(f".{statement.selector}")]
    if len(candidates) != 1 or candidates[0][1] is None:
      continue
    if statement.arg_name not in candidates[0][1]:
      raise ConfigError(f"gin: Configurable '{statement.selector}' doesn't have a parameter "
                        f"named '{statement.arg_name}'. {_where(statement.location)}")


def check_config(args: argparse.Namespace, known: dict | None = None) -> None:
  """What `load_config` refuses that gin's parser alone can tell, in a fraction of a
  second, before a job imports TensorFlow and seqio (which the configurables of the full
  parse need): a missing gin file, a syntax error, a macro that a file declares
  `%gin.REQUIRED` and no later file or binding sets, and a parameter that one of our
  configurables does not have (read from the source; `known`: name -> parameters of the
  job's own function)."""
  read = _read_config(args)
  if read is None:
    return
  macros = read.macros

  def macro_value(name):
    value = macros[name]
    for _ in range(len(macros)):  # a macro bound to another macro
      if not (isinstance(value, _Reference) and value.startswith("%") and value[1:] in macros):
        break
      value = macros[value[1:]]
    return value

  _check_parameters(read.parameters, known or {})  # gin's parse refuses these first
  _check_required(macro_value, read.required)


def load_config(args: argparse.Namespace) -> None:
  """Parses gin files and bindings; fails if a macro a file declares `%gin.REQUIRED` has
  no value after them all."""
  files, search = _gin_files(args)
  for path in search:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(files, args.gin_bindings, finalize_config=False)
  except ImportError as e:
    raise ConfigError(f"gin: a gin file's import failed ({e}); run from the directory that "
                      "holds the module or add it to PYTHONPATH.") from e
  except (ValueError, KeyError, IOError, SyntaxError) as e:
    raise ConfigError(f"gin: {' '.join(str(e).split())}") from e

  read = _read_config(args)  # the declarations, of which gin keeps no trace
  if read is not None:
    _check_required(lambda name: gin.query_parameter(f"%{name}"), read.required)
  try:
    gin.finalize()
  except (ValueError, KeyError) as e:
    raise ConfigError(f"gin: {' '.join(str(e).split())}") from e


def start_job(argv: list[str], description: str, configurables: str, *, tasks: bool = True,
              add_flags=None, known: dict | None = None) -> argparse.Namespace:
  """What every CLI job does before its work: parse the flags, start multi-host JAX,
  register the default seqio tasks (with the TFDS directory) when the job reads data,
  import the module `configurables`, whose imports register every gin configurable the
  job binds or imports (gin refuses one registered once the config is loaded), and load
  the gin config. `add_flags(parser)` adds the job's own flags."""
  args = parse_flags(argv, description, add_flags)
  check_config(args, known)  # seconds before the imports below would
  from ul2x import partitioning
  partitioning.initialize_distributed(args.coordinator_address, args.process_count,
                                      args.process_index, timeout_s=args.distributed_timeout,
                                      peer_timeout_s=args.peer_timeout)
  if args.verbosity == 0:
    logging.getLogger("absl").addFilter(_SeqioNoiseFilter())
  if tasks:
    with _stderr_silenced(args.verbosity == 0):
      import seqio

      import ul2x.tasks  # noqa: F401  registers the default tasks
    if args.tfds_data_dir:
      seqio.set_tfds_data_dir_override(args.tfds_data_dir)
  with _stderr_silenced(args.verbosity == 0):  # the export job's modules import TensorFlow
    importlib.import_module(configurables)
  load_config(args)
  return args


def run_job(job, argv: list[str], description: str, configurables: str, *,
            name: str | None = None):
  """The CLI of a job whose function `job` its job module defines (infer, eval, lm_eval):
  `start_job`, then `job` as gin configures it (its bindings under `name`, default its
  own) -> what it returns. `job` is registered with gin here, before the config is
  parsed, as T5X's train.py does in main, not by a decorator: `python -m ul2x.infer` runs
  the job module as `__main__`, and a decorator would register the function again
  wherever the module is imported by name, making `infer.*` bindings ambiguous.
  Registering the same function again (each `main(argv)` in one process) is allowed."""
  name = name or job.__name__
  configured = gin.configurable(name)(job)
  kinds = [p.kind for p in inspect.signature(job).parameters.values()]
  accepted = None if inspect.Parameter.VAR_KEYWORD in kinds else set(
      inspect.signature(job).parameters)
  start_job(argv, description, configurables, known={name: accepted})
  return configured()


# seqio's advice to cache tasks, once per member task: it does not apply to the
# embedded corpus, which is shuffled in full before seqio shards it.
_SEQIO_NOISE = "Using an uncached FunctionDataset"


class _SeqioNoiseFilter(logging.Filter):
  def filter(self, record):
    return not str(record.msg).startswith(_SEQIO_NOISE)


@contextlib.contextmanager
def _stderr_silenced(silence: bool):
  """Sends file descriptor 2 to /dev/null inside: TensorFlow's C++ start-up lines
  (oneDNN, CUDA drivers, absl) are written there at import, past Python's logging."""
  if not silence:
    yield
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


# What gin appends to an error raised inside a configurable: nothing a user needs.
GIN_CALL_NOTE = r" In call to configurable '[^']*' \(<[^>]*>\)"


def run_cli(main, argv=None) -> None:
  """Runs `main(argv)`, turning configuration errors into one line and exit status 2."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    main(argv)
  except (ConfigError, ValueError) as e:
    message = re.sub(GIN_CALL_NOTE, "", " ".join(str(e).split()))
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
  except Exception:
    from ul2x.partitioning import peers
    peers.wait_for_verdict()  # a dead peer is named in one line instead (exit 2)
    raise
