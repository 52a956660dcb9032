"""What the tests and the benchmarks share, importable from anywhere once the checkout is installed
(`pip install -e '.[dev]'`): real gloo ranks on this machine (ranks.py), the original SwAV's and lightly's
step and Sinkhorn that swav_scale is checked and timed against (references.py), and the pytest plugin that
reports the suite's time against its budgets (budgets.py). swav_scale itself imports nothing from here."""
