"""What a `Trainer` is built from: the data, the recipe and the cadence.

Plain frozen descriptions with no TensorFlow state, so that `training/run.py` can build
them from the config and tests can build them by hand.
"""

import dataclasses
from typing import Callable, Optional, Union

import tensorflow as tf
import tf_keras

# Builds one input pipeline's dataset: (input_context, start_step) -> dataset of
# per-replica batches. start_step > 0 asks for the stream an uninterrupted run would be
# reading at that step.
TrainDatasetFn = Callable[[tf.distribute.InputContext, int], tf.data.Dataset]
# Builds one input pipeline's evaluation dataset: exactly eval_steps(input_context) *
# (replicas per pipeline) per-replica batches of (images, labels) or, padded to full
# batches, (images, labels, weights) with weight 0 for padding.
EvalDatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]
# The number of evaluation steps, the same whichever pipeline's context it is given.
EvalStepsFn = Callable[[tf.distribute.InputContext], int]


@dataclasses.dataclass(frozen=True)
class DataSource:
  """What the trainer needs to know about the data, and nothing about files."""
  make_train_dataset: TrainDatasetFn
  make_eval_dataset: EvalDatasetFn
  num_train_examples: int
  num_eval_examples: int
  eval_steps: EvalStepsFn
  input_options: Optional[tf.distribute.InputOptions] = None

  def train_input(self, start_step):
    """Keras' input for `fit`: every pipeline's training stream from `start_step`."""
    return tf_keras.utils.experimental.DatasetCreator(
        lambda context: self.make_train_dataset(context, start_step),
        input_options=self.input_options)

  def eval_input(self):
    """Keras' input for `evaluate`: every pipeline's padded evaluation pass."""
    return tf_keras.utils.experimental.DatasetCreator(
        self.make_eval_dataset, input_options=self.input_options)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What is trained and how: the optimizer, its schedule and the numerics.

  `learning_rate` is a float or a schedule of the step. `ema_decay` > 0 keeps a moving
  average of the weights for the final evaluation (evaluations during training use the
  live weights). `precision` is "float32", "mixed_bfloat16" or "mixed_float16".
  """
  num_classes: int
  learning_rate: Union[float, Callable]
  optimizer_name: str = "sgd"
  momentum: float = 0.9
  weight_decay: float = 0.0
  label_smoothing: float = 0.0
  ema_decay: float = 0.0
  precision: str = "float32"
  jit_compile: bool = False


@dataclasses.dataclass(frozen=True)
class Cadence:
  """The run's length and rhythm, in steps; batches are global (over all replicas)."""
  total_steps: int
  global_batch_size: int
  eval_batch_size: int
  steps_per_execution: int = 1
  log_every_steps: int = 10
  checkpoint_every_steps: int = 100
  eval_every_steps: Optional[int] = None

  def loop_segments(self, start_step):
    """Splits start_step..total_steps into `fit` calls of equal loops.

    Keras needs one loop length per `fit` call. Loops end on multiples of
    `log_every_steps` (so logs, checkpoints and evaluations land on round steps): a run
    resumed off that grid first runs a short loop up to it, and a total that is not a
    multiple of it ends with a short loop.

    Returns:
      [(steps per loop, number of loops), ...].
    """
    segments, step, loop = [], start_step, self.log_every_steps
    head = min(-step % loop, self.total_steps - step)
    if head:
      segments.append((head, 1))
      step += head
    if (self.total_steps - step) // loop:
      segments.append((loop, (self.total_steps - step) // loop))
      step += segments[-1][1] * loop
    if self.total_steps > step:
      segments.append((self.total_steps - step, 1))
    return segments

  def loops_ending_in_evaluation(self, first_step, segment):
    """The 1-based loops of `segment` (steps per loop, loops) that end on a multiple
    of `eval_every_steps`, but not at the last step: the final evaluation follows."""
    steps_per_loop, num_loops = segment
    if not self.eval_every_steps:
      return []
    ends = [first_step + i * steps_per_loop for i in range(1, num_loops + 1)]
    return [i + 1 for i, end in enumerate(ends)
            if end < self.total_steps and end % self.eval_every_steps == 0]
