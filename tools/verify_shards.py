#!/usr/bin/env python3
"""Check a shard directory against its manifest: see `python tools/verify_shards.py --help`."""

import sys

from swav_scale.shards.verify import main

if __name__ == "__main__":
    sys.exit(main())
