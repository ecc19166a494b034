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

# `make bench-coop`'s held-out set: SAMPLE_PROMPTS and more of the same mix (disjoint from CALIBRATION_PROMPTS),
# enough that the requests a cascade escalates are more than a handful.
EVALUATION_PROMPTS: tuple[str, ...] = (
    *SAMPLE_PROMPTS,
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "Name a fruit that is yellow.",
    "What gas do plants take in from the air?",
    "What is 9 minus 4?",
    "Who was the first person to walk on the moon?",
    "What is the chemical symbol for gold?",
    "Name the largest ocean on Earth.",
    "Write a two-line poem about the sea.",
    "Explain what a verb is.",
    "Give two tips for sleeping better.",
    "Describe a sunset in one sentence.",
    "Why do we have seasons on Earth?",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.",
    "Explain photosynthesis to a child.",
    "List three uses of a paperclip.",
    "What should I pack for a day at the beach?",
    "Write a short thank-you note to a teacher.",
    "How does a bicycle stay upright?",
    "What is a prime number? Give an example.",
    "Explain what an API is in simple terms.",
    "Write a Python function that adds two numbers.",
    "What are the benefits of drinking water?",
    "Describe the taste of a lemon.",
    "Give a short motivational quote and explain it.",
    "Why is exercise good for the heart?",
    "Compare cats and dogs as pets in two sentences.",
)
