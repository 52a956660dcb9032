"""Sinkhorn-Knopp cost, side by side in one run: swav_scale's `sinkhorn` against facebookresearch/swav's
`distributed_sinkhorn` and lightly's `sinkhorn` (swav_testing/references.py), on the same scores.

Each case is a batch of B rows (plus a queue of earlier embeddings, as SwAV uses with small batches) against
K prototypes: the scores are cosines of random unit vectors, ε = 0.05, 3 iterations, one process. Prints the
median time of each and the reference's time over swav_scale's (above 1: swav_scale is faster), and the
largest difference between the codes (they solve the same problem).

    .venv/bin/python benchmarks/bench_sinkhorn.py [--cases 256x3000 4096x3000 256+3840x3000 --repeats 20
        --device cuda --json FILE]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from swav_scale.swav import sinkhorn
from swav_testing.references import lightly_sinkhorn, original_sinkhorn

from benchlib.timing import device_name, interleaved_medians, write_json

CASES = ["256x3000", "1024x3000", "4096x3000", "256+3840x3000"]


def parse_case(case: str) -> tuple[int, int, int]:
    """'B[+Q]xK' -> (batch, queue, prototypes)."""
    rows, k = case.split("x")
    batch, _, queue = rows.partition("+")
    return int(batch), int(queue or 0), int(k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=CASES, help="B[+queue]xK, e.g. 256+3840x3000")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/gpu_suite.py reads them)")
    a = parser.parse_args()
    device = torch.device(a.device)
    console = Console(width=150)
    name = device_name(device)
    console.print(f"[bold]Sinkhorn[/]  ε 0.05, 3 iterations, float32; {name}, {torch.get_num_threads()} threads, "
                  f"torch {torch.__version__}, {datetime.date.today()}")
    table = Table()
    for col in ("rows x K", "swav_scale ms", "original ms", "lightly ms", "original / swav_scale",
                "lightly / swav_scale", "max |codes diff|"):
        table.add_column(col, justify="left" if col == "rows x K" else "right")
    g = torch.Generator().manual_seed(0)
    ms_by_case: dict[str, dict[str, float]] = {}
    for case in a.cases:
        batch, queue, k = parse_case(case)
        z = F.normalize(torch.randn(batch + queue, 128, generator=g), dim=1)
        prototypes = F.normalize(torch.randn(k, 128, generator=g), dim=1)
        scores = (z @ prototypes.t()).to(device)
        seconds = interleaved_medians({
            "ours": lambda: sinkhorn(scores),
            # the references divide their input in place: each gets a copy, whose time is then taken off
            "original": lambda: original_sinkhorn(scores.clone()),
            "lightly": lambda: lightly_sinkhorn(scores.clone()),
            "copy": lambda: scores.clone(),
        }, a.repeats, device)
        ms = {name: 1e3 * t for name, t in seconds.items()}
        ours, original, lightly = ms["ours"], ms["original"] - ms["copy"], ms["lightly"] - ms["copy"]
        diff = (sinkhorn(scores) - original_sinkhorn(scores.clone())).abs().max().item()
        label = f"{batch}{f' + {queue} queue' if queue else ''} x {k}"
        ms_by_case[case] = {"swav_scale": ours, "original": original, "lightly": lightly, "max_codes_diff": diff}
        table.add_row(label, f"{ours:.2f}", f"{original:.2f}", f"{lightly:.2f}", f"{original / ours:.2f}x",
                      f"{lightly / ours:.2f}x", f"{diff:.1e}")
    console.print(table)
    write_json(a.json, {"benchmark": "bench_sinkhorn", "device": name, "torch": torch.__version__,
                        "date": str(datetime.date.today()), "ms": ms_by_case})


if __name__ == "__main__":
    main()
