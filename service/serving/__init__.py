"""Serving: the recommender, retrieval, batching, variants, the model manager."""
