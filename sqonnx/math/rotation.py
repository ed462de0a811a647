"""Rotation math for `passes/rotate.py`, in numpy and nothing else (no graph code here).

An orthogonal Q (Q Q^T = I) rotates the residual stream x into x Q. Linear layers that read the stream
(through a norm whose weight w has been folded into them) take W' = Q^T diag(w) W, layers that write
into it take W' = W Q (and b' = b Q), so every product is unchanged: (x Q)(Q^T W) = x W. Products are
taken in float64 (float32 for a Hadamard, whose ±1 sums lose nothing there) and rounded once to the weight's
dtype.

Q is a randomized Hadamard matrix H diag(±1) / sqrt(n) (QuaRot) when n is a power of two: every entry
has the same magnitude, so one large channel is spread evenly over all n. Otherwise (SmolLM2: 576 =
2^6 x 9) it is a random orthogonal matrix, the Q of a QR factorization of a Gaussian matrix with the
signs of R's diagonal moved into Q, which makes it Haar-distributed and unique for the seed.

A Hadamard product is never a dense n x n product: Sylvester's H_n is the Kronecker product H_a ⊗ H_b
(n = a b, both powers of two), so H_n M is two small matrix products over a reshaped M, a b (a + b) flops
per column instead of n^2 (Llama-2-7B's 4096: 128 instead of 4096, 32x fewer). R2's block-diagonal
rotation is applied head by head. Weights are processed in column chunks, so a 32000 x 4096 table needs
a few tens of MB of float64 scratch, not 1 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_BYTES = 64 << 20  # float64 scratch per chunk of columns


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order n (a power of two), entries ±1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


class Orthogonal:
    """An n x n orthogonal Q, applied without necessarily forming it."""

    kind: str
    # The precision products are taken in: a Hadamard product sums ±1 multiples (two stages of a few dozen
    # terms), so float32 keeps it within a float32 rounding of the exact result at half the cost.
    work_dtype: type = np.float64

    @property
    def n(self) -> int:
        raise NotImplementedError

    def left_transpose(self, m: np.ndarray) -> np.ndarray:
        """Q^T m for a float64 [n, k] array."""
        raise NotImplementedError

    def right(self, m: np.ndarray) -> np.ndarray:
        """m Q for a float64 [k, n] array: (Q^T m^T)^T."""
        return self.left_transpose(m.T).T

    def matrix(self) -> np.ndarray:
        """Q itself (float64): for small uses (online rotations, tests)."""
        return self.left_transpose(np.eye(self.n)).T

    def left(self, m: np.ndarray) -> np.ndarray:
        """Q m for an [n, k] array (undoing a rotation of rows: judging the rotation)."""
        return self.matrix() @ m

    def right_transpose(self, m: np.ndarray) -> np.ndarray:
        """m Q^T for a [k, n] array."""
        return m @ self.matrix().T


@dataclass(frozen=True)
class Dense(Orthogonal):
    q: np.ndarray
    kind: str = "random orthogonal"

    @property
    def n(self) -> int:
        return int(self.q.shape[0])

    def left_transpose(self, m: np.ndarray) -> np.ndarray:
        return self.q.T @ m

    def right(self, m: np.ndarray) -> np.ndarray:
        return m @ self.q

    def matrix(self) -> np.ndarray:
        return self.q

    def left(self, m: np.ndarray) -> np.ndarray:
        return self.q @ m

    def right_transpose(self, m: np.ndarray) -> np.ndarray:
        return m @ self.q.T


@dataclass(frozen=True)
class RandomizedHadamard(Orthogonal):
    """Q = H diag(signs) / sqrt(n)."""

    signs: np.ndarray
    kind: str = "randomized Hadamard"
    work_dtype: type = np.float32

    @property
    def n(self) -> int:
        return int(self.signs.shape[0])

    def left_transpose(self, m: np.ndarray) -> np.ndarray:
        # Q^T m = diag(signs) H m / sqrt(n)  (H is symmetric)
        out = _hadamard_times(m)
        out *= (self.signs / np.sqrt(self.n)).astype(out.dtype)[:, None]
        return out

    def right(self, m: np.ndarray) -> np.ndarray:
        # m Q = (m H) diag(signs) / sqrt(n)
        out = _times_hadamard(m)
        out *= (self.signs / np.sqrt(self.n)).astype(out.dtype)[None, :]
        return out

    def left(self, m: np.ndarray) -> np.ndarray:
        # Q m = H (diag(signs) m) / sqrt(n)
        return _hadamard_times(m * (self.signs / np.sqrt(self.n)).astype(m.dtype)[:, None])

    def right_transpose(self, m: np.ndarray) -> np.ndarray:
        # m Q^T = (m diag(signs)) H / sqrt(n)
        return _times_hadamard(m * (self.signs / np.sqrt(self.n)).astype(m.dtype)[None, :])


@dataclass(frozen=True)
class BlockDiagonal(Orthogonal):
    """`count` copies of the d x d `block` on the diagonal from row/column `offset`, identity elsewhere, in a
    `size` x `size` matrix (R2: one H per attention head)."""

    block: np.ndarray
    count: int
    size: int
    offset: int = 0
    kind: str = "block diagonal"

    @property
    def n(self) -> int:
        return self.size

    def _span(self) -> slice:
        return slice(self.offset, self.offset + self.count * self.block.shape[0])

    def left_transpose(self, m: np.ndarray) -> np.ndarray:
        out = m.copy()
        d = self.block.shape[0]
        part = m[self._span()].reshape(self.count, d, -1)
        out[self._span()] = np.matmul(self.block.T, part).reshape(self.count * d, -1)
        return out

    def right(self, m: np.ndarray) -> np.ndarray:
        out = m.copy()
        d = self.block.shape[0]
        part = m[:, self._span()].reshape(m.shape[0], self.count, d)
        out[:, self._span()] = np.einsum("kcd,de->kce", part, self.block).reshape(m.shape[0], self.count * d)
        return out


def _hadamard_times(m: np.ndarray) -> np.ndarray:
    """H_n m for an [n, k] array, as H_a (H_b m) over m reshaped to [a, b, k] (H_n = H_a ⊗ H_b)."""
    n, k = m.shape
    h_a, h_b = _factors(n, m.dtype)
    a, b = h_a.shape[0], h_b.shape[0]
    inner = np.matmul(h_b, m.reshape(a, b, k))  # H_b on the second index, for each first index
    return (h_a @ inner.reshape(a, b * k)).reshape(n, k)


def _times_hadamard(m: np.ndarray) -> np.ndarray:
    """m H_n for a [k, n] array, over m reshaped to [k, a, b]: H_b on the last index, then H_a on the middle one
    (a matrix product broadcast over the rows), with no transposed copy."""
    k, n = m.shape
    h_a, h_b = _factors(n, m.dtype)
    a, b = h_a.shape[0], h_b.shape[0]
    inner = m.reshape(k, a, b) @ h_b  # H_b is symmetric
    return np.matmul(h_a, inner).reshape(k, n)


def _factors(n: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Sylvester factors H_a, H_b of H_n (a b = n, both powers of two as close as can be)."""
    bits = n.bit_length() - 1
    a, b = 1 << (bits // 2), 1 << (bits - bits // 2)
    return _sylvester(a).astype(dtype), _sylvester(b).astype(dtype)


_SYLVESTER: dict[int, np.ndarray] = {}


def _sylvester(n: int) -> np.ndarray:
    if n not in _SYLVESTER:
        _SYLVESTER[n] = hadamard(n)
    return _SYLVESTER[n]


def orthogonal(n: int, seed: int) -> Orthogonal:
    """A deterministic n x n orthogonal matrix for `seed`: randomized Hadamard for powers of two."""
    rng = np.random.default_rng(seed)
    if n & (n - 1) == 0:
        return RandomizedHadamard(rng.choice(np.array([-1.0, 1.0]), size=n))
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return Dense(q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :])


def rotate_rows(weight: np.ndarray, in_axis: int, q: Orthogonal, scale: np.ndarray | None = None) -> np.ndarray:
    """Q^T diag(scale) W along the input axis of a 2-D weight ([in, out] when in_axis is 0)."""
    w = weight.T if in_axis else weight  # [in, out] view
    out = np.empty(w.shape, dtype=weight.dtype)
    factor = None if scale is None else np.asarray(scale, q.work_dtype)[:, None]
    for columns in _chunks(w.shape[0], w.shape[1]):
        part = _as(w[:, columns], q.work_dtype)
        if factor is not None:
            part *= factor
        out[:, columns] = q.left_transpose(part)
    return np.ascontiguousarray(out.T) if in_axis else out


def rotate_columns(weight: np.ndarray, out_axis: int, q: Orthogonal) -> np.ndarray:
    """W Q along the output axis of a 2-D weight ([out, in] when out_axis is 0), or b Q for a bias
    (out_axis -1; any leading axes of size 1)."""
    if weight.ndim != 2:
        flat = np.asarray(weight, q.work_dtype).reshape(-1, weight.shape[-1])
        return q.right(flat).reshape(weight.shape).astype(weight.dtype)
    w = weight if out_axis in (1, -1) else weight.T  # [rows, out] view
    out = np.empty(w.shape, dtype=weight.dtype)
    for rows in _chunks(w.shape[1], w.shape[0]):
        out[rows] = q.right(_as(w[rows], q.work_dtype))
    return np.ascontiguousarray(out.T) if out_axis == 0 else out


def _as(array: np.ndarray, dtype: type) -> np.ndarray:
    """A copy in `dtype` (a ufunc converts float16 faster than astype in numpy 2.4; see smoothing.convert)."""
    return np.positive(array, dtype=dtype) if array.dtype == np.float16 else array.astype(dtype)


def _chunks(length: int, count: int) -> list[slice]:
    """Slices of `count` items, each item `length` float64 values, a chunk at most CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (8 * max(length, 1)))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def scaled_rotation(scale: np.ndarray, q: Orthogonal) -> np.ndarray:
    """diag(scale) Q: a norm weight followed by the rotation, as one matrix (for norms that write into the
    stream, whose weight has no linear layer to fold into)."""
    return (np.asarray(scale, np.float64)[:, None] * q.matrix()).astype(np.float32)


def block_diagonal(block: np.ndarray, count: int, size: int | None = None, offset: int = 0) -> BlockDiagonal:
    """`count` copies of `block` on the diagonal starting at row/column `offset`, identity elsewhere, in a
    size x size matrix (default: just the blocks)."""
    d = block.shape[0]
    return BlockDiagonal(np.asarray(block, np.float64), count, size if size is not None else offset + count * d,
                         offset)
