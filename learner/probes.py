"""The prompts that fill the gate's answers after a user's own held-out contexts.

``factual``: the original set, mostly short questions of fact ("What is the
capital of Japan?"), which even a collapsing adapter answers well. ``everyday``:
how-to questions like a chat user's own, none of them among the benchmark's
prompts. Draw 2's brief adapter after 16 events, which answered 10 of its 32
held-out questions with one template ("To start with the right mindset you
should focus on ... before going to bed."), showed it in 3 of the factual
probes' 24 answers and 13 of the everyday ones'; every other adapter of that run
in at most 2 of either (docs/MEASUREMENTS.md, "Answers that are one template").
``mixed`` (the default) alternates the two, so any number of probes holds both kinds;
rerun on draws 0, 1 and 2 it refused two candidates the factual set let through (draw 2's
brief collapsed into a template, draw 1's bullets drifting off topic) and changed no other decision.
"""
from __future__ import annotations

PROBES = [
    "What is the capital of Japan?",
    "Give me one tip for sleeping better.",
    "Explain what a rainbow is.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "What should I pack for a day at the beach?",
    "How many days are there in a leap year?",
    "Suggest a name for a pet cat.",
    "What is photosynthesis?",
    "How can I make my tea less bitter?",
    "Why do we have seasons?",
    "What is a good way to remember a shopping list?",
    "How long should I rest between workouts?",
    "What does a librarian do?",
    "How do I say thank you to a neighbour who helped me?",
    "Why does the moon change shape?",
    "What is a simple way to start saving money?",
    "How do bees make honey?",
    "What can I cook with rice, eggs and spinach?",
    "How do I keep my phone battery healthy?",
    "Why do some birds fly south for the winter?",
    "What is a polite way to end a phone call?",
    "How do I choose a good book to read?",
    "What makes bread rise?",
]

EVERYDAY = [
    "How do I get rid of a headache without medicine?",
    "What should I do if my car battery dies?",
    "How can I make my shoes stop smelling?",
    "How do I clean the inside of a microwave?",
    "What should I bring to a picnic?",
    "How can I keep mosquitoes away in the evening?",
    "How do I hang a picture straight?",
    "What should I do if I burn my hand while cooking?",
    "How can I make a small garden look tidy?",
    "How do I stop my glasses from fogging up?",
    "What is a good way to pack a suitcase?",
    "How do I defrost a freezer?",
    "How can I stay focused while reading?",
    "What should I do if my laptop freezes?",
    "How do I keep my dog calm during fireworks?",
    "How can I cook vegetables so they stay crunchy?",
    "How do I get rid of a musty smell in a cupboard?",
    "What should I do when I cannot sleep on a plane?",
    "How do I care for a leather jacket?",
    "How can I make a long walk more fun?",
    "How do I fold a fitted sheet?",
    "What should I do if I get a blister on my foot?",
    "How can I keep bread from going mouldy?",
    "How do I choose a ripe watermelon?",
]

PROBE_SETS = ("factual", "everyday", "mixed")


def probe_prompts(kind: str) -> list[str]:
    """The probe prompts of one set, in the order the gate takes them."""
    if kind == "factual":
        return list(PROBES)
    if kind == "everyday":
        return list(EVERYDAY)
    if kind == "mixed":
        return [q for pair in zip(EVERYDAY, PROBES) for q in pair]
    raise ValueError(f"unknown probe set {kind!r} (known: {', '.join(PROBE_SETS)})")
