"""Writes the focal near-tie cases of golden_cases.json (names starting with "focal near-tie").

Run from the repository root: `python tests/data/make_focal_golden.py`. It replaces its own cases
and keeps every other case as it is. Pure Python, no torch and nothing from fopru_kernels: an
independent implementation of SPEC.md for these cases. fx is computed from each value as an exact
Fraction, sums are Python integers, the focal choice compares each vector's population variance
as an exact Fraction (mean of squares minus squared mean), and selection sorts (score desc, index
asc). Every attention value is exactly representable in the case's dtype, so the JSON floats load
back unchanged.

The cases are the ones float64 variances cannot decide: column and row sums that are permutations
of each other (equal sums of squares: row), and sums of squares that differ by 2, the smallest
nonzero gap when both vectors have the same total (x^2 = x mod 2), in both directions. The patch
sums deviate from their mean by ~2^31, so float64 squared deviations (~2^62) round in steps far
above 2.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

PATH = Path(__file__).with_name("golden_cases.json")
PREFIX = "focal near-tie"
SCALE = 2**28


def fx(a: float) -> int:
    if math.isnan(a):
        return 0
    return int(Fraction(min(max(a, -256.0), 256.0)) * SCALE)  # int() truncates toward zero


def variance(v: list[int]) -> Fraction:
    return Fraction(sum(x * x for x in v), len(v)) - Fraction(sum(v), len(v)) ** 2


def top(scores: list[int], count: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:count])


def expected(attn: list, p: int, keep: int, strategy: str, grid: tuple[int, int]):
    """(significance, choice, idx) per image of attn[b][h][i][j] (nested lists)."""
    sigs, choices, idxs = [], [], []
    for image in attn:
        n = len(image[0]) - p
        col = [sum(fx(head[p + i][p + j]) for head in image for i in range(n)) for j in range(n)]
        row = [sum(fx(head[p + i][p + j]) for head in image for j in range(n)) for i in range(n)]
        use_col = variance(col) > variance(row)
        idx, other = (select(v, keep, strategy, grid) for v in ((col, row) if use_col else (row, col)))
        assert idx != other, "the two choices must keep different tokens, or the case tests nothing"
        sigs.append(col if use_col else row)
        choices.append("col" if use_col else "row")
        idxs.append(idx)
    return sigs, choices, idxs


def select(sig: list[int], keep: int, strategy: str, grid: tuple[int, int]) -> list[int]:
    if strategy == "rank":
        return top(sig, keep)
    rows, cols = grid
    kept = top([sum(sig[y * cols:(y + 1) * cols]) for y in range(rows)], keep // cols)
    return [y * cols + x for y in kept for x in range(cols)]


def margins_map(dcol: list[int], drow: list[int], heads: int) -> list:
    """One image (heads >= 3, 1 + N, 1 + N). A matrix E has column sums dcol and row sums drow
    (first row dcol, first column drow, the corner fixing both); head 0 holds E rounded down to a
    multiple of 2^12, head 1 the rest, heads 2.. 128.0 (fx 2^35), each as k / 2^28 with at most 24
    significant bits (exact in float32); the CLS row and column hold 0.5."""
    n = len(dcol)
    assert sum(dcol) == sum(drow)
    e = [[0] * n for _ in range(n)]
    e[0][1:] = dcol[1:]
    for i in range(1, n):
        e[i][0] = drow[i]
    e[0][0] = drow[0] - sum(dcol[1:])
    assert max(abs(x) for r in e for x in r) <= 2**36
    image = []
    for h in range(heads):
        m = [[0.5] * (n + 1) for _ in range(n + 1)]
        for i in range(n):
            for j in range(n):
                high = e[i][j] // 4096 * 4096
                m[1 + i][1 + j] = (high if h == 0 else e[i][j] - high if h == 1 else 2**35) / SCALE
        image.append(m)
    return image


def gap_vectors(gap: int) -> tuple[list[int], list[int]]:
    """(dcol, drow) of about 2^31 with equal totals and sum(dcol^2) - sum(drow^2) = gap (even): drow
    a fixed shuffle of v, dcol = v with one unit moved from v[1] to v[0] (gap 0: dcol = v). Their
    squares are ~2^62: float64 cannot see the gap, even about the mean."""
    v = [(i * 2654435761 + 12345) % 2**32 - 2**31 for i in range(16)]
    dcol = list(v)
    if gap:
        v[0] = v[1] + gap // 2 - 1
        dcol = list(v)
        dcol[0] += 1
        dcol[1] -= 1
    drow = [v[(5 * i + 3) % len(v)] for i in range(len(v))]
    assert sum(x * x for x in dcol) - sum(x * x for x in drow) == gap
    return dcol, drow


def saturated_map() -> list:
    """One image (2 heads, 10, 10), values 1e6 (clamped to 256) except two patch cells of head 0:
    query 0 / key 1 = 0.5 and query 2 / key 3 = 0.25, so columns 1, 3 and rows 0, 2 lose the same
    amounts: column and row sums are permutations of each other."""
    image = [[[1e6] * 10 for _ in range(10)] for _ in range(2)]
    image[0][1 + 0][1 + 1] = 0.5
    image[0][1 + 2][1 + 3] = 0.25
    return image


def case(name, dtype, attn, keep, strategy, grid, p=1) -> dict:
    sig, choice, idx = expected(attn, p, keep, strategy, grid)
    flat = [v for image in attn for head in image for r in head for v in r]
    shape = [len(attn), len(attn[0]), len(attn[0][0]), len(attn[0][0][0])]
    return {
        "name": name, "attn_dtype": dtype, "attn_shape": shape, "attn": flat, "keep": keep,
        "strategy": strategy, "score": "focal", "num_prefix": p, "grid": list(grid),
        "expected_significance": sig, "expected_choice": choice, "expected_idx": idx,
    }


def cases() -> list[dict]:
    g = (4, 4)
    return [
        case(f"{PREFIX}: column sums a permutation of the row sums (equal sum of squares), row wins",
             "float32", [margins_map(*gap_vectors(0), heads=3)], 5, "rank", g),
        case(f"{PREFIX}: sum(col^2) - sum(row^2) = 2, col wins", "float64",
             [margins_map(*gap_vectors(2), heads=4)], 5, "rank", g),
        case(f"{PREFIX}: sum(col^2) - sum(row^2) = -2, row wins, row strategy", "float64",
             [margins_map(*gap_vectors(-2), heads=4)], 8, "row", g),
        case(f"{PREFIX}: two images, gaps 2 and 0", "float32",
             [margins_map(*gap_vectors(2), heads=3), margins_map(*gap_vectors(0), heads=3)], 5, "rank", g),
        case(f"{PREFIX}: saturated map, column and row sums permutations of each other, row wins", "float32",
             [saturated_map()], 7, "rank", (3, 3)),
    ]


ABOUT = (
    "Golden cases for the contract in SPEC.md, computed by an independent implementation. attn is row-major; "
    "null means NaN. expected_choice is 'col'/'row' for focal. The cases named 'focal near-tie: ...' are "
    "written by make_focal_golden.py beside this file (pure Python integers and fractions)."
)


def main() -> None:
    data = json.loads(PATH.read_text())
    data["about"] = ABOUT
    data["cases"] = [c for c in data["cases"] if not c["name"].startswith(PREFIX)] + cases()
    PATH.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
