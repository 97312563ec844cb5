"""ul2x.tasks: seqio tasks over the embedded corpus, and the trainer's batches.

Importing this package registers `ul2x_span_corruption` and `ul2x_prefix_lm`
(idempotent) and hides GPUs from TensorFlow.
"""

from ul2x.tasks.pipeline import feature_lengths_for, get_dataset  # first: hides GPUs from TF
from ul2x.tasks.registry import TASK_NAMES, register_tasks

register_tasks()
