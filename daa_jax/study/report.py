"""report.md of a sweep, from summary.csv rows and their fits (`daa_jax.study.fits`).

The sweep and the refit command (`python -m daa_jax.scaling SWEEP_DIR`) write it through
`daa_jax.study.outputs`, with fits.json, checks.json and the figures.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping, Sequence

import numpy as np

from daa_jax.study.fits import by_group, final_rows, is_reference, run_id

from daa_jax.study import figures as figures_lib
from daa_jax.train import fit as fit_lib


# --- Report ---------------------------------------------------------------------------------


def _checkpoint(row) -> str:
  parts = [f"β={row['beta']:g}" if math.isfinite(row["beta"]) else None,
           f"step {row['step']:g}" if math.isfinite(row["step"]) else None]
  return ", ".join(p for p in parts if p)


def figure_readings(rows, fits) -> dict[str, str]:
  """One line per figure, read off the data: where the win rate peaks, what the fits say."""
  groups = by_group(rows)
  fits_by = {(g["objective"], g["size"], g["set"], g["x"]): g
             for g in fits["groups"] + fits.get("forward_kl_groups", [])}
  out = {}
  parts = []
  for (objective, size), group_rows in groups.items():
    pts = figures_lib.finite(group_rows, "sqrt_kl", "win_rate")
    if not pts:
      continue
    best = max(pts, key=lambda r: r["win_rate"])
    far = max(pts, key=lambda r: r["sqrt_kl"])
    text = (f"{objective.upper()} {size}: best win rate {best['win_rate']:.3f} at √KL "
            f"{best['sqrt_kl']:.2f} ({_checkpoint(best)}); largest-KL checkpoint "
            f"{far['win_rate']:.3f} at √KL {far['sqrt_kl']:.2f}")
    fit = fits_by.get((objective, size, "all", "sqrt_kl"))
    if fit and not fit["skipped"] and fit.get("rmse_ratio") is not None:
      text += f"; log-form RMSE {fit['log']['rmse']:.3f} = {fit['rmse_ratio']:.2f}× quadratic"
    parts.append(text + ".")
  out["frontier"] = " ".join(parts)

  for size in figures_lib.sizes_and_colors(rows)[0]:
    parts = []
    for (objective, s), group_rows in groups.items():
      if s != size:
        continue
      runs: dict = {}
      for r in figures_lib.finite(group_rows, "epoch_fraction", "win_rate"):
        runs.setdefault(run_id(r), []).append(r)
      if not runs:
        continue
      peaks, declined, finals = [], 0, []
      for run in runs.values():
        run = sorted(run, key=lambda r: r["epoch_fraction"])
        beta = run[-1]["beta"]
        top = max(run, key=lambda r: r["win_rate"])
        peaks.append(top["epoch_fraction"])
        declined += bool(math.isfinite(top["win_rate_lo"]) and run[-1] is not top
                         and run[-1]["win_rate"] < top["win_rate_lo"])
        if math.isfinite(run[-1]["kl"]) and math.isfinite(beta):
          finals.append((beta, run[-1]["kl"]))
      text = (f"{objective.upper()}: win rate peaks at median epoch fraction "
              f"{np.median(peaks):.2f}; {declined} of {len(runs)} runs end below their peak's "
              "95% interval")
      finals = sorted(finals, key=lambda t: t[0])
      if len(finals) >= 2:
        text += (f"; final KL {finals[0][1]:.2f} at β={finals[0][0]:g} vs "
                 f"{finals[-1][1]:.2f} at β={finals[-1][0]:g}")
      parts.append(text + ".")
    out["epoch_" + re.sub(r"[^A-Za-z0-9._-]+", "_", size or "all")] = " ".join(parts)

  # Per objective and size: pooling DPO, IPO and SLiC mixes their different KL scales and
  # win-rate curves into one rank correlation that describes none of them.
  parts = []
  for (objective, size), size_rows in groups.items():
    cells = []
    for col, label in (("reward_acc", "reward acc"), ("heldout_loss", "held-out loss")):
      pts = figures_lib.finite(size_rows, col, "win_rate")
      rho = figures_lib.spearman([r[col] for r in pts], [r["win_rate"] for r in pts])
      if pts:
        cells.append(f"ρ({label}, win rate) = {figures_lib._fmt(rho, 2)} (n={len(pts)})")
    if cells:
      parts.append(f"{objective.upper()} {size}: " + ", ".join(cells) + ".")
  out["proxy_metrics"] = (("Spearman ρ per objective and size: " + " ".join(parts)) if parts
                          else "")
  # A held-out accuracy from near-zero margins is a sign of roundoff, not a preference.
  trained = figures_lib.finite([r for r in rows if not is_reference(r)],
                               "heldout_abs_logratio_margin")
  tiny = [r for r in trained if r["heldout_abs_logratio_margin"] < fit_lib.MOVED_LOGRATIO]
  if tiny:
    out["proxy_metrics"] += (
        f" {len(tiny)} of {len(trained)} trained checkpoints have a mean held-out |log-ratio "
        f"margin| under {fit_lib.MOVED_LOGRATIO} nats (heldout_abs_logratio_margin): their "
        "reward accuracies are signs of near-zero margins and mean little.")

  by_size: dict[str, list] = {}
  for (_, size), group_rows in groups.items():
    by_size.setdefault(size, []).extend(group_rows)
  parts = []
  for size, size_rows in by_size.items():
    pts = figures_lib.finite(size_rows, "kl", "length_r2")
    if pts:
      rho = figures_lib.spearman([r["kl"] for r in pts], [r["length_r2"] for r in pts])
      parts.append(f"{size}: mean R² {np.mean([r['length_r2'] for r in pts]):.3f}, "
                   f"ρ(R², KL) = {figures_lib._fmt(rho, 2)}.")
  out["length_r2"] = " ".join(parts)

  parts = []
  for (objective, size), _ in groups.items():
    fwd = fits_by.get((objective, size, "all", "sqrt_forward_kl"))
    rev = fits_by.get((objective, size, "all", "sqrt_kl"))
    if fwd and rev and not fwd["skipped"] and not rev["skipped"]:
      parts.append(f"{objective.upper()} {size}: log-form RMSE {fwd['log']['rmse']:.3f} on "
                   f"√forward KL vs {rev['log']['rmse']:.3f} on √KL.")
  out["forward_kl"] = " ".join(parts)

  final = figures_lib.finite(final_rows([r for r in rows if not is_reference(r)]), "forward_kl",
                  "chosen_logp_drift")
  if final:
    drift = [r["chosen_logp_drift"] for r in final]
    fkl = [r["forward_kl"] for r in final]
    out["likelihood_drift"] = (
        f"Final checkpoints: median chosen log-prob change {np.median(drift):.2f} nats against "
        f"median forward KL {np.median(fkl):.2f} (ρ = {figures_lib._fmt(figures_lib.spearman(fkl, drift), 2)}).")
  return out


# The fitted laws as the report writes them, in the paper's notation R(d) = d(α − β log d) plus
# the offset R0: α and β are the keys alpha and beta of fits.json. The objective's own KL
# coefficient is written β_DAA wherever both could be meant (checkpoint labels say β=…).
_LAWS = {
    "log": "R(d) = R0 + d·(α − β·ln d)",
    "bon": "R(d) = R0 + d·(α − β·d)",
    "quadratic": "R(d) = R0 + c1·d² + c2·d⁴ (d² = KL)",
}
_NOTATION = (
    "Notation: the log form is the paper's law R(d) = d(α − β log d) (Rafailov et al. 2024, "
    "after Gao et al. 2023), with the offset R0 because a win rate at d = 0 is the SFT "
    "policy's, not 0. α and β are the law's coefficients (fits.json: alpha, beta), the same "
    "names in every table, check and figure; the objective's KL coefficient is β_DAA, and a "
    "checkpoint's label β=… means β_DAA.")
_COLUMNS = (
    "Columns: **set** = each run's final checkpoint only, or all its checkpoints; **n** = "
    "checkpoints fitted; **R0** = win rate at d = 0; **α**, **β** = the log-form law's "
    "coefficients; **RMSE** = root-mean-square error of the log-form law (weighted as the "
    "fit); **best-of-n RMSE** "
    f"= that of {_LAWS['bon']} (the best-of-n law's shape, same number of coefficients); "
    f"**quadratic RMSE** = that of {_LAWS['quadratic']}; **RMSE ratio** = log-form RMSE / "
    "quadratic RMSE (< 1: the log form fits better); **d\\*** = exp(α/β − 1), where the "
    "log-form law peaks; **peak win rate** = its value there.")


def _d_star(fit) -> str:
  """d* as text: a number, or the bound when the maximum lies past the sampled √KL."""
  if fit.get("d_star_status") == "beyond_sampled_range":
    return f"beyond the sampled range (> {figures_lib._fmt(fit['d_star_lower_bound'], 2)})"
  return figures_lib._fmt(fit["d_star"], 2)


def _fit_table(groups) -> list[str]:
  if all(g["skipped"] for g in groups):
    reasons = sorted({g["skipped"] for g in groups})
    return [f"No fit: every objective × size was skipped ({'; '.join(reasons)})."]
  lines = ["| objective | size | set | n | R0 | α | β | RMSE | best-of-n RMSE | quadratic RMSE "
           "| RMSE ratio | d\\* | peak win rate | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for g in groups:
    head = f"| {g['objective']} | {g['size']} | {g['set']} | {g['n']} |"
    if g["skipped"]:
      lines.append(head + " — |" * 9 + f" skipped: {g['skipped']} |")
      continue
    log = g["log"]
    note = log["peak_note"] or ("" if log["peak_in_range"] else "d* outside the data")
    if g["r0_source"] != "fitted":
      note = (note + "; " if note else "") + f"R0 from {g['r0_source']}"
    lines.append(
        f"{head} {figures_lib._fmt(log['coef']['r0'])} | {figures_lib._fmt(log['coef']['alpha'])} | "
        f"{figures_lib._fmt(log['coef']['beta'])} | {figures_lib._fmt(log['rmse'], 4)} | {figures_lib._fmt(g['bon']['rmse'], 4)} | "
        f"{figures_lib._fmt(g['quadratic']['rmse'], 4)} | {figures_lib._fmt(g['rmse_ratio'], 2)} | "
        f"{_d_star(log)} | {figures_lib._fmt(log['peak_win_rate'])} | {note} |")
  return lines


# What each figure shows, above the line read off the data.
_CAPTIONS = {
    "frontier": "Win rate against √KL(πθ‖π_ref): a column per objective; top row each run's "
                "final checkpoint, bottom row all checkpoints. Color = model size, marker = the "
                "objective's β, bars = 95% intervals, star = the SFT policy (d = 0), dotted = "
                "the log-form fit.",
    "epoch": "Win rate (95% intervals) and KL over training, a line per β.",
    "proxy_metrics": "Win rate against the proxies a run logs without a judge: implicit-reward "
                     "accuracy and loss on held-out preference pairs; Spearman ρ per objective "
                     "and size on the panels.",
    "length_r2": "R² of a line fitting the implicit reward β·log(πθ/π_ref) of the held-out "
                 "responses on their length, against KL: how much of what a run learned is "
                 "response length.",
    "forward_kl": "As the frontier, on √KL(π_ref‖πθ) (forward KL, from reference samples).",
    "likelihood_drift": "Change of the chosen responses' log-likelihood from the reference, "
                        "against forward KL; dashed: −KL(π_ref‖πθ).",
}
_ON_POLICY = (" Here both responses of every pair are samples of the reference (SFT) policy, so "
              "the mean change over chosen and rejected together estimates "
              "E_{y∼π_ref}[log πθ − log π_ref] = −KL(π_ref‖πθ) exactly: the dashed line is that "
              "identity, not a finding. The chosen half is selected by the labeler, so chosen "
              "points below the line lost more likelihood than a typical reference sample, and "
              "points above it less.")


def _ci(ci, digits: int = 3) -> str:
  return "—" if not ci else f"[{figures_lib._fmt(ci[0], digits)}, {figures_lib._fmt(ci[1], digits)}]"


def _interval_table(groups) -> list[str]:
  """The log-form fits' 95% bootstrap intervals, and how often it beats the best-of-n form."""
  rows = [g for g in groups if not g["skipped"] and g["log"].get("alpha_ci") is not None]
  if not rows:
    return []
  lines = ["", "Log-form 95% bootstrap intervals (resampling "
           f"{rows[0].get('bootstrap', {}).get('method', 'checkpoints')}; fits weighted by "
           "1/σ² of each win rate where every point has an interval):", "",
           "| objective | size | set | weighted | α | β | d* | peak win rate | log RMSE < "
           "best-of-n | log RMSE < quadratic |", "|---|---|---|---|---|---|---|---|---|---|"]
  for g in rows:
    log, boot = g["log"], g.get("bootstrap", {})
    share = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
    lines.append(
        f"| {g['objective']} | {g['size']} | {g['set']} | {'yes' if g.get('weighted') else 'no'} "
        f"| {_ci(log['alpha_ci'])} | {_ci(log['beta_ci'])} | {_ci(log['d_star_ci'], 2)} | "
        f"{_ci(log['peak_win_rate_ci'])} | {share(boot.get('log_beats_bon'))} | "
        f"{share(boot.get('log_beats_quadratic'))} |")
  return lines


TRUNCATION_FLAG = 0.05  # a checkpoint with more samples cut at the budget is flagged


def _measurement_lines(rows) -> list[str]:
  """What the win rates are judged against, and checkpoints whose samples hit the budget."""
  lines = []
  kinds = sorted({r.get("reference") for r in rows if r.get("reference")})
  if kinds:
    names = {"human": "human-written references", "chosen": "the chosen response of each "
             "prompt's first pair (not human references: set config.eval.reference_source)",
             "synthetic": "the synthetic task's reference summaries"}
    lines.append("Win rates are judged against " + "; ".join(names.get(k, k) for k in kinds)
                 + ".")
  cut = [r for r in rows if r.get("truncation_rate", math.nan) > TRUNCATION_FLAG]
  if cut:
    worst = max(cut, key=lambda r: r["truncation_rate"])
    lines.append(f"**Truncated samples**: {len(cut)} checkpoints have more than "
                 f"{TRUNCATION_FLAG:.0%} of their samples cut at the generation budget (worst "
                 f"{worst['truncation_rate']:.0%}: {worst['objective']} {worst['size']} "
                 f"{_checkpoint(worst)}); their KL is a lower bound and the judge saw clipped "
                 "responses. Raise config.eval.max_new_tokens.")
  return ["", *lines] if lines else []


def write_report(rows, fits, figures: Mapping[str, Sequence[str]], out_path: str,
                 extra_lines: Sequence[str] | None = None, win_rate_against: str = "",
                 pairs_on_policy: bool = False) -> str:
  """Writes report.md: the fit tables and each figure with one line read off the data.

  Args:
    rows, fits, figures: as from `load_summary` / `fit_all` / `make_figures`.
    out_path: the report's path.
    extra_lines: markdown appended as is (a section with its own heading).
    win_rate_against: one sentence saying what the win rate compares (the judge and the
      responses it compares against); a generic sentence when empty.
    pairs_on_policy: the preference pairs are samples of the reference policy (the
      likelihood-drift figure then reads as an identity).
  """
  base = os.path.dirname(os.path.abspath(out_path))
  policy_rows = [r for r in rows if not is_reference(r)]
  runs = {run_id(r) for r in policy_rows}
  references = [r for r in rows if is_reference(r)]
  against = win_rate_against or (
      "Win rate: the share of held-out prompts on which the judge prefers the policy's sample "
      "to the reference response (ties count half), with a 95% Wilson interval.")
  lines = [
      "# Over-optimization: win rate against KL", "",
      f"{len(policy_rows)} DAA checkpoints from {len(runs)} runs"
      + (f", plus {len(references)} SFT reference point{'s' * (len(references) != 1)} at KL 0"
         if references else "")
      + f". {against}", "",
      f"d = √KL(πθ‖π_ref). The law {_LAWS['log']} is fitted by least squares per objective × "
      f"size, on each run's final checkpoint and on all checkpoints, next to {_LAWS['bon']} "
      f"and {_LAWS['quadratic']}. R0 (the win rate at d = 0): "
      f"{_R0_TEXT.get(fits.get('r0_mode') or 'fit', fits.get('r0_mode'))}.", "", _NOTATION, "", _COLUMNS, *_measurement_lines(rows),
      "", "## Fits on √KL(πθ‖π_ref)", ""] + _fit_table(fits["groups"])
  lines += _interval_table(fits["groups"])
  if fits.get("forward_kl_groups"):
    lines += ["", "## Fits on √KL(π_ref‖πθ) (forward KL)", ""] + _fit_table(
        fits["forward_kl_groups"])
  readings = figure_readings(rows, fits)
  if figures:
    lines += ["", "## Figures"]
  for name, paths in figures.items():
    png = next((p for p in paths if p.endswith(".png")), paths[0])
    pdf = next((p for p in paths if p.endswith(".pdf")), None)
    caption = _CAPTIONS.get(name.split("_")[0] if name.startswith("epoch_") else name, "")
    if name == "likelihood_drift" and pairs_on_policy:
      caption += _ON_POLICY
    lines += ["", f"### {name}", "", f"![{name}]({os.path.relpath(png, base)})", "", caption]
    if readings.get(name):
      lines += ["", readings[name]]
    if pdf:
      lines += ["", f"[PDF]({os.path.relpath(pdf, base)})"]
  if extra_lines:
    extra = list(extra_lines)
    lines += [""] + ([] if extra and extra[0].startswith("#") else ["## Notes", ""]) + extra
  os.makedirs(base, exist_ok=True)
  with open(out_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return out_path


_R0_TEXT = {"fit": "fitted with the other coefficients",
            "sft": "the SFT policy's own win rate (its evaluation at step 0)"}
