"""Weight rounding: round-to-nearest, or GPTQ's error feedback (Frantar et al. 2022), in numpy only.

A linear layer Y = X W with W [K, N] is quantized on a symmetric integer grid (`Grid`): one scale per output
channel and group of `group` input channels (0: all K, INT8's per-channel scales; 32: MatMulNBits' blocks).
Round-to-nearest rounds every weight on its own. GPTQ rounds the input channels one after another and moves
each one's rounding error onto the channels not yet rounded, weighted by the inverse of the Hessian
H = 2 X^T X of the layer's calibration inputs, so that X W changes as little as it can (the error left is
what the remaining channels cannot absorb). As in the reference implementation (gptq.py of IST-DASLab/gptq):
dead channels (H_jj = 0) are zeroed, H is damped by `damp` x its mean diagonal, the updates are done in blocks
of BLOCK channels, and `act_order` takes the channels in order of decreasing H_jj with every group's scale
fixed beforehand from the unrounded weights ("static groups": MatMulNBits must not need a g_idx, which would
take its slow path). Without act_order a group's scale is taken when its first channel is reached, from the
weights as the earlier errors have moved them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 128  # channels per lazy update (GPTQ's blocksize)
DAMP = 0.01  # GPTQ's percdamp


@dataclass(frozen=True)
class Grid:
    """Codes in [low, high]; one scale per output channel and group of `group` input channels (0: all).

    `signed_max`: the weight of largest magnitude in a group maps exactly onto `low` (its scale then has its
    sign), as onnxruntime's MLAS blockwise quantizer does for symmetric 4-bit blocks: all 16 codes are used.
    Otherwise scale = max|w| / high, the INT8 way."""

    low: int
    high: int
    group: int = 0
    signed_max: bool = False

    @classmethod
    def int8(cls, qmax: int) -> Grid:
        return cls(-qmax, qmax)

    @classmethod
    def int4(cls, block: int) -> Grid:
        return cls(-8, 7, block, signed_max=True)

    @classmethod
    def int8_blocks(cls, block: int) -> Grid:
        return cls(-128, 127, block, signed_max=True)

    def size(self, k: int) -> int:
        return self.group or k

    def scales(self, w: np.ndarray) -> np.ndarray:
        """Scales [N] of `w` [N, g], one group of input channels of every output channel; never zero."""
        if self.signed_max:
            picked = w[np.arange(len(w)), np.argmax(np.abs(w), axis=1)]
            scale = picked / np.float32(self.low)
        else:
            scale = np.abs(w).max(axis=1) / np.float32(self.high)
        return np.where(scale != 0, scale, np.float32(1.0)).astype(np.float32)

    def round(self, values: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(values / scale), self.low, self.high)

    @property
    def dtype(self) -> type:
        return np.int8 if self.low >= -128 and self.high <= 127 else np.int32


@dataclass(frozen=True)
class Rounded:
    """A weight on a grid: `codes` [K, N] (int8, or int32 for wider grids) and `scales` [N, groups] (float32)."""

    codes: np.ndarray
    scales: np.ndarray
    group: int

    def dequantized(self, columns: np.ndarray | None = None) -> np.ndarray:
        """The grid values [K, N] (or of output `columns` only), float32."""
        codes = self.codes if columns is None else self.codes[:, columns]
        scales = self.scales if columns is None else self.scales[columns]
        per_row = np.repeat(scales.T, self.group, axis=0)[: len(codes)]  # [K, N]
        return np.multiply(codes, per_row, dtype=np.float32)


def nearest(weight: np.ndarray, grid: Grid) -> Rounded:
    """Round-to-nearest of `weight` [K, N]."""
    w = np.asarray(weight, np.float32).T  # [N, K]
    k = w.shape[1]
    size = grid.size(k)
    scales = np.stack([grid.scales(w[:, g:g + size]) for g in range(0, k, size)], axis=1)
    per_row = np.repeat(scales, size, axis=1)[:, :k]
    return Rounded(np.ascontiguousarray(grid.round(w, per_row).T.astype(grid.dtype)), scales, size)


def gptq(weight: np.ndarray, hessian: np.ndarray, grid: Grid, *, damp: float = DAMP, act_order: bool = False,
         block: int = BLOCK) -> Rounded:
    """GPTQ rounding of `weight` [K, N] for inputs whose X^T X is `hessian` [K, K] (any positive multiple)."""
    w = np.array(weight, dtype=np.float32).T  # [N, K], rows are output channels
    n, k = w.shape
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    size = grid.size(k)
    groups = -(-k // size)
    scales = np.zeros((n, groups), np.float32)
    order = np.arange(k)
    if act_order:
        for g in range(groups):
            scales[:, g] = grid.scales(w[:, g * size:(g + 1) * size])
        order = np.argsort(-np.diag(h), kind="stable")
        w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    # the upper Cholesky factor of H^-1: row i holds what rounding channel i asks of the channels after it
    u = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    codes: np.ndarray = np.zeros((n, k), grid.dtype)
    for start in range(0, k, block):
        stop = min(start + block, k)
        part = w[:, start:stop].copy()
        errors = np.zeros_like(part)
        for i in range(stop - start):
            channel = order[start + i]
            g = channel // size
            if not act_order and channel % size == 0:
                scales[:, g] = grid.scales(np.concatenate([part[:, i:], w[:, stop:]], axis=1)[:, :size])
            q = grid.round(part[:, i], scales[:, g])
            codes[:, start + i] = q
            error = (part[:, i] - q * scales[:, g]) / u[start + i, start + i]
            part[:, i:] -= np.outer(error, u[start + i, start + i:stop])
            errors[:, i] = error
        w[:, stop:] -= errors @ u[start:stop, stop:]
    if act_order:
        codes = codes[:, np.argsort(order)]
    return Rounded(codes.T.copy(), scales, size)


def round_weight(weight: np.ndarray, grid: Grid, hessian: np.ndarray | None, act_order: bool = False) -> Rounded:
    """GPTQ where the layer's Hessian is known, else round-to-nearest."""
    return nearest(weight, grid) if hessian is None else gptq(weight, hessian, grid, act_order=act_order)
