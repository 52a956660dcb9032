"""ImageNet-sized JPEGs in shards (benchlib/photos.py), made ahead of the benchmarks that read them.

    .venv/bin/python benchmarks/photo_shards.py --work DIR --photos 12800 [--long-side 500]   # -> DIR/shards
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchlib.photos import photo_shards



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the shards go to WORK/shards")
    p.add_argument("--photos", type=int, required=True)
    p.add_argument("--long-side", type=int, default=500, help="the photos' longest side, px (default 500)")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"shards: {photo_shards(a.work, a.photos, a.long_side)}")


if __name__ == "__main__":
    main()
