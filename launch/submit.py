"""Submit a pretraining run to SLURM through submitit: `python -m launch.submit CONFIG [key=value ...]`.

The same as `swav-scale submit`; the job's size, partition, time limit and requeue policy are the config's
`slurm.*` keys (swav_scale/config.py: SlurmConfig), e.g. `slurm.nodes=8 slurm.partition=gpu`.
"""

import sys

from swav_scale.cli import main

if __name__ == "__main__":
    main(["submit", *sys.argv[1:]])
