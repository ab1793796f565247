"""Prompts of the *_chat tasks: nanochat's multiple-choice rendering, the one the chat stages train on."""

from hfnanochat.tasks import render_mc


def arc_prompt(doc: dict) -> str:
    return render_mc(doc["question"], doc["choices"]["label"], doc["choices"]["text"])


def mmlu_prompt(doc: dict) -> str:
    return render_mc(doc["question"], ["A", "B", "C", "D"], doc["choices"])
