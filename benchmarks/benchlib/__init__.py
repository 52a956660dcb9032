"""What the benchmark scripts share: real gloo ranks (ranks.py), side-by-side timing (timing.py), photos in
shards (photos.py) and the reference implementations they time swav_scale against (references.py). The
scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ on the path."""
