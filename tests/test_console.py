"""swav_scale's console written to a file or pipe, as in a SLURM log: one line per message, tables unwrapped."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
from rich.table import Table
from swav_scale.utils import console, rule
console.print("[yellow]warning:[/] " + " ".join(f"word{i}" for i in range(60)) + " END", highlight=False)
table = Table("checkpoint", "files", "note")
table.add_row("/a/very/long/path/" + "x" * 90 + "/step-00000100", "12", "a note of " + "many " * 20 + "words")
console.print(table)
rule("SwAV pretraining")
"""


def test_messages_and_tables_keep_one_line_each_in_a_log_file() -> None:
    """Through a pipe, with COLUMNS=40 set as a narrow terminal would: the 400-column message is one line, the
    table's row one line, and a rule stays short (rich would wrap all three at 80 or $COLUMNS columns)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "40"}).stdout
    lines = out.splitlines()
    message = [line for line in lines if line.startswith("warning:")]
    assert len(message) == 1 and message[0].endswith("word59 END"), out
    row = [line for line in lines if "step-00000100" in line]
    assert len(row) == 1 and "a note of many" in row[0] and row[0].rstrip().endswith("words │"), out
    ruled = [line for line in lines if "SwAV pretraining" in line]
    assert len(ruled) == 1 and len(ruled[0]) <= 100, out
