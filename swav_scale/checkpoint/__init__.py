"""Fault-tolerant checkpoints: `step-N/` directories, valid only once complete.

- layout.py: the folder on disk: step directory and rank file names, a checkpoint's meta.json, which
  directories are complete, partial or damaged, the damage check; plain functions, no process group (status,
  evaluation and export list checkpoints with them).
- states.py: the protocols of what is saved (Stateful, Replicas, Reshardable, OwnFiles) and the run's own
  states (TrainProgress, RNGState).
- staging.py: the host copy a background save writes while training goes on.
- manager.py: the Checkpointer: when to save, the collective save, wait, load and prune.

Nothing is imported here: a module that only lists checkpoints imports layout.py alone, without torch's
distributed checkpointing.
"""
