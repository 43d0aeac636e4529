"""fastdelta's benchmark suite: pytest-benchmark files (`bench_*.py`), their shared harness and
the report that turns a run's JSON into `results/<device>.{json,md,png}`.

Run it with `bash scripts/bench.sh [--quick]` (or `python -m benchmarks.run`, or
`fastdelta bench`); it is never part of the test run.
"""
