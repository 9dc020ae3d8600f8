"""A sweep's study files from its summary: fits.json, checks.json, figures/ and report.md.

The sweep (`daa_jax.study.sweep`) writes them when its runs finish, and the refit command
rewrites them the same way from the same inputs, so that a refit of a finished sweep
reproduces it to the last digit:

  python -m daa_jax.scaling SWEEP_DIR [--r0 fit|sft|0.17] [--out DIR]

reads SWEEP_DIR/summary.csv, prompt_outcomes.json (when present) and sweep_config.json (when
present: the sweep's R0, judge and pairs; without it R0 is fitted). No JAX needed or imported.
An existing fits.json or checks.json whose numbers differ from the new ones by more than
`TOLERANCE` is overwritten with one warning line naming the file and the largest difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

from daa_jax.errors import DaaError, DataError
from daa_jax.study import checks as checks_lib
from daa_jax.study import compare as compare_lib
from daa_jax.study import figures as figures_lib
from daa_jax.study import guard_report
from daa_jax.study import fits as fits_lib
from daa_jax.study import intervals as intervals_lib
from daa_jax.study import report as report_lib
from daa_jax.train import metrics as metrics_lib

TOLERANCE = 1e-9  # a rewritten number that moves by more is reported
CONFIG_FILE = "sweep_config.json"


def settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
  """How a sweep's study files are made from its summary, read off the sweep's config.

  One function for the sweep and the refit: the refit reproduces the sweep because both take
  their R0, bootstrap seed, weighting and report sentences from here.

  Args:
    config: the sweep's config (a ConfigDict, or its sweep_config.json as a dict), or None
      for a summary.csv without a sweep (R0 fitted, generic report sentences).

  Returns:
    {'r0', 'seed', 'weighted', 'num_bootstrap', 'pairs_on_policy', 'win_rate_against'}.
  """
  if config is None:
    return dict(r0="fit", seed=0, weighted=True, num_bootstrap=1000, pairs_on_policy=False,
                win_rate_against="")
  has_judge = "judge" in config and "daa" in config
  return dict(r0=config.get("fit_r0", "sft"), seed=int(config.get("fit_seed", 0)),
              weighted=bool(config.get("fit_weighted", True)),
              num_bootstrap=int(config.get("fit_num_bootstrap", 1000)),
              pairs_on_policy=config.get("pairs") == "policy_samples",
              win_rate_against=checks_lib.win_rate_against(config) if has_judge else "")


def load_config(sweep_dir: str) -> dict[str, Any] | None:
  """The sweep's sweep_config.json as a dict, or None when the directory has none."""
  path = os.path.join(sweep_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the sweep writes this file "
                    "when it starts: restore it, or delete it to refit with R0 fitted.") from None


def largest_difference(old: Any, new: Any, path: str = "") -> tuple[float, str]:
  """(the largest |old − new| over the numbers of two JSON trees, where): a value present in
  one tree only, or of another kind (a number against None or text), counts as inf."""
  if isinstance(old, bool) or isinstance(new, bool):
    return (0.0, path) if old == new else (math.inf, path)
  if isinstance(old, (int, float)) and isinstance(new, (int, float)):
    return float(abs(old - new)), path
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    worst = (0.0, path)
    for key in sorted(set(old) | set(new)):
      where = f"{path}.{key}" if path else str(key)
      diff = (largest_difference(old[key], new[key], where) if key in old and key in new
              else (math.inf, where))
      worst = max(worst, diff, key=lambda t: t[0])
    return worst
  if isinstance(old, list) and isinstance(new, list):
    if len(old) != len(new):
      return math.inf, f"{path} (length {len(old)} vs {len(new)})"
    worst = (0.0, path)
    for i, (a, b) in enumerate(zip(old, new)):
      worst = max(worst, largest_difference(a, b, f"{path}[{i}]"), key=lambda t: t[0])
    return worst
  return (0.0, path) if old == new else (math.inf, path)


def write_json(data: Any, path: str) -> str | None:
  """Writes strict JSON to `path`; returns a warning line when it replaced different numbers."""
  data = metrics_lib.jsonable(data)
  warning = None
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        old = json.load(f)
    except json.JSONDecodeError:
      old = None
    diff, where = largest_difference(old, data)
    if diff > TOLERANCE:
      warning = (f"warning: {path} overwritten with different numbers: largest difference "
                 f"{diff:.3g} at {where or 'the top level'}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, allow_nan=False)
  return warning


def write_all(rows, outcomes, out_dir: str, how: Mapping[str, Any],
              warn=None) -> dict[str, Any]:
  """fits.json, checks.json, figures/ and report.md (with its checks section) in `out_dir`.

  Args:
    rows: from `fits_lib.load_summary`. outcomes: from `fits_lib.load_prompt_outcomes`.
    out_dir: where the files go. how: from `settings`.
    warn: called with each overwrite warning line (default: printed to stderr).

  Returns:
    {'fits', 'checks', 'figures', 'report' (its path), 'fits_path', 'warnings'}.
  """
  r0 = how["r0"]
  fits = intervals_lib.fit_all(rows, r0=None if r0 == "fit" else r0, outcomes=outcomes,
                               weighted=how["weighted"], num_bootstrap=how["num_bootstrap"],
                               seed=how["seed"])
  fits["settings"] = {k: how[k] for k in ("r0", "seed", "weighted", "num_bootstrap")}
  results = checks_lib.checks(rows, fits, outcomes)
  fits_path = os.path.join(out_dir, "fits.json")
  warnings = [w for w in (write_json(fits, fits_path),
                          write_json(results, os.path.join(out_dir, "checks.json"))) if w]
  for w in warnings:
    (warn or (lambda line: sys.stderr.write(line + "\n")))(w)
  figures = figures_lib.make_figures(rows, fits, os.path.join(out_dir, "figures"),
                                     pairs_on_policy=how["pairs_on_policy"])
  report = report_lib.write_report(
      rows, fits, figures, os.path.join(out_dir, "report.md"),
      extra_lines=checks_lib.check_lines(results), win_rate_against=how["win_rate_against"],
      pairs_on_policy=how["pairs_on_policy"])
  compared = compare_lib.compare(rows, fits, outcomes)
  extra = []
  if len({e["objective"] for e in compared["objectives"]}) > 1:
    write_json(compared, os.path.join(out_dir, "objectives.json"))
    extra = compare_lib.table_lines(compared)
    if compare_lib.figure(rows, fits, os.path.join(out_dir, "figures", "objectives.png")):
      extra += ["![objectives](figures/objectives.png)", ""]
  guard_lines = extra + guard_report.write(out_dir)
  if guard_lines:
    with open(report, "a", encoding="utf-8") as f:
      f.write("\n" + "\n".join(guard_lines) + "\n")
  return dict(fits=fits, checks=results, figures=figures, report=report, fits_path=fits_path,
              warnings=warnings)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m daa_jax.scaling SWEEP_DIR`: refits a sweep as the sweep itself did."""
  parser = argparse.ArgumentParser(prog="python -m daa_jax.scaling", description=main.__doc__)
  parser.add_argument("sweep_dir", help="directory holding summary.csv")
  parser.add_argument("--r0", default=None,
                      help="win rate at d = 0: 'fit', 'sft' (rows with objective sft) or a "
                           "number such as 0.17; default: the sweep's config.fit_r0 "
                           f"({CONFIG_FILE}), or 'fit' without one")
  parser.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR)")
  args = parser.parse_args(argv)
  try:
    how = settings(load_config(args.sweep_dir))
    if args.r0 is not None:
      r0: Any = args.r0
      if r0 not in ("fit", "sft"):
        try:
          r0 = float(r0)
        except ValueError:
          parser.error(f"--r0={args.r0!r}: use fit, sft or a number")
      how["r0"] = r0
    rows = fits_lib.load_summary(os.path.join(args.sweep_dir, "summary.csv"))
    outcomes = fits_lib.load_prompt_outcomes(
        os.path.join(args.sweep_dir, "prompt_outcomes.json"))
    out = write_all(rows, outcomes, args.out or args.sweep_dir, how)
  except DaaError as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  print(f"wrote {out['fits_path']}, checks.json, {out['report']} and "
        f"{2 * len(out['figures'])} figure files (R0: {how['r0']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
