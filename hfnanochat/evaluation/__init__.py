"""Evaluation: CORE for base models (`core.py`), nanochat's chat evals and ChatCORE (`chat.py`)."""
