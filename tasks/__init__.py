"""ul2x.tasks: seqio tasks over the embedded corpus, UL2 mixtures, and the trainer's batches.

Importing this package registers `ul2x_span_corruption`, `ul2x_prefix_lm`, the causal
LM `ul2x_lm`, the synthetic seq2seq task `ul2x_reverse` and the UL2 mixture `ul2x_ul2`
with its seven member tasks, and GLUE and SuperGLUE in T5's text-to-text form
(`glue_<name>`, `super_glue_<name>` and the mixtures `glue` and `super_glue` of
`ul2x.tasks.glue`, read from the TFDS data directory only when a job reads them), each
idempotently, and hides GPUs from TensorFlow. Register your own corpus with
`register_ul2_mixture` (docs/ul2.md). Examples and batches for decoding and scoring are
in `ul2x.tasks.inference`.
"""

from ul2x.tasks.pipeline import feature_lengths_for, get_dataset  # first: hides GPUs from TF
from ul2x.tasks.default_tasks import TASK_NAMES, UL2_MIXTURE_NAME, register_tasks
from ul2x.tasks.ul2 import register_ul2_mixture, ul2_mixing_rates
from ul2x.tasks.finetune import register_finetune_task
from ul2x.tasks.glue import register_glue_tasks

register_tasks()
register_glue_tasks()
