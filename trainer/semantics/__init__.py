"""Semantics (training only): the sentence encoder, item text, LLM labelling, ESIM."""
