"""Starting ranks: the job each rank runs (job.py), the supervisor of N ranks on this machine (local.py), SLURM
submission through submitit (submit.py) and what a SLURM job does after a failure or a stop (requeue.py).

The repository's top-level `launch/` folder holds the user-facing scripts that end here.
"""
