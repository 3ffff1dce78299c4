"""The pieces of the training loop that are neither model, data nor parallelism: optimizer and schedule,
metrics and plots. train.py strings them together."""
