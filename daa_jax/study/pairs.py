"""The sweep's policy pairs: two SFT samples per prompt, labeled by their token ids, on disk.

`daa_jax.study.sweep.policy_pairs` samples; `write_pairs` labels and writes. The labeler scores
the sampled ids (`SyntheticTask.label_pairs(ids_a=..., ids_b=...)`), as the evaluation's judge
does: an id that is no byte (258+ of a padded vocabulary) costs one off-key penalty, where its
decoded text shows U+FFFD. Each row keeps its ids beside its text (chosen_ids, rejected_ids),
so the file stays a generic pairs JSONL (prompt, chosen, rejected) that the readers take.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np


def write_pairs(task, path: str, prompts: Sequence[str], texts, eos, ids, seed,
                limit: int) -> dict:
  """Labels the pairs whose two samples both ended with EOS and writes them as JSONL.

  Args:
    task: the `SyntheticTask` whose labeler scores them.
    path: the .jsonl file written.
    prompts: [N] prompts.
    texts: (a, b): [N] decoded samples each, EOS not included.
    eos: (a, b): [N] whether each sample ended with EOS.
    ids: (a, b): [N] sampled ids each (lists of int, EOS not included).
    seed: of the label draws.
    limit: most rows written.

  Returns:
    The file's statistics: pairs, drawn, kept, empty_responses, label_agrees_with_gold,
    gold_ties.
  """
  (a, b), (ea, eb), (ia, ib) = texts, eos, ids
  keep = [i for i in range(len(prompts)) if ea[i] and eb[i]]
  labeled = task.label_pairs([prompts[i] for i in keep], [a[i] for i in keep],
                             [b[i] for i in keep], seed=seed,
                             ids_a=[ia[i] for i in keep], ids_b=[ib[i] for i in keep])
  rows = [dict(zip(labeled, values)) for values in zip(*labeled.values())][:limit]
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps({k: (float(v) if isinstance(v, (np.floating, float)) else v)
                          for k, v in row.items()}) + "\n")
  gaps = np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows])
  return dict(pairs=len(rows), drawn=len(prompts), kept=len(keep),
              empty_responses=sum(not r[k].strip() for r in rows for k in ("chosen", "rejected")),
              label_agrees_with_gold=float(np.mean(gaps > 0)) if rows else None,
              gold_ties=float(np.mean(gaps == 0)) if rows else None)
