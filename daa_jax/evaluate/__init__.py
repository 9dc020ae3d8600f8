"""Evaluation of a run's checkpoints: restoring the run (`setup`), KV-cache sampling on the mesh,
KL statistics (`kl`), the prompt set, judges (gold reward on token ids, a reward model, an LLM
over an OpenAI-compatible API), per-checkpoint outputs (`store`) and the job (`loop.run`).

Imports `train`'s lower modules (init, step, packing, checkpoint, heldout, metrics), `models`,
`data` and `errors`; never the training loop (`train.loop`), the study or the command line.
"""
