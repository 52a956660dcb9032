"""What the benchmark scripts share: a lone rank and the engines they compare (ranks.py), side-by-side timing
(timing.py) and photos in shards (photos.py). The scripts run as `python benchmarks/NAME.py`, which puts
benchmarks/ on the path; what they share with the tests (real gloo ranks, the reference implementations they
time swav_scale against) is the swav_testing package."""
