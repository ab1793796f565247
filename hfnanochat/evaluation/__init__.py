"""Evaluation of base models: CORE (`core.py`), nanochat's in-context-learning metric."""
