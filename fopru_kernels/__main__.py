"""python -m fopru_kernels demo

  demo      prune a LLaVA-1.5-shaped batch, show the kept tokens and time every backend

The benchmark reports are not part of the installed package: from a checkout of the repository,
`python -m benchmarks.report --out DIR` (map path) and `python -m benchmarks.serving --out DIR`
(q/k path, ragged batches, LLaVA end to end).
"""
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "demo":
        print(__doc__.strip())
        return 2
    from .demo import main as run

    return run(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
