"""Training runs on synthetic data (no downloads): stock torch against lossforge, same seed, same batches."""
