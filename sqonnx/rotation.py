"""Rotation math for `passes/rotate.py`, in numpy and nothing else (no graph code here).

An orthogonal Q (Q Q^T = I) rotates the residual stream x into x Q. Linear layers that read the stream
(through a norm whose weight w has been folded into them) take W' = Q^T diag(w) W, layers that write
into it take W' = W Q (and b' = b Q), so every product is unchanged: (x Q)(Q^T W) = x W. All products
are taken in float64 and rounded once to the weight's dtype.

Q is a randomized Hadamard matrix H diag(±1) / sqrt(n) (QuaRot) when n is a power of two: every entry
has the same magnitude, so one large channel is spread evenly over all n. Otherwise (SmolLM2: 576 =
2^6 x 9) it is a random orthogonal matrix, the Q of a QR factorization of a Gaussian matrix with the
signs of R's diagonal moved into Q, which makes it Haar-distributed and unique for the seed.
"""

from __future__ import annotations

import numpy as np


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order n (a power of two), entries ±1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def orthogonal(n: int, seed: int) -> tuple[np.ndarray, str]:
    """A deterministic n x n orthogonal matrix (float64) for `seed`, and what kind it is."""
    rng = np.random.default_rng(seed)
    if n & (n - 1) == 0:
        signs = rng.choice(np.array([-1.0, 1.0]), size=n)
        return hadamard(n) * signs[None, :] / np.sqrt(n), "randomized Hadamard"
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :], "random orthogonal"


def rotate_rows(weight: np.ndarray, in_axis: int, q: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Q^T diag(scale) W along the input axis of a 2-D weight ([in, out] when in_axis is 0)."""
    w = np.asarray(weight, np.float64)
    if in_axis:
        w = w.T
    if scale is not None:
        w = np.asarray(scale, np.float64)[:, None] * w
    out = q.T @ w
    return (out.T if in_axis else out).astype(weight.dtype)


def rotate_columns(weight: np.ndarray, out_axis: int, q: np.ndarray) -> np.ndarray:
    """W Q along the output axis of a 2-D weight ([out, in] when out_axis is 0), or b Q for a bias
    (out_axis -1; any leading axes of size 1)."""
    w = np.asarray(weight, np.float64)
    if out_axis == 0 and w.ndim == 2:
        return (q.T @ w).astype(weight.dtype)  # [out, in] layout: (W^T Q)^T = Q^T W
    return (w @ q).astype(weight.dtype)


def scaled_rotation(scale: np.ndarray, q: np.ndarray) -> np.ndarray:
    """diag(scale) Q: a norm weight followed by the rotation, as one matrix (for norms that write into the
    stream, whose weight has no linear layer to fold into)."""
    return (np.asarray(scale, np.float64)[:, None] * q).astype(np.float32)


def block_diagonal(block: np.ndarray, count: int, size: int | None = None, offset: int = 0) -> np.ndarray:
    """`count` copies of `block` on the diagonal starting at row/column `offset`, identity elsewhere, in a
    size x size matrix (default: just the blocks)."""
    d = block.shape[0]
    size = size if size is not None else offset + count * d
    out = np.eye(size)
    for i in range(count):
        start = offset + i * d
        out[start:start + d, start:start + d] = block
    return out
