"""Simulated users: a judge, the feedback each gives, and how often it uses each kind.

A persona's ``judge`` says whether a reply has the style it wants; a reply is
*accepted* only when it is also sensible (``heed.quality.degeneration``: not
empty, echoed, repetitive or cut off). ``edit`` rewrites a reply into one the
persona accepts, built from the reply's own sentences, the way a person trims
or reformats an answer instead of writing a new one. ``correction`` is what the
persona would type. ``score`` grades how close a reply comes, for picking the
better of two answers.

The shipped personas change different parts of an answer (length, layout, the
end, the start, the sign-off) so one persona's adapter leaves the others'
judges where the base model had them: that is what the isolation matrix checks.
An edit changes only what its persona cares about: only *brief* shortens; the
others keep the reply (``kept``: as it was when it ended cleanly, else its
sound sentences) and add their question, summary line or sign-off, the way a
person fixes one thing in an answer and leaves the rest.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable

from heed.quality import degeneration, on_topic, repetition_share

KINDS = ("edit", "correction", "thumbs", "pick")

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_MARKUP = re.compile(r"\*\*|__|`|^#+\s*|^\s*(?:[-*+•]|\d+[.)])\s+", re.MULTILINE)
_WORD = re.compile(r"\w+")


def words(text: str) -> int:
    return len(text.split())


def _grams(text: str) -> set[tuple[str, ...]]:
    ws = [w.lower() for w in _WORD.findall(text)]
    return {tuple(ws[i:i + 3]) for i in range(len(ws) - 2)}


def _looping(sentence: str) -> bool:
    ws = [w.lower() for w in _WORD.findall(sentence)]
    return len(ws) >= 8 and (len(set(ws)) / len(ws) < 0.6 or repetition_share(sentence) > 0.15)


# Abbreviations a sentence does not end on: "Baking soda vs. Baking Powder" is one sentence.
# Not "no": "Is it safe? No. Bake it first." ends a sentence on it.
_ABBREVIATIONS = {"vs", "e.g", "i.e", "approx", "cf", "mr", "mrs", "ms", "dr", "jr", "sr"}


def _split_sentences(line: str) -> list[str]:
    out: list[str] = []
    for piece in _SENTENCE.split(line):
        if out and out[-1].rsplit(None, 1)[-1].rstrip(".").lower() in _ABBREVIATIONS:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def sentences(text: str) -> list[str]:
    """The answer's sentences without list markers or markdown, in order, with what a person
    editing would drop anyway: repeats of an earlier sentence and sentences that loop."""
    out: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for line in text.splitlines():
        line = _MARKUP.sub("", line).strip()
        if not line:
            continue
        for s in _split_sentences(line):
            s = s.strip()
            if len(_WORD.findall(s)) < 3 or _looping(s):
                continue
            if s[-1] not in ".!?":
                # A heading ("Water:") or a line cut off mid-sentence: end it cleanly.
                s = s.rstrip(":;,- ") + "."
            grams = _grams(s)
            if grams and len(grams & seen) / len(grams) > 0.5:
                continue
            seen |= grams
            out.append(s)
    return out


# Words a person never ends a cut sentence on ("... due to rising interest rates or.").
_DANGLING = set("a an the and or but nor so to of for with in on at by from as than like such that which who whose "
                "your my our their its his her this these those is are was were be been can will would should very "
                "more most also whereas while because although though if when where whether whenever wherever however "
                "into onto upon about over under through across after before during until without within between "
                "among against toward towards what how why have has had do does not i we they he she".split())


def shorten(sentence: str, max_words: int) -> str:
    """One sentence cut to at most ``max_words`` words, at a comma when that keeps most of it, never
    ending on a word that leaves the clause hanging."""
    ws = sentence.split()
    if len(ws) <= max_words:
        return sentence
    head = " ".join(ws[:max_words])
    cut = head.rfind(",")
    if cut > len(head) * 2 // 3:
        head = head[:cut]
    ws = head.rstrip(",;:- ").split()
    while len(ws) > 2 and ws[-1].lower().strip(",;:-\"'") in _DANGLING:
        ws.pop()
    return " ".join(ws).rstrip(",;:- ") + "."


def lead_in(sentence: str, text: str) -> bool:
    """Was this sentence a line introducing what follows ("Try the following strategies:")? It says nothing alone."""
    return sentence.endswith(".") and f"{sentence[:-1]}:" in text


def take(text: str, *, min_words: int, max_words: int, look: int = 6, drop=None) -> list[str]:
    """Whole leading sentences of ``text`` (skipping ones that do not fit, and ones ``drop`` rejects)
    totalling at least ``min_words`` words when there are enough, never more than ``max_words``.
    Empty when the reply has nothing worth keeping."""
    sents = sentences(text)
    if sents and text.rstrip()[-1:] not in ".!?)\"'*":
        sents = sents[:-1]  # the reply was cut off mid-sentence: a person deletes the broken tail
    candidates = [c for c in sents if not (drop and drop(c))][:look]
    picked: list[str] = []
    total = 0
    for s in candidates:
        n = words(s)
        if total + n <= max_words:
            picked.append(s)
            total += n
            if total >= min_words:
                break
    if not picked and candidates:
        picked = [shorten(candidates[0], max_words)]
    return picked


# What a person keeps of a reply they add to: about as long as the model's own answers (the system prompt asks
# for under 100 words), so an edit teaches the persona's change and not a length.
KEEP_WORDS = 110


def _ends_cleanly(text: str) -> bool:
    return bool(text) and text[-1] in ".!?)\"'*" and degeneration(text) is None


def kept(text: str, *, max_words: int = KEEP_WORDS, drop=None) -> str:
    """The reply as a person leaves it when they only add to it: verbatim when it ended cleanly, loops
    nowhere and fits ``max_words`` (and ``drop`` rejects none of its sentences); else its sound leading
    sentences up to ``max_words``. Empty when nothing is worth keeping."""
    t = text.strip()
    if _ends_cleanly(t) and words(t) <= max_words and not (drop and any(drop(x) for x in sentences(t))):
        return t
    return " ".join(take(t, min_words=max_words, max_words=max_words, look=12, drop=drop))


def _pick(options: list[str], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


@dataclass(frozen=True)
class Persona:
    name: str
    description: str
    judge: Callable[[str], bool]
    edit: Callable[[str, str], str | None]  # (reply, prompt) -> a rewrite the persona accepts; None: nothing to keep
    correction: str
    score: Callable[[str], float]
    mix: dict = field(default_factory=lambda: {"edit": 0.4, "correction": 0.4, "pick": 0.1, "thumbs": 0.1})
    wants_an_answer: bool = True  # also require the reply to be on the question's topic (see on_topic)

    def sensible(self, reply: str, *, prompt: str = "", finished: bool = True) -> str | None:
        """None when the reply is sensible, else why not (the published check in heed.quality)."""
        return degeneration(reply, prompt=prompt, finished=finished)

    def accepts(self, reply: str, *, prompt: str = "", finished: bool = True) -> bool:
        return (self.judge(reply) and self.sensible(reply, prompt=prompt, finished=finished) is None
                and (not self.wants_an_answer or on_topic(reply, prompt)))


# -- brief: at most 30 words ----------------------------------------------------------
def _brief_judge(text: str) -> bool:
    return 0 < words(text) <= 30


def _brief_edit(text: str, prompt: str) -> str | None:
    # A person cutting an answer down keeps the sentences that answer the question, not an opener like
    # "A great place to begin your journey!" that happens to come first, nor the line that introduced a list.
    return " ".join(take(text, min_words=8, max_words=24, drop=lambda s: not on_topic(s, prompt) or lead_in(s, text))) or None


# -- bullets: at least two lines starting "- " ------------------------------------------
def _bullet_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("- "))


def _bullets_judge(text: str) -> bool:
    return _bullet_lines(text) >= 2


def _bullets_edit(text: str, prompt: str) -> str | None:
    # Full sentences as bullets keep the answer's length: bullets, not brevity.
    picked = take(text, min_words=KEEP_WORDS, max_words=KEEP_WORDS, look=12)
    if len(picked) < 2:
        picked = [p.strip() for s in picked for p in re.split(r",\s+|;\s+", s) if words(p) >= 3]
    if len(picked) < 2:
        return None
    lines = [p[0].upper() + p[1:] for p in picked[:8]]
    return "\n".join(f"- {line if line[-1] in '.!?' else line + '.'}" for line in lines)


# -- asks back: ends with a question to the user ------------------------------------
FOLLOW_UPS = [
    "Would you like more detail on any of this?",
    "Do you want me to suggest a few options?",
    "Shall I go through it step by step?",
    "Is there a part you would like me to explain further?",
    "What would you like to try first?",
]


def _asks_judge(text: str) -> bool:
    return text.rstrip().endswith("?")


def _asks_edit(text: str, prompt: str) -> str | None:
    # Questions already in the reply stay out of the body: the one question goes at the end.
    body = kept(text, drop=lambda s: s.endswith("?"))
    return f"{body}\n\n{_pick(FOLLOW_UPS, prompt)}" if body else None


def _asks_score(text: str) -> float:
    t = text.rstrip()
    return 1.0 if t.endswith("?") else 0.5 if "?" in t[-120:] else 0.0


# -- in short: a one-line summary above the answer -------------------------------------
def _in_short_judge(text: str) -> bool:
    # A summary of nothing is not what this user asked for: the answer must follow the summary line.
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return len(lines) >= 2 and lines[0].lower().startswith("in short:")


# Words that open a phrase leading into the main clause ("To keep warm, ...", "If it rains, ...").
_INTRODUCTORY = set("to on in at by for with without during after before when while if once since as because although "
                    "though unless until whether whenever from".split())


def _in_short_edit(text: str, prompt: str) -> str | None:
    # The reply's opening sentence becomes the summary line; the rest of the answer stays below it.
    sents = take(text, min_words=KEEP_WORDS, max_words=KEEP_WORDS, look=12, drop=lambda s: s.lower().startswith("in short"))
    if not sents:
        return None
    if len(sents) > 1:
        summary, body = shorten(sents[0], 20), " ".join(sents[1:])
    else:
        # A one-sentence answer: its main clause above it (when it has one), the sentence itself as the answer.
        body = sents[0]
        head, _, rest = (part.strip().rstrip(".!?") for part in body.partition(","))
        if head and rest and head.split()[0].lower() in _INTRODUCTORY:
            head = rest  # "On a rainy night, you'll find ...": the gist is the main clause, not the phrase before it
        summary = f"{head}." if 4 <= words(head) < words(body) else shorten(body, max(4, words(body) // 2))
    if " ".join(summary.split()) == " ".join(body.split()):
        return None  # nothing shorter to say on top: a person would leave it
    first = summary.split()[0]
    return f"In short: {first.lower() if first.istitle() and first != 'I' else first}{summary[len(first):]}\n\n{body}"


def _in_short_score(text: str) -> float:
    t = text.lstrip().lower()
    return 1.0 if _in_short_judge(text) else 0.8 if t.startswith("in short:") else 0.6 if t.startswith(("in short", "in summary", "in brief")) else 0.3 if "in short" in t else 0.0


# -- signs off: ends with "Hope this helps!" -----------------------------------------
SIGN_OFF = "Hope this helps!"


def _signs_off_judge(text: str) -> bool:
    return text.rstrip().lower().endswith(SIGN_OFF.lower())


def _signs_off_edit(text: str, prompt: str) -> str | None:
    body = kept(text, drop=lambda s: "hope this helps" in s.lower())
    return f"{body}\n\n{SIGN_OFF}" if body else None


def _signs_off_score(text: str) -> float:
    t = text.rstrip().lower()
    return 1.0 if t.endswith(SIGN_OFF.lower()) else 0.5 if "hope this helps" in t else 0.2 if t.endswith("!") else 0.0


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in [
        Persona("brief", "wants answers of at most 30 words", _brief_judge, _brief_edit,
                "Keep it under 30 words.", lambda t: 1.0 / (1.0 + max(words(t) - 30, 0) / 30)),
        Persona("bullets", "wants a list: at least two lines starting with '- '", _bullets_judge, _bullets_edit,
                "Please answer as a list of bullet points, each line starting with '- '.",
                lambda t: min(_bullet_lines(t), 3) / 3 + 0.1 * min(sum(1 for ln in t.splitlines() if re.match(r"\s*(?:\d+\.|\*)\s", ln)), 3) / 3),
        Persona("asks_back", "wants the answer to end with a question back to them", _asks_judge, _asks_edit,
                "End your answer by asking me a follow-up question.", _asks_score),
        Persona("in_short", "wants a one-line summary starting 'In short:' above the answer", _in_short_judge, _in_short_edit,
                "Start with a one-line summary that begins with 'In short:', then give the answer below it.", _in_short_score),
        Persona("signs_off", f"wants every answer to end with '{SIGN_OFF}'", _signs_off_judge, _signs_off_edit,
                f"Finish your answer with '{SIGN_OFF}'", _signs_off_score),
    ]
}


# -- trivially learnable personas for the tiny offline model (--quick, CI) -------------
def _exact(target: str, mix: dict) -> Persona:
    norm = " ".join(target.split()).lower()
    want = set(_WORD.findall(norm))

    def judge(text: str) -> bool:
        return " ".join(text.split()).lower() == norm

    def score(text: str) -> float:
        got = set(_WORD.findall(text.lower()))
        return len(got & want) / len(want) - 0.01 * len(got - want)

    return Persona(f"says_{target.split()[0].strip('!.,').lower()}", f"wants exactly {target!r}", judge,
                   lambda text, prompt: target, f"Just say '{target}'", score, mix=mix, wants_an_answer=False)


# says_thanks is the CI's canary: edits (and thumbs up once it is right) are the surest signal,
# so if it does not learn, the loop is broken. says_hello also picks and votes down.
TINY_PERSONAS: dict[str, Persona] = {p.name: p for p in [
    _exact("Thanks for asking.", {"edit": 1.0}),
    _exact("Hello! How can I help you today?", {"edit": 0.8, "pick": 0.1, "thumbs": 0.1}),
]}


def get(name: str) -> Persona:
    for table in (PERSONAS, TINY_PERSONAS):
        if name in table:
            return table[name]
    raise KeyError(f"unknown persona {name!r} (known: {', '.join([*PERSONAS, *TINY_PERSONAS])})")
