"""The base class of the mistakes a user fixes, so that every entry point tells them from bugs the same way.

A `SwavScaleError` is a mistake in the config, the data, the environment or a run's files, raised with a
message that names what is wrong and says what to do: `swav-scale` (cli.py) and each rank (launch/job.py)
print that message alone, and a SLURM job that fails on one is not requeued (launch/requeue.py). Any other
exception is a bug, or a failure the message cannot explain, and keeps its traceback.

Each subclass lives beside the code that raises it (config.ConfigError, data.manifest.ShardError,
distributed.DeviceError, ...); most also derive from the built-in exception they refine (ValueError,
RuntimeError, FileNotFoundError), for callers that catch those. This module imports nothing, so that any
module may import it.
"""


class SwavScaleError(Exception):
    """A mistake the user fixes; the message says what is wrong and what to do."""
