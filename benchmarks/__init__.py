"""The benchmark harness of fopru_kernels. It is not part of the installed package (which keeps the
ops, the reference, the adapters and the demo); run it from the repository root:

  python -m benchmarks.report --out DIR [--quick]    map-path ops: report.md, report.json, latency.png
  python -m benchmarks.serving --out DIR [--quick]   q/k path, ragged batches, LLaVA end to end:
                                                     serving.md, serving.json
  python -m pytest benchmarks --benchmark-only       the pytest-benchmark suites (`make bench`)

Modules: timing.py (timers, input rotation, copy bandwidth), reporting.py (environment block and
table cells both reports share), baselines.py (the float competitors), prune_cases.py (map-path
shapes and runners), report.py (the map-path report), serving*.py (the serving report, one module
per section).
"""
