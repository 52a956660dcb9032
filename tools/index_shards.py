#!/usr/bin/env python3
"""Write manifest.json for WebDataset shards made by other tools: see `python tools/index_shards.py --help`."""

import sys

from swav_scale.shards.index import main

if __name__ == "__main__":
    sys.exit(main())
