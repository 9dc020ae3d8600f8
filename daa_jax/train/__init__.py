"""Training: the run's config fields and `validate` (`config`), pair packing, the objectives (pure
jnp), the optimizer, the pure step functions, a run's initialisation (`init`: model config,
mesh, initial params, also used by evaluation and the planner), the reference pass, held-out
metrics, checkpointing (the only orbax user), preemption, metrics writers, and the loop
(`loop.run(config, workdir)`).

Imports `data`, `models` and `errors`; never evaluation, the study or the command line.
"""
