"""Evaluation: CORE for base models (`core.py`, nanochat's in-context-learning metric) and nanochat's chat evals
with ChatCORE (`chat.py`)."""
