"""Studies over many runs: the sweep runner, scaling-law fits (`fits`) and their intervals
(`intervals`), the paper's checks, figures and `report.md`, and the Tree-MDP toy.

Imports `evaluate`, `train`, `models`, `data` and `errors`; never `accel` or the command line.
"""
