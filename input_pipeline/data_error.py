"""The one error type for bad input data, so callers can catch it apart from bugs."""


class DataError(ValueError):
  """A data directory, file pattern or shard that cannot be used.

  The message names the offending path or pattern and says how to fix it.
  """
