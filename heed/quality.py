"""Is an answer sensible? The published check used by the learner's gate and the benchmarks.

An answer is degenerate when it is empty or a single word, echoes the prompt,
repeats itself, or was cut off (generation hit the token limit before the
model ended it). "Repeats itself" covers the loops a reward-hacked adapter
falls into: repeated word trigrams ("in short: in short: in short"), the same
sentence said twice ("Hope this helps!Hope this helps!"), or a handful of
words cycling ("A: A: A:").

Across a set of answers to different questions, ``templated`` finds the ones
that are mostly one template ("To start with the right mindset you should focus
on ... before going to bed."), which each answer alone does not show.
"""
from __future__ import annotations

import re

_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?]+|\n+")


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repetition_share(text: str, n: int = 3) -> float:
    """Share of word n-grams that are repeats of an earlier one (0 = none repeated)."""
    grams = _ngrams(_WORD.findall(text.lower()), n)
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def repeated_sentence(text: str, min_words: int = 3) -> bool:
    """True when one sentence (of at least ``min_words`` words) occurs twice, wherever it is."""
    seen: set[tuple[str, ...]] = set()
    for part in _SENTENCE_END.split(text.lower()):
        words = tuple(_WORD.findall(part))
        if len(words) < min_words:
            continue
        if words in seen:
            return True
        seen.add(words)
    return False


def echo_share(answer: str, prompt: str) -> float:
    """Share of the answer's word 4-grams that appear in the prompt."""
    a = _ngrams(_WORD.findall(answer.lower()), 4)
    if not a:
        return 0.0
    p = set(_ngrams(_WORD.findall(prompt.lower()), 4))
    return sum(g in p for g in a) / len(a)


def degeneration(answer: str, *, prompt: str = "", finished: bool = True, min_words: int = 2,
                 max_repetition: float = 0.35, max_echo: float = 0.6) -> str | None:
    """Why the answer is degenerate ('empty', 'too_short', 'cut_off', 'repetitive', 'echo'), or None if sensible."""
    words = _WORD.findall(answer)
    if not words:
        return "empty"
    if len(words) < min_words:
        return "too_short"
    if not finished:
        return "cut_off"
    if repetition_share(answer) > max_repetition or repeated_sentence(answer):
        return "repetitive"
    if prompt and len(words) >= 4 and echo_share(answer, prompt) > max_echo:
        return "echo"
    # "A: A: A:" style loops have few distinct words.
    if len(words) >= 8 and len({w.lower() for w in words}) / len(words) < 0.3:
        return "repetitive"
    return None


def templated(answers: list[str], *, min_others: int = 2, max_shared: float = 0.3) -> list[bool]:
    """Which of these answers (to different questions) are mostly a template: more than ``max_shared`` of their
    word trigrams occur in at least ``min_others`` other answers of the set.

    An adapter can collapse to one sentence with a slot for the topic, which the
    topic check passes whenever the slot holds a word of the question. A line said
    word for word in that many answers is left out first: it is a persona's fixed
    line (a closing question, a sign-off) that a user may well want under every
    answer, and an answer that is nothing but a fixed line answers nothing, which
    the topic check reads. Measured on every recorded benchmark answer set (32
    held-out answers per adapter; docs/MEASUREMENTS.md, "Answers that are one
    template").
    """
    lines = [[tuple(_WORD.findall(part)) for part in _SENTENCE_END.split(a.lower())] for a in answers]
    line_counts = _counts({ln for ln in ls if ln} for ls in lines)
    sets = [{g for ln in ls if line_counts.get(ln, 0) <= min_others for g in _ngrams(list(ln), 3)} for ls in lines]
    counts = _counts(sets)
    # counts include the answer itself: "in min_others others" is a count above min_others.
    return [bool(grams) and sum(counts[g] > min_others for g in grams) / len(grams) > max_shared for grams in sets]


def _counts(sets) -> dict:
    """In how many of the sets each item occurs."""
    out: dict = {}
    for items in sets:
        for x in items:
            out[x] = out.get(x, 0) + 1
    return out


def is_sensible(answer: str, *, prompt: str = "", finished: bool = True) -> bool:
    return degeneration(answer, prompt=prompt, finished=finished) is None


_STOP = set(
    "what when where which while with would could should about there their your yours from have this that these those "
    "into than then them they will just some more most very also make made does doing done being been were was are for "
    "and the how why who can get got its not but all any each much many way ways good best keep".split())
_ALPHA = re.compile(r"[a-zA-Z]+")


def _content(text: str) -> set[str]:
    return {w.lower() for w in _ALPHA.findall(text) if len(w) >= 3 and w.lower() not in _STOP}


def on_topic(answer: str, prompt: str) -> bool:
    """Does the answer share a content word with the question (same 3-letter stem, or one word inside
    the other: "plants" / "houseplants"), stopwords ignored?

    Deliberately lenient: it only rules out replies that answer nothing, like an
    apology, a question back instead of an answer, or the system prompt said
    back, which a small model can collapse to. The benchmark's judges and the
    learner's gate both use it.
    """
    if not prompt:
        return True
    q = _content(prompt)
    stems = {w[:3] for w in q}
    for w in _content(answer):
        if w[:3] in stems or any(len(w) >= 4 and w.rstrip("s") in x or len(x) >= 4 and x.rstrip("s") in w for x in q):
            return True
    return False
