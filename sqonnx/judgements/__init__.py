"""Measuring what a run wrote and deciding on it: the quality check, the LM head and rotation verdicts."""
