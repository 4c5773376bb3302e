"""python -m fopru_kernels demo | bench [--out DIR] [--quick] | serving [--out DIR] [--quick]

  demo      prune a LLaVA-1.5-shaped batch, show the kept tokens and time every backend
  bench     the map-path report (report.md, report.json, latency.png)
  serving   the q/k path, ragged batches and LLaVA end to end (serving.md, serving.json)
"""
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "bench", "serving"):
        print(__doc__.strip())
        return 2
    if argv[0] == "demo":
        from .demo import main as run
    elif argv[0] == "bench":
        from .bench import main as run
    else:
        from .bench_serving import main as run
    return run(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
