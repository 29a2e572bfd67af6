"""What a run shows and leaves behind: the progress line and TensorBoard scalars of each
loop, the checkpoint cadence, and `summary.json` at the end."""

import os
import time

import tensorflow as tf
import tf_keras
from absl import logging

from input_pipeline import dataset_info
from training import model as model_lib


class LoopCallback(tf_keras.callbacks.Callback):
  """Per loop: progress line, TensorBoard scalars, checkpoint; records evaluations."""

  def __init__(self, cadence, learning_rate, *, summary_writer, save_checkpoint,
               check_finite, preemption):
    super().__init__()
    # The batch hook below must not make Keras copy each step's logs to the host.
    self._supports_tf_logs = True
    self.total_steps = cadence.total_steps
    self.global_batch_size = cadence.global_batch_size
    self.checkpoint_every_steps = cadence.checkpoint_every_steps
    self.learning_rate = learning_rate
    self.summary_writer = summary_writer
    self.save_checkpoint = save_checkpoint
    self.check_finite = check_finite
    self.preemption = preemption
    self.loops = []  # per loop: step, metrics, throughput (see Trainer.train)

  def on_train_batch_end(self, batch, logs=None):
    self.preemption.after_step()

  def _step(self):
    return int(self.model.optimizer.iterations.numpy())

  def on_test_begin(self, logs=None):
    model_lib.average_replica_statistics(self.model)

  def on_epoch_begin(self, epoch, logs=None):
    self._loop_start_time = time.time()
    self._loop_start_step = self._step()

  def on_epoch_end(self, epoch, logs=None):
    logs = {k: float(v) for k, v in (logs or {}).items()}
    step = self._step()
    self.check_finite()
    seconds = max(time.time() - self._loop_start_time, 1e-9)
    steps = step - self._loop_start_step
    images_per_second = steps * self.global_batch_size / seconds
    seconds_per_step = seconds / max(steps, 1)
    learning_rate = float(self.learning_rate(step)) if callable(
        self.learning_rate) else float(self.learning_rate)
    logging.info(
        "step %d/%d  loss %.4f  top1 %.4f  top5 %.4f  lr %.5f  %.1f images/s  "
        "%.3f s/step%s", step, self.total_steps, logs.get("loss", float("nan")),
        logs.get("top1", float("nan")), logs.get("top5", float("nan")), learning_rate,
        images_per_second, seconds_per_step,
        "  | eval top1 %.4f" % logs["val_top1"] if "val_top1" in logs else "")
    with self.summary_writer.as_default(step=step):
      for name in ("loss", "top1", "top5"):
        if name in logs:
          tf.summary.scalar(f"train/{name}", logs[name])
        if "val_" + name in logs:
          tf.summary.scalar(f"eval/{name}", logs["val_" + name])
      tf.summary.scalar("train/learning_rate", learning_rate)
      tf.summary.scalar("train/images_per_second", images_per_second)
    self.summary_writer.flush()
    self.loops.append(dict({k: float(v) for k, v in logs.items()}, step=step,
                           images_per_second=images_per_second,
                           seconds_per_step=seconds_per_step))
    if step % self.checkpoint_every_steps == 0 or step >= self.total_steps:
      self.save_checkpoint(step)


def write_run_summary(model_dir, step, final_results, loops=(), config_dict=None):
  """Writes <model_dir>/summary.json: final and best top-1, every evaluation, config.

  `loops` are `Trainer.train`'s per-loop records; their evaluations and the final one
  are the candidates for best.
  """
  evaluations = [{"step": loop["step"], "top1": loop["val_top1"]}
                 for loop in loops if "val_top1" in loop]
  if final_results:
    evaluations.append({"step": step, "top1": final_results["top1"]})
  best = max(evaluations, key=lambda e: e["top1"]) if evaluations else None
  summary = {
      "step": step,
      "final": final_results,
      "best_top1": best["top1"] if best else None,
      "best_step": best["step"] if best else None,
      "evaluations": evaluations,
      "config": config_dict,
  }
  logging.info("final top1 %s, best top1 %s at step %s",
               final_results.get("top1") if final_results else None,
               summary["best_top1"], summary["best_step"])
  dataset_info.write_json_atomically(os.path.join(model_dir, "summary.json"), summary)
