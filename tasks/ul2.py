"""The UL2 mixture of denoisers: the seven denoisers, their mixing rates (gin), and
one call that registers a UL2 mixture over any seqio source.

  import seqio
  from ul2x.tasks import ul2
  ul2.register_ul2_mixture("my_ul2", seqio.TextLineDataSource({"train": "/data/*.txt"}))

registers the seven member tasks `my_ul2_r3_15`, ..., `my_ul2_s` and the mixture
`my_ul2`; train on it with `MIXTURE_OR_TASK_NAME = 'my_ul2'`.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools

import gin
import seqio
import tensorflow as tf

from ul2x.tasks import preprocessors
from ul2x.tasks.registry import register_denoising_task


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser: T5 span corruption (mean span length mu, corruption rate r) or,
  with both None, the prefix LM; `paradigm_token` leads its inputs."""
  name: str
  paradigm_token: str
  mean_noise_span_length: float | None = None
  noise_density: float | None = None

  def preprocessor(self) -> Callable[..., tf.data.Dataset]:
    if self.mean_noise_span_length is None:
      return functools.partial(preprocessors.prefix_lm, paradigm_token=self.paradigm_token)
    return functools.partial(preprocessors.span_corruption,
                             mean_noise_span_length=self.mean_noise_span_length,
                             noise_density=self.noise_density,
                             paradigm_token=self.paradigm_token)


# UL2 (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms", arXiv:2205.05131, the
# section "Mixture of Denoisers"): R = regular span corruption, X = extreme, S = sequential
# (prefix LM).
UL2_DENOISERS = (
    Denoiser("r3_15", "[NLU]", 3.0, 0.15),
    Denoiser("r8_15", "[NLU]", 8.0, 0.15),
    Denoiser("x3_50", "[NLG]", 3.0, 0.5),
    Denoiser("x8_50", "[NLG]", 8.0, 0.5),
    Denoiser("x64_15", "[NLG]", 64.0, 0.15),
    Denoiser("x64_50", "[NLG]", 64.0, 0.5),
    Denoiser("s", "[S2S]"),
)
# The S-denoiser takes 20% and the six R/X denoisers share the other 80% equally.
# Source: the UL2 paper (arXiv:2205.05131) reports that keeping S-denoising to a small
# share of the mixture (about 20%) works best, and otherwise mixes its denoisers
# uniformly (the paper's appendix code samples uniformly when no rates are given).
DEFAULT_MIXING_RATES = {d.name: (0.2 if d.name == "s" else 0.8 / 6) for d in UL2_DENOISERS}


@gin.configurable
def ul2_mixing_rates(rates: Mapping[str, float] | None = None) -> dict[str, float]:
  """Denoiser name -> mixing rate for UL2 mixtures registered without explicit rates.

  `rates` overrides some or all of `DEFAULT_MIXING_RATES` (relative weights; seqio
  normalizes them), e.g. in gin: `ul2_mixing_rates.rates = {'s': 0.5}`. Read when a
  dataset is built, so gin bindings apply to mixtures registered at import time.
  """
  merged = dict(DEFAULT_MIXING_RATES)
  for name, rate in dict(rates or {}).items():
    if name not in merged:
      raise ValueError(f"ul2_mixing_rates.rates names an unknown denoiser {name!r}; "
                       f"the denoisers are {', '.join(merged)}.")
    merged[name] = float(rate)
  if any(r < 0 for r in merged.values()) or not sum(merged.values()) > 0:
    raise ValueError(f"ul2_mixing_rates {merged} must be >= 0 with a positive sum; "
                     "fix ul2_mixing_rates.rates.")
  return merged


def register_ul2_mixture(name: str, source: seqio.DataSourceInterface, *, text_key: str = "text",
                         vocabulary: seqio.Vocabulary | None = None,
                         denoisers: Sequence[Denoiser] = UL2_DENOISERS,
                         rates: Mapping[str, float] | None = None,
                         shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE) -> seqio.Mixture:
  """Registers (replacing) a UL2 mixture `name` over `source` and one task per denoiser.

  `source` is any seqio source: `seqio.TfdsDataSource` (local data through
  `--tfds_data_dir`), `seqio.TextLineDataSource` (one document per line),
  `seqio.TFExampleDataSource` (feature `text_key` a tf.string) or
  `seqio.FunctionDataSource`; its examples' text is feature `text_key` (bare
  strings from text files need none). Member tasks are named `{name}_{denoiser.name}`.
  `rates` (denoiser name -> weight) fixes the mixing rates; by default they are read
  from gin's `ul2_mixing_rates` whenever a dataset is built. `vocabulary` defaults to
  the byte vocabulary; see `vocabularies.sentencepiece_vocabulary` for another.
  `shuffle_buffer_size` is the mixture's, split evenly among its tasks (as if it were
  one task, like the UL2 paper's code); raise it for sources that do not shuffle.
  """
  names = [d.name for d in denoisers]
  if rates is not None and set(rates) != set(names):
    raise ValueError(f"rates {dict(rates)} must name exactly the denoisers {', '.join(names)}.")
  unknown = set(names) - set(DEFAULT_MIXING_RATES)
  if rates is None and unknown:
    raise ValueError(f"denoisers {sorted(unknown)} have no default mixing rate; pass rates=.")
  members = []
  for d in denoisers:
    task = register_denoising_task(f"{name}_{d.name}", source, d.preprocessor(),
                                   text_key=text_key, vocabulary=vocabulary,
                                   shuffle_buffer_size=-(-shuffle_buffer_size // len(denoisers)))
    rate = rates[d.name] if rates is not None else (
        lambda _task, key=d.name: ul2_mixing_rates()[key])
    members.append((task, rate))
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, members)
