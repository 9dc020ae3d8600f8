"""The study's checks of the paper's findings (rises then falls, β order, fit quality) and their lines in the report."""

from __future__ import annotations

import math
import numpy as np
from daa_jax.study import intervals as intervals_lib


def checks(rows: list[dict], fits: dict, outcomes: dict | None = None) -> dict[str, dict]:
  """The paper's findings, tested on this sweep's numbers (stated in report.md).

  With per-prompt outcomes (`prompt_outcomes.json`), "rises then falls" is the paired
  split-half test of `intervals_lib.paired_peak_test` (peak chosen on one half of the prompts,
  compared on the other with the SFT policy and with the largest-KL checkpoint, p < 0.05
  each); without them, the best and the largest-KL win rates must differ by more than their
  intervals' half-width. The log form is judged against the best-of-n form d(α − β d) (which
  fits about as well) and the quadratic: `log_beats_bon` is the share of bootstrap replicates
  where its RMSE is lower.
  """
  out: dict[str, dict] = {}
  daa = [r for r in rows if r["objective"] != "sft" and r.get("win_rate") is not None
         and r.get("kl") is not None]
  for objective in sorted({r["objective"] for r in daa}):
    for size in sorted({r["size"] for r in daa if r["objective"] == objective}):
      group = [r for r in daa if r["objective"] == objective and r["size"] == size]
      best = max(group, key=lambda r: r["win_rate"])
      far = max(group, key=lambda r: r["kl"])
      half = max((best["win_rate_hi"] - best["win_rate_lo"]) / 2,
                 (far["win_rate_hi"] - far["win_rate_lo"]) / 2)
      finals = {}
      for r in group:
        if r["beta"] not in finals or r["step"] > finals[r["beta"]]["step"]:
          finals[r["beta"]] = r
      betas = sorted(finals)
      kls = [finals[b]["kl"] for b in betas]
      rank = _spearman(betas, kls) if len(betas) >= 3 else float("nan")
      fit = _fit_of(fits, objective, size, "all")
      log_fit = (fit or {}).get("log") or {}
      quad = (fit or {}).get("quadratic") or {}
      bon = (fit or {}).get("bon") or {}
      boot = (fit or {}).get("bootstrap") or {}
      coef = log_fit.get("coef") or {}
      sft = next((r for r in rows if r["objective"] == "sft" and r["size"] == size), None)
      paired = intervals_lib.paired_peak_test(group, outcomes or {}, sft)
      overlap = bool(best["win_rate"] - far["win_rate"] > half and best["kl"] < far["kl"])
      out[f"{objective}/{size}"] = dict(
          best_win_rate=best["win_rate"], best_sqrt_kl=best["sqrt_kl"], best_step=best["step"],
          best_beta=best["beta"], largest_kl_win_rate=far["win_rate"],
          largest_sqrt_kl=far["sqrt_kl"], interval_half_width=half,
          paired=paired, rises_then_falls_test="paired split-half" if paired else "intervals",
          rises_then_falls=(bool(paired["rises"] and paired["falls"]) if paired else overlap),
          final_kl_by_beta=dict(zip(map(str, betas), kls)), kl_beta_spearman=rank,
          smaller_beta_larger_kl=bool(len(betas) >= 2 and kls[0] > kls[-1] and not rank > 0),
          log_alpha=coef.get("alpha"), log_beta=coef.get("beta"),
          log_alpha_ci=log_fit.get("alpha_ci"), log_beta_ci=log_fit.get("beta_ci"),
          log_rmse=log_fit.get("rmse"), bon_rmse=bon.get("rmse"), quadratic_rmse=quad.get("rmse"),
          log_beats_bon=boot.get("log_beats_bon"),
          log_beats_quadratic=boot.get("log_beats_quadratic"),
          log_fit_ok=bool(coef and coef.get("alpha", 0) > 0 and coef.get("beta", 0) > 0
                          and log_fit.get("rmse", math.inf) < quad.get("rmse", -math.inf)),
          log_beats_bon_95=bool((boot.get("log_beats_bon") or 0) >= 0.95))
  return out


def _fit_of(fits, objective, size, subset):
  for g in fits.get("groups", []):
    if g.get("objective") == objective and str(g.get("size")) == str(size) and (
        g.get("set") == subset) and not g.get("skipped"):
      return g
  return None


def _spearman(x, y) -> float:
  rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
  if np.std(rx) == 0 or np.std(ry) == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def win_rate_against(config) -> str:
  """The report's sentence on what a win rate compares, from the study's judge.

  `config` is the sweep's ConfigDict or its sweep_config.json as a dict (the refit command's).
  """
  j = config["judge"]
  synthetic = config["daa"]["data"]["source"] == "synthetic"
  name = j["name"] if j["name"] != "auto" else ("gold" if synthetic else "llm")
  interval = "ties count half; 95% Wilson intervals"
  if name == "gold":
    return ("Win rate: the share of held-out prompts on which the policy's sample has a higher "
            "gold reward than the task's reference summary for that prompt (the same "
            f"references for every checkpoint; {interval}).")
  if name == "llm":
    return (f"Win rate: the share of held-out prompts on which the LLM judge ({j['model']}, both "
            "presentation orders) prefers the policy's sample to the dataset's reference "
            f"response ({interval}).")
  if name == "reward_model":
    return ("Win rate: the share of held-out prompts on which the reward model "
            f"{j['reward_model']} scores the policy's sample above the dataset's reference "
            f"response ({interval}).")
  return "No judge (config.judge.name='none'): win rates are empty."


def _fmt_ci(ci) -> str:
  return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[—]"


def check_lines(results: dict[str, dict]) -> list[str]:
  lines = ["## Checks of the paper's findings", ""]
  for key, c in results.items():
    p = c.get("paired")
    if p:
      tests = []
      for name, label in (("vs_sft", "vs SFT"), ("vs_largest_kl", "vs the largest-KL checkpoint")):
        t = p.get(name)
        tests.append(f"{label} {t['diff']:+.3f} ± {t['stderr']:.3f}, p = {t['p_value']:.3g}"
                     if t else f"{label}: —")
      rise = (f"peak chosen on half the prompts at √KL {p['peak_sqrt_kl']:.2f}, tested on the "
              f"other {p['num_test_prompts']} (paired): win rate {p['peak_win_rate_test']:.3f}; "
              + "; ".join(tests))
    else:
      rise = (f"vs {c['largest_kl_win_rate']:.3f} at the largest √KL {c['largest_sqrt_kl']:.2f} "
              f"(interval half-width {c['interval_half_width']:.3f}; no per-prompt outcomes "
              "for a paired test)")
    lines.append(
        f"- **{key}**: best win rate {c['best_win_rate']:.3f} at √KL {c['best_sqrt_kl']:.2f} "
        f"(β_DAA={c['best_beta']:g}, step {int(c['best_step'])}); {rise} → rises then falls: "
        f"**{'yes' if c['rises_then_falls'] else 'no'}**. Final KL by β_DAA "
        + ", ".join(f"{b}: {v:.2f}" for b, v in c["final_kl_by_beta"].items())
        + f" → smaller β_DAA, larger KL: **{'yes' if c['smaller_beta_larger_kl'] else 'no'}**. "
        + ("Log-form fit (all checkpoints) α={:.3f} {}, β={:.3f} {}, RMSE {:.4f} vs best-of-n "
           "{:.4f} and quadratic {:.4f}; log form lower than best-of-n in {} of bootstrap "
           "replicates → log form preferred over quadratic: **{}**, over best-of-n at 95%: "
           "**{}**.".format(c["log_alpha"], _fmt_ci(c["log_alpha_ci"]), c["log_beta"],
                            _fmt_ci(c["log_beta_ci"]), c["log_rmse"], c["bon_rmse"],
                            c["quadratic_rmse"],
                            "—" if c["log_beats_bon"] is None else f"{c['log_beats_bon']:.0%}",
                            "yes" if c["log_fit_ok"] else "no",
                            "yes" if c["log_beats_bon_95"] else "no")
           if c["log_alpha"] is not None else "Log-form fit: skipped (too few points)."))
  return lines + [""]
