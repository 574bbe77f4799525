"""Evaluation: answer extraction, MGSM-format data, perplexity, batched generation, the results table."""
