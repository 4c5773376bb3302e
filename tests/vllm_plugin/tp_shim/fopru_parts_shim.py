"""TEMPORARY (remove when significance_qk_parts / significance_from_parts land on main): stand-ins for
the two public ops the plugin's tensor-parallel path calls, built from the released q/k op so the TP
tests run before then. Test-only; the library never imports this."""
import torch

import fopru_kernels


def significance_qk_parts(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob", layout="bhsd",
                          backend="auto"):
    col_score = "cls" if score == "cls" else "received"
    col = fopru_kernels.significance_qk(q, k, col_score, num_prefix, scale, lse, kind, layout, backend)
    if score != "focal":
        return col[:, None]
    if kind != "logit":
        raise NotImplementedError("the temporary shim computes focal row sums for kind='logit' only")
    # Row means of logits are scale * q_i . mean(k): the column means with q and k swapped.
    row = fopru_kernels.significance_qk(k, q, "received", num_prefix, scale, None, kind, layout, backend)
    return torch.stack((col, row), dim=1)


def significance_from_parts(parts, backend="auto"):
    if parts.shape[1] == 1:
        return parts[:, 0].clone()
    col, row = parts[:, 0], parts[:, 1]
    colf, rowf = col.double(), row.double()  # the library's current focal rule (float64 variances)
    m = colf.sum(dim=1, keepdim=True) / col.shape[1]
    use_col = ((colf - m) ** 2).sum(dim=1) > ((rowf - m) ** 2).sum(dim=1)
    return torch.where(use_col[:, None], col, row)


def install() -> None:
    for fn in (significance_qk_parts, significance_from_parts):
        if not hasattr(fopru_kernels, fn.__name__):
            setattr(fopru_kernels, fn.__name__, fn)
