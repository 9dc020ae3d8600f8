"""User-facing errors: each names the field, file or line at fault and says what to do.

These are raised for user mistakes (bad config values, malformed data rows, missing or
incompatible checkpoints) before expensive work starts. `main.py` prints them as one
paragraph without a traceback and exits non-zero.
"""


class DaaError(Exception):
  """Base class of daa_jax's user-facing errors."""


class ConfigError(DaaError, ValueError):
  """A config value is invalid; the message names the `config.` field and the fix."""


class DataError(DaaError, ValueError):
  """A data file or row is malformed; the message names the file and line and the fix."""


class CheckpointError(DaaError, ValueError):
  """A checkpoint or weight file is missing or incompatible; the message names the tensor or path."""


class TrainingDiverged(DaaError, FloatingPointError):
  """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


_WARNED: set[str] = set()


def warn_misfit(message: str) -> None:
  """Warns once per process, loudly, where the data and the config disagree.

  For settings that work but probably not as the user meant (most examples truncated, a
  warmup longer than the run, an empty hold-out): the run goes on, and the message says the
  fix. The console shows it as one `daa_jax: warning:` paragraph; a repeat is dropped.
  """
  if message in _WARNED:
    return
  _WARNED.add(message)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.warning("%s", message)
