"""The error for a bad command-line value, shared by the trainer and the submitter.

Both main.py and tools/submit_tpu.py report a bad value as one line that names the
flag to fix (`--train_batch_size: global batch 60 does not divide over 8 replicas;
...`), so they raise the same class: `training.config.ConfigError` and
`tools.submit_tpu.SubmitError` are this class under the names their callers use.
"""


class FlagError(ValueError):
  """A bad setting; `flag` names the command-line flag that holds it."""

  def __init__(self, flag: str, message: str):
    super().__init__(f"--{flag}: {message}")
    self.flag = flag
    self.message = message
