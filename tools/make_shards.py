#!/usr/bin/env python3
"""Prepare WebDataset tar shards: see `python tools/make_shards.py --help` and README.md."""

import sys

from rich.markup import escape

from swav_scale.errors import SwavScaleError
from swav_scale.shards.make_shards import main
from swav_scale.utils import console

if __name__ == "__main__":
    try:
        main()
    except SwavScaleError as e:  # a mistake to fix (input, arguments, a missing part): its message, no traceback
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
