"""Names shared by the settings, the bundle format and the history store, in a module with no
heavy imports: the multi-worker supervisor (`python -m service`, WORKERS > 1) reads the
settings without loading FAISS, onnxruntime or numpy, which only the workers need."""

DEFAULT_MODEL_NAME = "recommender"  # models/<name>/: the trainer's default and the service's
EVENT_STREAM = "recsys:events"  # default Redis Stream of accepted events (the nightly job reads it)
