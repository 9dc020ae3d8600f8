"""Accelerator programs: the trainer's and sampler's jitted programs with abstract sharded
arguments (`programs`), AOT lowering and the memory planner for TPU/CUDA (`plan`, `devices`),
and the benchmark with its PyTorch baselines (`bench`, `compare`).

Imports every layer below (study excepted); only the command line imports it.
"""
