"""`python tests/faults.py FLAGS...`: `python -m daa_jax.main FLAGS...` with faults injected.

The faults come as JSON in the environment variable DAA_TEST_FAULTS and are installed by
wrapping daa_jax functions before the job starts, so the product's loop carries no test
switches. Real signals, sent by the process to itself at a chosen point:

  {"sigterm_at_batch": N}           SIGTERM once the N-th training batch is drawn (1-based)
  {"sigint_at_batch": [N, ...]}     SIGINT (Ctrl-C) once the N-th batch is drawn, once per entry
                                    (a repeated N: a second Ctrl-C right after the first)
  {"sigterm_in_reference_pass": N}  SIGTERM before the N-th batch of the reference log-prob pass
  {"sigkill_after_commit": S}       SIGKILL once step S's checkpoint is committed
  {"sigkill_mid_save": S}           SIGKILL right after step S's asynchronous save starts
  {"process": P}                    only process P injects (default: every process)
"""

import json
import os
import signal
import sys
from daa_jax.data import pipeline as data_pipeline
from daa_jax.train import reference as reference_lib


def _mine(faults) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return faults.get("process") is None or jax.process_index() == int(faults["process"])


def install(faults: dict) -> None:
  from daa_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  if "sigterm_at_batch" in faults:
    drawn = [0]
    next_batch = data_pipeline.Loader.__next__

    def counting_next(self):
      batch = next_batch(self)
      if self.shuffle:  # the training loader (evaluation passes do not shuffle)
        drawn[0] += 1
        if drawn[0] == int(faults["sigterm_at_batch"]) and _mine(faults):
          os.kill(os.getpid(), signal.SIGTERM)
      return batch
    data_pipeline.Loader.__next__ = counting_next

  if "sigint_at_batch" in faults:
    counted = [0]
    draw = data_pipeline.Loader.__next__

    def interrupting_next(self):
      batch = draw(self)
      if self.shuffle:
        counted[0] += 1
        for _ in range(list(faults["sigint_at_batch"]).count(counted[0]) if _mine(faults) else 0):
          os.kill(os.getpid(), signal.SIGINT)
      return batch
    data_pipeline.Loader.__next__ = interrupting_next

  if "sigterm_in_reference_pass" in faults:
    compute = reference_lib.compute_pair_logps

    def interrupted(*args, between_batches=None, **kwargs):
      seen = [0]

      def before_batch():
        seen[0] += 1
        if seen[0] == int(faults["sigterm_in_reference_pass"]) and _mine(faults):
          os.kill(os.getpid(), signal.SIGTERM)
        if between_batches is not None:
          between_batches()
      return compute(*args, between_batches=before_batch, **kwargs)
    reference_lib.compute_pair_logps = interrupted

  for key in ("sigkill_after_commit", "sigkill_mid_save"):
    if key in faults:
      save = ckpt_lib.Checkpointer.save

      def killing_save(self, step, *args, _key=key, _save=save, **kwargs):
        _save(self, step, *args, **kwargs)
        if step == int(faults[_key]) and _mine(faults):
          if _key == "sigkill_after_commit":
            self.wait()
          os.kill(os.getpid(), signal.SIGKILL)
      ckpt_lib.Checkpointer.save = killing_save


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  install(json.loads(os.environ.get("DAA_TEST_FAULTS", "{}")))
  from daa_jax import main  # pylint: disable=g-import-not-at-top
  main._run([sys.argv[0]] + sys.argv[1:])  # pylint: disable=protected-access
