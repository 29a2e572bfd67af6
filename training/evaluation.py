"""The evaluation pass: batch-norm statistics averaged, the weight average swapped in,
every evaluation image scored once, the result logged and written to TensorBoard."""

import os

import tensorflow as tf
from absl import logging

from training import model as model_lib


def evaluate(model, eval_input, steps, *, num_eval_examples, step, summary_dir=None):
  """Top-1/top-5 and loss of `model` over `steps` batches of `eval_input`.

  Args:
    model: the `model_lib.ImageClassifier`, compiled.
    eval_input: what `model.evaluate` reads (a `DatasetCreator`).
    steps: batches that cover the evaluation set (padded; see README "Evaluation").
    num_eval_examples: images the set should have; a shortfall is explained in a
      warning.
    step: the training step, for the log line and the TensorBoard scalars.
    summary_dir: where the eval scalars go (None: not written, as on a non-chief).

  Returns:
    {metric: float}, with "images" the number of real (unpadded) images scored.
  """
  model_lib.average_replica_statistics(model)
  average = model.weight_average
  if average is not None:
    average.swap()
  try:
    results = model.evaluate(eval_input, steps=steps, verbose=0, return_dict=True)
  finally:
    if average is not None:
      average.swap()
  results = {k: float(v) for k, v in results.items()}
  logging.info("eval at step %d%s: top1 %.4f  top5 %.4f  loss %.4f  (%d images)",
               step, " (weight average)" if average is not None else "",
               results["top1"], results["top5"], results["loss"], results["images"])
  if int(results["images"]) != num_eval_examples:
    logging.warning(
        "Evaluated %d images, but the evaluation set has %d: undecodable images "
        "(logged above as skipped) are left out; otherwise dataset_info.json next to "
        "the shards is out of date (rewrite it with input_pipeline.write_tfrecords).",
        int(results["images"]), num_eval_examples)
  if summary_dir is not None:
    writer = tf.summary.create_file_writer(summary_dir)
    with writer.as_default(step=step):
      for name, value in results.items():
        tf.summary.scalar(f"eval/{name}", value)
    writer.close()
  return results

