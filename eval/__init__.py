"""Evaluation on held-out data: loss, bits per byte and samples; runs on a live model or any checkpoint."""
