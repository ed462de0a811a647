"""Pure numpy math: smoothing factors, rotations, GPTQ rounding, the error models behind the run's choices."""
