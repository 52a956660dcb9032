#!/usr/bin/env python3
"""Prepare WebDataset tar shards: see `python tools/make_shards.py --help` and README.md."""

from swav_scale.shards.make_shards import main

if __name__ == "__main__":
    main()
