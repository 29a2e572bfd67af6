"""The Keras model the trainer steps: a backbone, its loss, metrics and train step.

The train step computes each replica's gradients and hands them to the optimizer,
whose `gradient_aggregator` sums them over replicas once (torus or the strategy's own).
Beside it: a moving average of the weights for evaluation, and the watch that notices
a non-finite loss or gradient without a host sync.
"""

import weakref

import tensorflow as tf
import tf_keras

from input_pipeline import preprocessing
from training import weight_decay


class WeightAverage(tf.Module):
  """An exponential moving average of variables, for evaluation.

  Kept rather than Model Garden's ExponentialMovingAverage optimizer, whose average
  starts at zero and whose add-and-subtract swap is not exact in float32
  (tests/recipe_test.py, WeightAverageTest shows both).

  The decay ramps up as min(decay, (1 + t) / (10 + t)) so early averages are not
  dominated by the random initialisation. Every replica holds the same weights, so the
  first replica's update is the one kept.
  """

  def __init__(self, variables, decay):
    super().__init__(name="weight_average")
    self.decay = decay
    self.variables_to_average = list(variables)
    self.num_updates = tf.Variable(0, trainable=False, dtype=tf.int64,
                                   aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.averages = [
        tf.Variable(v.read_value(), trainable=False, name=v.name.split(":")[0] + "_ema",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for v in self.variables_to_average]

  def update(self):
    t = tf.cast(self.num_updates.assign_add(1), tf.float32)
    decay = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))
    for average, variable in zip(self.averages, self.variables_to_average):
      average.assign(decay * average + (1.0 - decay) * tf.cast(variable, average.dtype))

  def swap(self):
    """Exchanges the live weights and their averages (call twice to undo)."""
    for average, variable in zip(self.averages, self.variables_to_average):
      live = tf.identity(variable.read_value())
      variable.assign(average.read_value())
      average.assign(live)


class DivergenceWatch:
  """The first step whose loss or gradients were NaN or infinite on any replica
  (-1: none yet).

  The gradients are watched too because a NaN input can leave the loss finite: some
  ReLU kernels (oneDNN's among them) map NaN to 0, while the gradients still carry it.

  Set on the device inside the train step, read on the host only where the loop
  already waits for the devices (the end of a loop), so watching costs no extra sync.
  A plain holder, not a tracked attribute: it is not part of the checkpoint.
  """

  def __init__(self):
    self.first_nonfinite_step = tf.Variable(
        -1, dtype=tf.int64, trainable=False, name="first_nonfinite_step",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  def note(self, loss, step, gradients=()):
    """In replica context: latches `step` if `loss` or any of this replica's
    `gradients` is not finite on any replica."""
    # Not shared with the sharded update, which counts only under loss scaling (unwatched here).
    finite = tf.reduce_all([tf.math.is_finite(loss)]
                           + [tf.reduce_all(tf.math.is_finite(g)) for g in gradients])
    # One scalar sum makes the verdict the same on every replica (a NaN on one
    # replica reaches the others' weights only through the next step's sum).
    nonfinite = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.int32))
    first = self.first_nonfinite_step
    first.assign(tf.where((first < 0) & (nonfinite > 0), tf.cast(step, tf.int64), first))

  def step(self) -> int:
    return int(self.first_nonfinite_step.numpy())


class TrainingDiverged(Exception):
  """The loss or gradients became NaN or infinite; nothing from that step on was checkpointed."""

  def __init__(self, step, hint):
    super().__init__(f"the loss or its gradients are not finite at step {step}; {hint}. The last "
                     "checkpoint before it is kept")
    self.step = step


class ImageClassifier(tf_keras.Model):
  """A backbone plus the train step: loss, gradients, one explicit aggregation.

  The loss on each replica is its examples' loss divided by the *global* batch, so the
  sum over replicas that the optimizer's gradient aggregator performs is the gradient
  of the global mean; nothing else averages (a doubled sum is the classic bug).

  Evaluation batches may carry per-example weights (padding to full batches has weight
  0); loss, top-1 and top-5 are then weighted means and "images" counts the real ones.
  """

  def __init__(self, backbone, *, global_batch_size, num_classes, label_smoothing=0.0,
               l2_weight_decay=0.0, ema_decay=0.0, **kwargs):
    super().__init__(**kwargs)
    self.backbone = backbone
    self.weight_average = (WeightAverage(backbone.trainable_variables, ema_decay)
                           if ema_decay else None)
    self.global_batch_size = global_batch_size
    self.num_classes = num_classes
    self.label_smoothing = label_smoothing
    self.l2_weight_decay = l2_weight_decay
    self.loss_tracker = tf_keras.metrics.Mean(name="loss")
    self.top1 = tf_keras.metrics.SparseCategoricalAccuracy(name="top1")
    self.top5 = tf_keras.metrics.SparseTopKCategoricalAccuracy(
        k=min(5, num_classes), name="top5")
    self.image_count = tf_keras.metrics.Sum(name="images")
    self.divergence = DivergenceWatch()

  @property
  def metrics(self):
    # Keras takes a loop's logs from these metrics (summed over replicas) only when the
    # step returns exactly their names, so every step, training too, updates all four.
    return [self.loss_tracker, self.top1, self.top5, self.image_count]

  def call(self, images, training=False):
    if images.dtype == tf.uint8:
      # Pixels from the input pipeline (training and evaluation alike): normalised
      # here, on the device, by the function the host would have run.
      images = preprocessing.normalize_image(images)
    return self.backbone(images, training=training)

  def per_example_loss(self, labels, logits):
    """Softmax cross-entropy against labels smoothed towards uniform."""
    targets = tf.one_hot(labels, self.num_classes)
    if self.label_smoothing:
      targets = (targets * (1.0 - self.label_smoothing)
                 + self.label_smoothing / self.num_classes)
    return tf.nn.softmax_cross_entropy_with_logits(targets, tf.cast(logits, tf.float32))

  def _update_metrics(self, labels, logits, per_example_loss, weights=None):
    """Means over examples, weighted if `weights` are given; returns every metric."""
    if weights is None:
      weights = tf.ones_like(per_example_loss)
    self.loss_tracker.update_state(per_example_loss, sample_weight=weights)
    self.top1.update_state(labels, logits, sample_weight=weights)
    self.top5.update_state(labels, logits, sample_weight=weights)
    self.image_count.update_state(tf.reduce_sum(weights))
    return {m.name: m.result() for m in self.metrics}

  def train_step(self, data):
    images, labels = data
    variables = self.trainable_variables
    with tf.GradientTape() as tape:
      logits = self(images, training=True)
      per_example_loss = self.per_example_loss(labels, logits)
      loss = tf.nn.compute_average_loss(
          per_example_loss, global_batch_size=self.global_batch_size)
      if self.l2_weight_decay:
        loss += tf.nn.scale_regularization_loss(
            weight_decay.l2_penalty(variables, self.l2_weight_decay))
      scaled = isinstance(self.optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
      scaled_loss = self.optimizer.get_scaled_loss(loss) if scaled else loss
    gradients = tape.gradient(scaled_loss, variables)
    if scaled:
      gradients = self.optimizer.get_unscaled_gradients(gradients)
    # Under loss scaling an overflowed gradient is expected: the optimizer skips that
    # step and lowers the scale, so only the loss is watched there.
    self.divergence.note(loss, self.optimizer.iterations + 1,
                         gradients=() if scaled else gradients)
    # The optimizer's gradient_aggregator sums over replicas (torus or strategy).
    self.optimizer.apply_gradients(zip(gradients, variables))
    if self.weight_average is not None:
      self.weight_average.update()
    return self._update_metrics(labels, logits, per_example_loss)

  def test_step(self, data):
    images, labels, weights = tf_keras.utils.unpack_x_y_sample_weight(data)
    logits = self(images, training=False)
    return self._update_metrics(labels, logits, self.per_example_loss(labels, logits),
                                weights)


# model -> its traced averaging function (kept off the model, which Keras would track).
_STATISTICS_AVERAGES = weakref.WeakKeyDictionary()


def average_replica_statistics(model):
  """Sets every replica's batch-norm moving statistics to their mean over replicas.

  With grouped batch norm each group keeps its own moving statistics (they are per
  replica, ON_READ variables). Evaluating with them would make a result depend on which
  replica saw which batch, and would differ from a run restored from a checkpoint
  (which stores the mean). Moving averages are linear, so replacing each with the mean
  of all changes nothing in expectation for training that follows.
  """
  statistics = [v for v in model.non_trainable_variables
                 if v.synchronization == tf.VariableSynchronization.ON_READ
                 and v.aggregation == tf.VariableAggregation.MEAN]
  if not statistics:
    return
  # One traced function for all of them: eagerly, each cross-replica read is a
  # reduction of its own (tens of seconds for a ResNet's ~100 statistics).
  average = _STATISTICS_AVERAGES.get(model)
  if average is None:
    def average_all():
      for variable in statistics:
        variable.assign(variable.read_value())
    average = _STATISTICS_AVERAGES[model] = tf.function(average_all)
  average()
