"""The trainer on 8 logical CPU replicas: it learns, resumes exactly, sums once, and
evaluates every example."""

import dataclasses
import os
import shutil
import tempfile
from unittest import mock

from tests import logical_devices

logical_devices.configure_logical_cpus()

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf
import tf_keras

import allreduce
from input_pipeline import pipeline
from resnet import group_batch_norm
from resnet import resnet_model
from tests import toy_images
from training import progress
from training import sharded_optimizer
from training import specs
from training import trainer as trainer_lib

_IMAGE_SIZE = 16
_NUM_CLASSES = 4
_GLOBAL_BATCH = 16
_NUM_EXAMPLES = 64
# Not a multiple of the global batch: the third and last evaluation step holds 13 real
# examples and 3 of padding (on 8 replicas: one batch half padding, one all padding).
_NUM_EVAL_EXAMPLES = 45
_WHOLE_BATCHES_EVAL_EXAMPLES = _NUM_EVAL_EXAMPLES // _GLOBAL_BATCH * _GLOBAL_BATCH


def _toy_eval_examples():
  """Other quadrant images, with the labels past the last whole batch shifted by one.

  The model learns quadrants, so the shifted examples are mostly misclassified: an
  evaluation that left out the partial batch would score far higher.
  """
  images, labels = toy_images.quadrant_images(_NUM_EVAL_EXAMPLES, _IMAGE_SIZE,
                                              _NUM_CLASSES, seed=1)
  tail = slice(_WHOLE_BATCHES_EVAL_EXAMPLES, None)
  labels[tail] = (labels[tail] + 1) % _NUM_CLASSES
  return images, labels


def _toy_data_source():
  images, labels = toy_images.quadrant_images(_NUM_EXAMPLES, _IMAGE_SIZE,
                                              _NUM_CLASSES)
  eval_images, eval_labels = _toy_eval_examples()

  def make_train_dataset(input_context, start_step):
    per_replica = input_context.get_per_replica_batch_size(_GLOBAL_BATCH)
    examples_done = start_step * _GLOBAL_BATCH // input_context.num_input_pipelines
    return (tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
            .skip(examples_done).batch(per_replica, drop_remainder=True))

  def eval_steps(input_context):
    del input_context  # One input pipeline (MirroredStrategy).
    return pipeline.padded_eval_steps([_NUM_EVAL_EXAMPLES], _GLOBAL_BATCH)

  def make_eval_dataset(input_context):
    return pipeline.batch_with_padding(
        tf.data.Dataset.from_tensor_slices((eval_images, eval_labels)),
        batch_size=input_context.get_per_replica_batch_size(_GLOBAL_BATCH),
        num_batches=eval_steps(input_context) * input_context.num_replicas_in_sync)

  return specs.DataSource(
      make_train_dataset, make_eval_dataset, num_train_examples=_NUM_EXAMPLES,
      num_eval_examples=_NUM_EVAL_EXAMPLES, eval_steps=eval_steps)


def _build_trainer(strategy, model_dir, *, total_steps, aggregator="torus",
                   bn_group_size=2, seed=1, shards=None):
  grid = allreduce.TorusTopology(2, 4)
  sharding = shards and sharded_optimizer.WeightUpdateSharding(
      grid, shards=shards, timeout_seconds=120)
  tf_keras.utils.set_random_seed(seed)
  norm_layer = group_batch_norm.make_batch_norm_factory(bn_group_size, grid=grid)
  if aggregator == "torus":
    aggregator = allreduce.make_torus_aggregator(grid, backend=strategy,
                                                 timeout_seconds=120)

  def build_backbone():
    return resnet_model.build_resnet_for_depth(
        10, num_classes=_NUM_CLASSES, image_size=_IMAGE_SIZE, width=8,
        norm_layer=norm_layer)

  return trainer_lib.Trainer(
      strategy=strategy, model_dir=model_dir, build_backbone=build_backbone,
      data=_toy_data_source(),
      recipe=specs.Recipe(num_classes=_NUM_CLASSES, learning_rate=0.05,
                                momentum=0.9, weight_decay=1e-4),
      cadence=specs.Cadence(total_steps=total_steps,
                                  global_batch_size=_GLOBAL_BATCH,
                                  eval_batch_size=_GLOBAL_BATCH, log_every_steps=2,
                                  checkpoint_every_steps=2),
      gradient_aggregator=aggregator, weight_update_sharding=sharding)


def _interrupt_at_step_3(callback, batch, logs=None):
  del batch, logs
  if int(callback.model.optimizer.iterations.numpy()) == 3:
    raise KeyboardInterrupt


def _weights(trainer):
  return [v.numpy() for v in trainer.model.backbone.weights]


def _log_softmax(logits):
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class TrainerTest(tf.test.TestCase):
  """Each trainer costs a trace of an 8-replica step, so the runs that several tests
  compare are made once: an uninterrupted torus run, the same with the strategy's
  all-reduce, and a run interrupted after 4 of 6 steps and resumed."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    strategy = logical_devices.cpu_mirrored_strategy(8)
    cls.root = tempfile.mkdtemp()
    cls.torus = _build_trainer(strategy, os.path.join(cls.root, "torus"),
                               total_steps=6)
    cls.initial_weights = _weights(cls.torus)
    cls.torus_history = cls.torus.train()
    cls.builtin = _build_trainer(strategy, os.path.join(cls.root, "builtin"),
                                 total_steps=6, aggregator=None)
    cls.builtin.train()
    # Interrupted (as by Ctrl-C or SIGTERM) after step 3, off the 2-step loop grid.
    cls.interrupted_dir = os.path.join(cls.root, "interrupted")
    cls.interrupted = _build_trainer(strategy, cls.interrupted_dir, total_steps=6)
    with mock.patch.object(progress.LoopCallback, "on_train_batch_end",
                           _interrupt_at_step_3, create=True):
      try:
        cls.interrupted.train()
        cls.interruption = None
      except KeyboardInterrupt as e:
        cls.interruption = e
    # The step-3 checkpoint, resumed below by the sharded update.
    cls.sharded_dir = os.path.join(cls.root, "sharded")
    shutil.copytree(cls.interrupted_dir, cls.sharded_dir)
    # A new process would build everything again; so does this, with another seed so
    # that only the checkpoint can make the weights agree.
    cls.resumed = _build_trainer(strategy, cls.interrupted_dir, total_steps=6, seed=99)
    cls.resumed_history = cls.resumed.train()
    cls.sharded = _build_trainer(strategy, cls.sharded_dir, total_steps=6, seed=98,
                                 shards="xy")
    cls.sharded.train()
    cls.strategy = strategy

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_training_lowers_the_loss(self):
    self.assertEqual(self.torus.step, 6)
    self.assertEqual([loop["step"] for loop in self.torus_history], [2, 4, 6])
    losses = [loop["loss"] for loop in self.torus_history]
    self.assertLess(losses[-1], 0.8 * losses[0])

  def test_interruption_saves_the_last_step(self):
    self.assertIsInstance(self.interruption, KeyboardInterrupt)
    self.assertEqual(self.interrupted.step, 3)
    state = tf.train.get_checkpoint_state(
        os.path.join(self.interrupted_dir, "checkpoints"))
    self.assertIn(os.path.join(self.interrupted_dir, "checkpoints", "ckpt-3"),
                  state.all_model_checkpoint_paths)

  def test_resume_matches_an_uninterrupted_run(self):
    # Resumed at 3: one short loop back onto the grid, then whole loops.
    self.assertEqual([loop["step"] for loop in self.resumed_history], [4, 6])
    self.assertEqual(self.resumed.step, 6)
    # Equal up to float rounding (two uninterrupted runs agree bit for bit): the grouped
    # batch norm sums its moments about the moving mean, for precision, and a
    # checkpoint holds the replicas' mean of the moving statistics rather than each
    # group's own, so the resumed moments round differently (~1e-6 per step; with the
    # gradient packs filled from the last layer, up to 1.2e-5 in a weight after 6
    # steps). A wrong data position or lost optimizer state differs by orders of
    # magnitude more.
    for expected, actual in zip(_weights(self.torus), _weights(self.resumed)):
      self.assertAllClose(expected, actual, rtol=1e-4, atol=3e-5)
    state = tf.train.get_checkpoint_state(
        os.path.join(self.interrupted_dir, "checkpoints"))
    self.assertEqual(os.path.basename(state.model_checkpoint_path), "ckpt-6")

  def test_sharded_update_resumes_an_unsharded_run_and_matches_it(self):
    # Steps 4-6 with each replica updating 1/8 of the weights, from the unsharded
    # run's step-3 checkpoint: the same weights as the unsharded run's.
    self.assertEqual(self.sharded.step, 6)
    for expected, actual in zip(_weights(self.torus), _weights(self.sharded)):
      self.assertAllClose(expected, actual, rtol=1e-4, atol=3e-5)  # as above
    # Its own checkpoint is in the unsharded layout: the unsharded trainer reads it,
    # every variable matched (the restore checks that), momentum included.
    again = _build_trainer(self.strategy, self.sharded_dir, total_steps=6, seed=5)
    self.assertEqual(again.restore(), 6)
    for variable in self.torus.model.trainable_variables[:3]:
      momentum = self.torus.optimizer.get_slot(variable, "momentum")
      restored = again.optimizer.get_slot(
          again.model.trainable_variables[
              [v.name for v in again.model.trainable_variables].index(variable.name)],
          "momentum")
      self.assertAllClose(momentum.numpy(), restored.numpy(), rtol=1e-4, atol=1e-5)

  def test_finished_run_is_not_trained_again(self):
    again = _build_trainer(self.strategy, self.interrupted_dir, total_steps=6, seed=5)
    self.assertEqual(again.train(), [])
    self.assertEqual(again.step, 6)
    # Batch-norm moving statistics are per replica (ON_READ): a checkpoint holds their
    # mean, which reads back to within rounding.
    for expected, actual in zip(_weights(self.resumed), _weights(again)):
      self.assertAllClose(expected, actual, rtol=1e-6, atol=1e-7)

  def test_evaluation_scores_every_example_once(self):
    # 45 examples in 3 steps of 16 over 8 replicas, the last step partly padding.
    self.assertEqual(self.torus.eval_steps, 3)
    results = self.torus.evaluate()
    # The reference: the same model (batch-norm statistics averaged by `evaluate`) on
    # all 45 examples at once, outside the strategy, in NumPy.
    images, labels = _toy_eval_examples()
    logits = self.torus.model.backbone(images, training=False).numpy().astype(np.float64)
    correct = logits.argmax(axis=1) == labels
    losses = -_log_softmax(logits)[np.arange(len(labels)), labels]
    self.assertEqual(results["images"], _NUM_EVAL_EXAMPLES)
    self.assertAllClose(results["top1"], correct.mean(), rtol=0, atol=1e-6)
    self.assertAllClose(results["loss"], losses.mean(), rtol=1e-4, atol=0)
    # Not vacuous: the whole batches alone (what dropping the partial one scored)
    # give another top-1 and loss.
    whole = slice(0, _WHOLE_BATCHES_EVAL_EXAMPLES)
    self.assertGreater(abs(correct[whole].mean() - correct.mean()), 0.1)
    self.assertGreater(abs(losses[whole].mean() - losses.mean()), 0.1)

  def test_evaluation_warns_when_it_scores_fewer_images_than_expected(self):
    # As when dataset_info.json undercounts the shards: the padded stream holds 45
    # real examples, the data source promised 46.
    original = self.torus.data
    self.torus.data = dataclasses.replace(original,
                                          num_eval_examples=_NUM_EVAL_EXAMPLES + 1)
    try:
      with self.assertLogs("absl", level="WARNING") as logs:
        results = self.torus.evaluate()
    finally:
      self.torus.data = original
    self.assertEqual(results["images"], _NUM_EVAL_EXAMPLES)
    self.assertIn("Evaluated 45 images, but the evaluation set has 46",
                  "\n".join(logs.output))

  def test_torus_and_strategy_allreduce_reach_the_same_weights(self):
    # The two sum in different orders, and six steps through batch norm amplify the
    # rounding to a few 1e-5 on some CPUs; a wrong sum moves weights by ~1e-2.
    for expected, actual in zip(_weights(self.builtin), _weights(self.torus)):
      self.assertAllClose(expected, actual, rtol=1e-3, atol=1e-4)
    # Training really moved the weights, so the agreement above is not vacuous (a
    # doubled sum would have moved them differently).
    moved = [np.abs(a - b).max()
             for a, b in zip(self.initial_weights, _weights(self.torus))]
    self.assertGreater(max(moved), 1e-3)


if __name__ == "__main__":
  tf.test.main()
