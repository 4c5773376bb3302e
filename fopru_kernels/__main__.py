"""python -m fopru_kernels demo | bench [--out DIR] [--quick]"""
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "bench"):
        print(__doc__.strip())
        return 2
    if argv[0] == "demo":
        from .demo import main as run
    else:
        from .bench import main as run
    return run(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
