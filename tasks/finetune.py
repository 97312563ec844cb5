"""Fine-tuning tasks with UL2 mode switching: the paradigm token chosen in gin leads the inputs.

  ul2x.tasks.register_finetune_task("my_qa", source, inputs_key="question",
                                    targets_key="answer")

for any seqio `source` whose examples hold the two texts, then in gin (or
`--gin.prepend_mode_token.mode_token="'[S2S]'"`):

  prepend_mode_token.mode_token = '[S2S]'
"""

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

import gin
import seqio
import tensorflow as tf

from ul2x.tasks import preprocessors, ul2
from ul2x.tasks.vocabularies import PARADIGM_TOKENS


@gin.configurable
def prepend_mode_token(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                       mode_token: str | None = None) -> tf.data.Dataset:
  """seqio preprocessor: `mode_token` ('[NLU]', '[NLG]' or '[S2S]') leads `inputs`.

  UL2 mode switching: fine-tune with the paradigm token of the pretraining mode the
  task resembles ([NLU] classification, [NLG] long generation, [S2S] sequence to
  sequence). Chosen in gin when the task's registration left it open.
  """
  if mode_token is None:
    raise ValueError(
        "no mode token chosen for fine-tuning; set it in gin, e.g. "
        f"--gin.prepend_mode_token.mode_token=\"'[NLU]'\" (one of {', '.join(PARADIGM_TOKENS)}).")
  return preprocessors.prepend_paradigm_token(dataset, output_features, mode_token)


def register_finetune_task(name: str, source: seqio.DataSourceInterface, *,
                           inputs_key: str = "inputs", targets_key: str = "targets",
                           mode_token: str | None = None,
                           vocabulary: seqio.Vocabulary | None = None,
                           postprocess_fn: Callable[..., Any] | None = None,
                           metric_fns: Sequence[Callable[..., dict]] = ()) -> seqio.Task:
  """Registers (replacing) a supervised task `name`: text `inputs_key` -> `targets_key`.

  The inputs are led by `mode_token`, or when None by gin's
  `prepend_mode_token.mode_token`; inputs and targets longer than the task feature
  lengths are truncated (EOS kept), as seqio does for supervised tasks. For evaluation,
  `postprocess_fn(text, example=, is_target=)` maps decoded targets and predictions and
  each of `metric_fns(targets, predictions) -> {name: value}` scores them (seqio's API;
  see `ul2x.tasks.metrics`).
  """
  if mode_token is None:
    mode = prepend_mode_token
  elif mode_token in PARADIGM_TOKENS:
    mode = functools.partial(preprocessors.prepend_paradigm_token, paradigm_token=mode_token)
  else:
    raise ValueError(f"mode_token {mode_token!r} is not one of {', '.join(PARADIGM_TOKENS)}.")
  return ul2.register_task(
      name, source=source, output_features=ul2.output_features(vocabulary),
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey,
                            key_map={"inputs": inputs_key, "targets": targets_key}),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          mode,
          seqio.preprocessors.append_eos_after_trim,
      ],
      postprocess_fn=postprocess_fn, metric_fns=metric_fns)
