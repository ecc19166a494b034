"""A fixed set of sample prompts used by `stratus up --once`, `stratus bench` and the benchmarks."""

from __future__ import annotations

# Short factual questions a small edge model answers well, then open-ended or harder ones.
SAMPLE_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Write a haiku about clouds over the mountains.",
    "Explain in two sentences why the sky is blue.",
    "Give one tip for writing clear emails.",
    "What is the largest planet in our solar system?",
    "Summarize the plot of Cinderella in one sentence.",
    "What does a CPU do in a computer?",
)
