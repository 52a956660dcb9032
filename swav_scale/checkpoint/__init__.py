"""Fault-tolerant checkpoints: `step-N/` directories, valid only once complete.

- layout.py: the folder on disk: step directory and rank file names, a checkpoint's meta.json, which
  directories are complete, partial or damaged, the damage check; plain functions, no process group (status,
  evaluation and export list checkpoints with them).
- states.py: the protocols of what is saved (Stateful, Replicas, Reshardable, OwnFiles) and the run's own
  states (TrainProgress, RNGState).
- staging.py: the host copy a background save writes while training goes on.
- manager.py: the Checkpointer: when to save, the collective save, wait, load and prune.

Nothing of the package is imported here (one warning filter is set): a module that only lists checkpoints
imports layout.py alone, without torch's distributed checkpointing.
"""

import warnings

# DCP warns at every save and load outside a process group that it assumes a single process. A run of one
# process, and an evaluation that reads a checkpoint alone, is exactly that: nothing to act on. Only that warning
# is silenced (a filter, not catch_warnings, which is not thread-safe: background saves call DCP from a thread of
# their own).
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized",
                        module=r"torch\.distributed\.checkpoint")
