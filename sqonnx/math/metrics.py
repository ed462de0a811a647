"""How close a quantized model's outputs are to the float model's: the one log-softmax behind every perplexity,
KL divergence and next-token comparison (the run's quality check, `models/evaluate.py`, the benchmarks)."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, shifted by the row maximum first so no exp overflows (pass float64 logits for
    sums over a large vocabulary)."""
    top = logits.max(axis=-1, keepdims=True)
    shifted = logits - top
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def next_token_nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Summed negative log-likelihood of `tokens` [T] under `logits` [T, vocab] (position t predicts tokens[t])."""
    log_p = log_softmax(logits)
    return -float(log_p[np.arange(len(tokens)), tokens].sum())
