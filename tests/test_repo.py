"""The repository stands alone: no code, config, test or doc cites design notes that are not in it."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = re.compile(r"\b(DESIGN|PAPER|STYLE|SYNTHETIC)\.md\b|STYLE's|shared/(DESIGN|PAPER)")


def test_no_citations_of_notes_outside_the_repository():
  hits = []
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
               and not d.endswith(".egg-info")]
    for name in files:
      if name.endswith((".py", ".md", ".sh", ".sbatch", ".toml", ".cfg")):
        path = os.path.join(root, name)
        with open(path, encoding="utf-8") as f:
          for number, line in enumerate(f, 1):
            if OUTSIDE.search(line) and path != os.path.abspath(__file__):
              hits.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
  assert not hits, "\n".join(hits)
