"""Kernels for the negative controls of tests/test_triton_compile.py: one that fits a GPU at one
size and exceeds its shared memory at another, one that Triton refuses to compile, one never
launched, and two device helpers that the kernel discovery must not count as kernels (one called,
one passed to tl.associative_scan as its combine function). Nothing here
ever runs; the compile check compiles them for sm_90."""
import triton
import triton.language as tl


@triton.jit
def _row_major(BLOCK: tl.constexpr):
    """Offsets of a row-major BLOCK x BLOCK tile (a helper: called by a kernel, never launched)."""
    i = tl.arange(0, BLOCK)
    return i[:, None] * BLOCK + i[None, :]


@triton.jit
def _transpose_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """out = x^T for one BLOCK x BLOCK tile. The load is contiguous along rows of x^T and the
    store along columns, so Triton converts the layout through shared memory: BLOCK^2 * 4 bytes
    of float32, 64 KiB for 128 (fits sm_90's 227 KiB), 256 KiB for 256 (does not)."""
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i[:, None] + i[None, :] * BLOCK)
    tl.store(out_ptr + _row_major(BLOCK), x)


@triton.jit
def _invalid_dot_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """tl.dot needs K >= 16: BLOCK = 8 fails in Triton's frontend."""
    a = tl.load(x_ptr + _row_major(BLOCK))
    tl.store(out_ptr + _row_major(BLOCK), tl.dot(a, a))


@triton.jit
def _add(a, b):
    """A combine function (a helper: passed to tl.associative_scan, never called by name)."""
    return a + b


@triton.jit
def _never_launched_kernel(x_ptr):
    i = tl.arange(0, 16)
    tl.store(x_ptr + i, tl.associative_scan(tl.load(x_ptr + i), 0, _add))
