"""`bench --compare`: the PyTorch baselines run beside daa_jax's step, reported as ratios."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


DEFAULT_BASELINES = os.path.join(os.path.dirname(REPO), "shared", "bench")


TORCH_SHAPES = {"70m": "pythia-70m", "160m": "pythia-160m", "410m": "pythia-410m"}


def _parse_result(stdout: str) -> dict | None:
  """The last JSON object line of a child's stdout: ours are bare, the PyTorch baselines'
  carry a `RESULT_JSON ` prefix."""
  for line in reversed(stdout.splitlines()):
    line = line.strip().removeprefix("RESULT_JSON ").strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def _run_child(name: str, argv: list[str], timeout_s: int) -> dict:
  """One benchmark subprocess -> {'name', 'step_s', 'tokens_per_s', 'raw'} or an error."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.info("compare: %s: %s", name, " ".join(argv))
  start = time.perf_counter()
  try:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout_s, cwd=REPO, check=False)
  except subprocess.TimeoutExpired:
    return {"name": name, "error": f"timeout after {timeout_s}s"}
  res = _parse_result(proc.stdout)
  if proc.returncode or res is None:
    return {"name": name, "error": f"rc={proc.returncode}: {proc.stderr[-800:]}"}
  if res.get("bench") == "torch_dpo_step":
    run0 = res["runs"][0]
    if "error" in run0:
      return {"name": name, "error": run0["error"]}
    step_s, tps = run0["median_s"], run0["tokens_per_s"]
  else:
    step_s = res.get("step_s_median", res.get("median_s"))
    tps = res["tokens_per_s"]
  return {"name": name, "step_s": step_s, "tokens_per_s": tps,
          "wall_s": time.perf_counter() - start, "raw": res}


def variant_flags(v: str) -> list[str]:
  """The bench flags of a `--variants` item: what[+packing|+two_row][+scan][+<remat policy>]
  [+loraR], e.g. train_cached_ref+scan+dots or train+lora16 (LoRA rank 16)."""
  what, *opts = v.split("+")
  extra = ["--what", what]
  for opt in opts:
    if opt == "packing":
      extra.append("--packing")
    elif opt == "two_row":
      extra.append("--no-packing")
    elif opt == "scan":
      extra.append("--scan_layers")
    elif opt in ("full", "dots", "dots_with_no_batch_dims"):
      extra += ["--remat_policy", opt]
    elif opt.startswith("lora") and opt[4:].isdigit() and int(opt[4:]) > 0:
      extra += ["--lora_rank", opt[4:]]
    else:
      raise ValueError(f"--variants: unknown option {opt!r} in {v!r}; use packing, two_row, "
                       "scan, full, dots, dots_with_no_batch_dims or loraR (LoRA rank R).")
  return extra


def compare(args) -> dict:
  """Alternates daa_jax variants and the baselines for `--rounds` rounds; ratios of medians."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  variants = args.variants.split(",") if args.variants else [args.what]
  base = [sys.executable, "-m", "daa_jax.accel.bench", "--model", args.model,
          "--pairs", str(args.pairs), "--prompt_len", str(args.prompt_len),
          "--response_len", str(args.response_len), "--new_tokens", str(args.new_tokens),
          "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
          "--optimizer", args.optimizer, "--attention_impl", args.attention_impl,
          "--remat_policy", args.remat_policy, "--logps_chunk", str(args.logps_chunk),
          "--baselines_dir", args.baselines_dir, "--pack_multiple", str(args.pack_multiple),
          "--ref_dtype", args.ref_dtype, "--packing" if args.packing else "--no-packing"
          ] + (["--scan_layers"] if args.scan_layers else [])
  children = [(v, base + variant_flags(v)) for v in variants]
  notes = []
  torch_dtype = "bf16" if args.dtype == "bfloat16" else "fp32"
  shape = TORCH_SHAPES.get(args.model.lower().removeprefix("pythia-"))
  sampling = all(v.startswith("sample") for v in variants)
  if args.no_baselines:
    notes.append("baselines skipped: --no_baselines")
  elif shape is None:
    notes.append(f"no PyTorch baseline for model {args.model} (bench_common has "
                 f"{', '.join(TORCH_SHAPES)})")
  elif sampling:
    children.append(("hf_generate", [
        sys.executable, os.path.join(args.baselines_dir, "torch_generate_baseline.py"),
        "--shape", shape, "--batch", str(args.pairs), "--prompt-len", str(args.prompt_len),
        "--new-tokens", str(args.new_tokens), "--warmup", "1", "--runs", str(args.steps),
        "--dtype", torch_dtype]))
  elif any(v.startswith("train") for v in variants):
    dpo = [sys.executable, os.path.join(args.baselines_dir, "torch_dpo_baseline.py"),
           "--shape", shape, "--pairs", str(args.pairs), "--prompt-len", str(args.prompt_len),
           "--completion-len", str(args.response_len), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--dtype", torch_dtype]
    children.append(("torch_plain", dpo + ["--impl", "plain"]))
    probe = subprocess.run([sys.executable, "-c", "import trl, datasets"], capture_output=True,
                           check=False)
    if probe.returncode == 0 and not args.no_trl:
      children.append(("trl", dpo + ["--impl", "trl", "--trl-grad-ckpt", "0"]))
    else:
      notes.append("TRL skipped: " + ("--no_trl" if args.no_trl else
                                      "`import trl, datasets` failed"))
  rounds: list[list[dict]] = []
  for r in range(args.rounds):
    row = []
    # Rotate the order each round so no child always runs first (or after the slowest one).
    order = children[r % len(children):] + children[:r % len(children)]
    for name, argv in order:
      res = _run_child(name, argv, args.timeout_s)
      logging.info("compare: round %d %s: %s", r, name,
                   res.get("error") or f"{res['step_s']:.4f} s/step")
      print(f"round {r} {name}: " + (res.get("error") or
                                     f"{res['step_s']:.4f} s  {res['tokens_per_s']:.1f} tok/s"),
            flush=True)
      row.append(res)
    rounds.append(row)
  summary = {}
  for name, _ in children:
    ok = [c for row in rounds for c in row if c["name"] == name and "error" not in c]
    if ok:
      summary[name] = {"step_s_median": statistics.median(c["step_s"] for c in ok),
                       "tokens_per_s_median": statistics.median(c["tokens_per_s"] for c in ok),
                       "step_s_rounds": [c["step_s"] for c in ok]}
      # Memory of daa_jax children (each its own process): peak (device peak, or max RSS
      # on CPU) and the optimizer state's bytes, e.g. LoRA (train+loraR) against full.
      for key in ("peak_mem_bytes", "opt_state_bytes", "n_trained_params"):
        vals = [c["raw"][key] for c in ok if isinstance(c.get("raw"), dict) and key in c["raw"]]
        if vals:
          summary[name][key + "_median"] = statistics.median(vals)
    else:
      summary[name] = {"error": [c.get("error") for row in rounds for c in row
                                 if c["name"] == name]}
  ratios = {}
  for v in variants[1:]:  # daa_jax variants against the first one (e.g. packing on vs off)
    if "step_s_median" in summary.get(v, {}) and "step_s_median" in summary.get(variants[0], {}):
      ratios[f"{v}/{variants[0]}"] = (summary[variants[0]]["step_s_median"]
                                      / summary[v]["step_s_median"])
  for v in variants:
    for b in ("torch_plain", "trl", "hf_generate"):
      if "step_s_median" in summary.get(v, {}) and "step_s_median" in summary.get(b, {}):
        # Same work per step on both sides: speedup = their step time / ours.
        ratios[f"{v}/{b}"] = summary[b]["step_s_median"] / summary[v]["step_s_median"]
  result = {"bench": "daa_jax_compare", "model": args.model, "pairs": args.pairs,
            "prompt_len": args.prompt_len, "response_len": args.response_len,
            "new_tokens": args.new_tokens, "dtype": args.dtype, "rounds": args.rounds,
            "steps": args.steps, "summary": summary, "speedup": ratios, "notes": notes,
            "runs": [[{k: v for k, v in c.items() if k != "raw"} for c in row]
                     for row in rounds],
            "speedup_definition": "baseline median step time / daa_jax median step time "
                                  "(= pairs/s ratio; medians over rounds of per-run medians)"}
  print("\nspeedup (baseline step time / daa_jax step time, same workload):")
  for k, v in ratios.items():
    print(f"  {k:40s} {v:6.2f}x")
  for n in notes:
    print("  note:", n)
  return result
