"""Fine-tuning tasks with UL2 mode switching: the paradigm token chosen in gin leads the inputs.

  ul2x.tasks.register_finetune_task("my_qa", source, inputs_key="question",
                                    targets_key="answer")

for any seqio `source` whose examples hold the two texts, then in gin (or
`--gin.prepend_mode_token.mode_token="'[S2S]'"`):

  prepend_mode_token.mode_token = '[S2S]'
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import seqio

from ul2x.tasks import preprocessors, registry
from ul2x.tasks.vocabularies import PARADIGM_TOKENS


def register_finetune_task(name: str, source: seqio.DataSourceInterface, *,
                           inputs_key: str = "inputs", targets_key: str = "targets",
                           text_preprocessors: Sequence[Callable[..., Any]] = (),
                           keep_keys: Sequence[str] = (),
                           mode_token: str | None = None,
                           vocabulary: seqio.Vocabulary | None = None,
                           postprocess_fn: Callable[..., Any] | None = None,
                           metric_fns: Sequence[Callable[..., dict]] = ()) -> seqio.Task:
  """Registers (replacing) a supervised task `name`: text `inputs_key` -> `targets_key`.

  `text_preprocessors` (seqio preprocessors over the source's examples, e.g. T5's GLUE
  formatting in `ul2x.tasks.glue`) run first; the features named in `keep_keys` stay
  beside `inputs` and `targets` for the postprocessor (e.g. an example's index).

  The inputs are led by `mode_token`, or when None by gin's
  `prepend_mode_token.mode_token`; inputs and targets longer than the task feature
  lengths are truncated (EOS kept), as seqio does for supervised tasks. For evaluation,
  `postprocess_fn(text, example=, is_target=)` maps decoded targets and predictions and
  each of `metric_fns(targets, predictions) -> {name: value}` scores them (seqio's API;
  see `ul2x.tasks.metrics`).
  """
  if mode_token is None:
    mode = preprocessors.prepend_mode_token
  elif mode_token in PARADIGM_TOKENS:
    mode = functools.partial(preprocessors.prepend_mode_token, mode_token=mode_token)
  else:
    raise ValueError(f"mode_token {mode_token!r} is not one of {', '.join(PARADIGM_TOKENS)}.")
  return registry.register_task(
      name, source=source, output_features=registry.output_features(vocabulary),
      preprocessors=[
          *text_preprocessors,
          functools.partial(seqio.preprocessors.rekey, key_map={
              "inputs": inputs_key, "targets": targets_key, **{k: k for k in keep_keys}}),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          mode,
          seqio.preprocessors.append_eos_after_trim,
      ],
      postprocess_fn=postprocess_fn, metric_fns=metric_fns)
