"""Evaluation: nanochat's chat evals and ChatCORE (`chat.py`)."""
