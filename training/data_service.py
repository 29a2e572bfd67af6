"""The training input on tf.data service workers, for hosts whose CPUs cannot keep up.

`--data_service_address` names a dispatcher (see `python -m tools.data_service`). The
training host then sends its per-example pipeline (read, decode, crop, augment) to the
service's workers and keeps only the batching, the label check and the prefetch onto
its devices. Evaluation stays local: it runs rarely, and its padded, exact pass is
simpler to keep right on the host.

Processing mode: "distributed_epoch". The dispatcher hands the epoch's shards to the
workers as they ask, so each example is read once per epoch across all workers and all
training hosts together, and a slow worker just takes fewer shards. "parallel_epochs"
would have every worker make a whole epoch of its own: W workers would give each
example W times per epoch, in W unrelated orders. Neither mode is deterministic: the
order depends on which worker answers first.

Epochs: one service job is one epoch (`StreamOptions.service_epoch`), and `repeat`
after `distribute` starts the next job when the last one runs dry, so epochs do not
overlap. With several hosts the job has a name (`job_name_for`), and each repetition
is a new job under that name: every host's k-th epoch joins the same k-th job, which
gives each example to one host (tests/data_service_test.py checks two hosts over two
epochs, and a resume). A host reads its part of an epoch to the job's end before it
starts the next, so a fast host can run ahead into the next epoch's job while a slow
one finishes the last. Resume: the service's order is not a function of position, so it cannot skip
to a step. A resumed run starts a fresh epoch: the examples of the interrupted epoch
already trained on are seen again, up to one epoch's worth, and the run still stops at
its configured step. The same holds for each new `fit` segment of a run (a short loop
up to the logging grid after a resume, or at the end: see `specs.Cadence`): each makes
a new dataset, hence a new job. A worker that dies takes its unsent examples of that
epoch with it (the service reads each split at most once).
"""

import tensorflow as tf
from absl import logging

PROCESSING_MODE = "distributed_epoch"


def job_name_for(model_dir, start_step, num_input_pipelines):
  """The job the hosts of one run share, or None for a single host's own job.

  With several hosts, one shared job per epoch is what gives each example once per
  epoch across all of them (each host reading a job of its own would repeat it per
  host). Every host knows the model dir and the step it resumed from, and a resume
  gets a new name: a name is never reused while the service lives (a finished job's
  name answers end of input at once). One host needs no name: an anonymous job is
  its own.
  """
  if num_input_pipelines <= 1:
    return None
  return f"torus-resnet:{model_dir}:from-step-{start_step}"


def served_epochs(one_epoch, address, job_name=None):
  """`one_epoch` (a finite dataset) made by the service's workers, epoch after epoch.

  Consumers read first come, first served, with no `consumer_index`/`num_consumers`:
  round-robin reads would keep the hosts in lock step, which synchronous data
  parallelism does not need (each host takes whichever examples are ready).
  """
  return one_epoch.apply(tf.data.experimental.service.distribute(
      processing_mode=PROCESSING_MODE, service=address, job_name=job_name)).repeat()


def warn_not_deterministic(seed):
  """Says that --seed no longer fixes the data order (the caller says it once a run)."""
  logging.warning(
      "--data_service_address: the tf.data service's %s order is "
      "not deterministic, so --seed=%d fixes the initialisation but not the order "
      "of the training examples, and a resumed run restarts its epoch (see "
      "training/data_service.py).", PROCESSING_MODE, seed)
