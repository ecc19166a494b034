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

# Disjoint from SAMPLE_PROMPTS: a threshold is calibrated on these and measured on those.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "What is the capital of Italy?",
    "How many days are in a week?",
    "Name a mammal that lives in the ocean.",
    "What color is a ripe banana?",
    "Who painted the Mona Lisa?",
    "What is 7 plus 8?",
    "Describe a rainy day in one sentence.",
    "What is the opposite of 'hot'?",
    "Write a short greeting for a birthday card.",
    "What language is spoken in Brazil?",
    "Explain what a noun is.",
    "Give a synonym for 'happy'.",
    "What is the freezing point of water in Fahrenheit?",
    "Name a famous scientist.",
    "Why do leaves change color in autumn?",
    "What is the main ingredient of guacamole?",
)
