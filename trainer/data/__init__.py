"""Data: loaders of interaction files, the sequence dataset, specs, synthetic data."""
