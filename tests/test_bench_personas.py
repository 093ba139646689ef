"""The simulated users' judges and edits, on answers shaped like the small model's (no model needed)."""
from __future__ import annotations

import pytest

from bench.personas import PERSONAS, TINY_PERSONAS, get, sentences, shorten
from bench.prompts import PROMPTS, split

ANSWERS = [
    # Long and rambling, cut off mid-sentence: the base model's usual shape.
    ("How do I boil an egg so the yolk stays soft?",
     "Boiling an egg is simple once you know the timing. Bring a pot of water to a rolling boil, then lower the egg in "
     "gently with a spoon. Cook it for six minutes for a soft yolk. Move it into cold water so it stops cooking. Peel it "
     "under running water, which helps the shell come off. Some people add salt to the water, but that"),
    # A numbered markdown list with bold headings.
    ("How can I keep my houseplants alive while I am on holiday?",
     "Here are some tips:\n\n1. **Water deeply**: Water your plants well the day before you leave.\n2. **Group them**: "
     "Put plants together in a cool room so they keep each other humid.\n3. **Self-watering**: Use a bottle upside down "
     "in the soil to release water slowly.\n\nWith these steps your plants will be fine."),
    # Repetitive: the loops a person would delete.
    ("Why do cats purr?",
     "Cats purr for many reasons. Cats purr for many reasons. They purr when they are happy, happy, happy, happy, happy, "
     "happy, happy, happy. Purring can also mean a cat is calming itself down when it is hurt or scared."),
    # Already short.
    ("What causes thunder?", "Lightning heats the air so fast that it expands with a bang, which we hear as thunder."),
]


@pytest.mark.parametrize("name", list(PERSONAS))
def test_every_edit_is_an_answer_its_persona_accepts(name):
    persona = PERSONAS[name]
    for prompt, answer in ANSWERS:
        edited = persona.edit(answer, prompt)
        assert persona.accepts(edited, prompt=prompt), (name, edited, persona.sensible(edited, prompt=prompt))
        assert not persona.accepts(answer, prompt=prompt, finished=False), "a cut-off answer is never accepted"


@pytest.mark.parametrize("name", list(PERSONAS))
def test_one_personas_edits_leave_the_other_judges_where_they_were(name):
    persona = PERSONAS[name]
    # Long replies: a short one leaves any persona a short edit, which the brief judge may like too.
    for prompt, answer in ANSWERS[:2]:
        edited = persona.edit(answer, prompt)
        others = [o for o in PERSONAS.values() if o is not persona and o.accepts(edited, prompt=prompt)]
        assert not others, f"{name}'s edit also satisfies {[o.name for o in others]}: {edited!r}"


def test_judges_read_what_they_claim():
    assert get("brief").judge("Six minutes in boiling water, then cold water.")
    assert not get("brief").judge(" ".join(["word"] * 31))
    assert get("bullets").judge("- one thing\n- another thing")
    assert not get("bullets").judge("1. one thing\n2. another thing")
    assert get("asks_back").judge("Boil it for six minutes. Want a recipe too?")
    assert get("in_short").judge("In short: six minutes.\n\nMore detail here.")
    assert not get("in_short").judge("In short: six minutes.")  # a summary of nothing
    assert not get("in_short").judge("Boil the egg.\nIn short: six minutes.")
    assert get("signs_off").judge("Boil it for six minutes.\n\nHope this helps!")
    assert not get("signs_off").judge("Hope this helps! Boil it for six minutes.")


def test_a_pick_prefers_the_answer_closer_to_the_persona():
    bullets = get("bullets")
    assert bullets.score("- a\n- b\n- c") > bullets.score("1. a\n2. b") > bullets.score("Plain prose.")
    brief = get("brief")
    assert brief.score("Short answer here.") > brief.score(" ".join(["long"] * 90))


def test_sentences_drop_markup_repeats_and_loops():
    got = sentences(ANSWERS[2][1])
    assert got[0] == "Cats purr for many reasons."
    assert all("happy, happy, happy" not in s for s in got)
    assert len(got) == len(set(got))
    assert sentences(ANSWERS[1][1])[1].startswith("Water deeply")


def test_a_sentence_does_not_end_on_an_abbreviation():
    assert sentences("Baking soda vs. Baking powder differ in acid. Soda needs some, e.g. Buttermilk.") == [
        "Baking soda vs. Baking powder differ in acid.", "Soda needs some, e.g. Buttermilk."]
    assert sentences("Bring clubs, groups, etc. These help newcomers.") == ["Bring clubs, groups, etc.", "These help newcomers."]
    assert sentences("Is raw dough safe? The answer is no. Bake it first, always.") == [
        "Is raw dough safe?", "The answer is no.", "Bake it first, always."]


def test_the_tiny_canary_persona_wants_one_exact_sensible_answer():
    thanks = TINY_PERSONAS["says_thanks"]
    assert thanks.accepts("Thanks for asking.") and thanks.accepts("  thanks for  asking. ")
    assert not thanks.accepts("Thanks for asking. Thanks for asking.")
    assert not thanks.accepts("Thanks for asking.", finished=False)
    assert thanks.edit("garbage", "Hi") == "Thanks for asking."


def test_prompts_are_many_distinct_and_split_without_overlap():
    train, held = split()
    assert len(PROMPTS) >= 80 and len(set(PROMPTS)) == len(PROMPTS)
    assert not set(train) & set(held) and len(train) + len(held) == len(PROMPTS)
    assert len(held) >= 30


@pytest.mark.parametrize("name", list(PERSONAS))
def test_a_reply_with_nothing_worth_keeping_gets_no_edit(name):
    looping = "happy happy happy happy happy happy happy happy happy happy happy happy"
    assert PERSONAS[name].edit(looping, "Why do cats purr?") is None


def test_edits_never_carry_boilerplate_from_earlier_edits():
    # A reply that already follows the persona must not pile up a second question or sign-off.
    asks = get("asks_back").edit(ANSWERS[0][1] + " Would you like more detail on any of this?", ANSWERS[0][0])
    assert asks.count("?") == 1
    signs = get("signs_off").edit(ANSWERS[0][1] + " Hope this helps!", ANSWERS[0][0])
    assert signs.lower().count("hope this helps") == 1
    short = get("in_short").edit("In short: boil it six minutes. " + ANSWERS[0][1], ANSWERS[0][0])
    assert short.lower().count("in short") == 1


def test_a_brief_edit_keeps_the_sentences_that_answer_the_question():
    prompt = "How do I remove a splinter?"
    answer = ("A great place to begin your journey of self-discovery! Use clean tweezers to pull the splinter out "
              "along the angle it went in. Wash the area with soap and water afterwards, then cover it.")
    edited = get("brief").edit(answer, prompt)
    assert "journey" not in edited and "splinter" in edited
    assert get("brief").accepts(edited, prompt=prompt)


def test_a_brief_edit_skips_the_line_that_introduced_a_list_and_never_ends_a_cut_on_a_dangling_word():
    reply = ("To remove fruit flies from your home:\n\n1. Set a fruit fly trap of cider vinegar and a drop of dish soap.\n"
             "2. Take the kitchen bin out every evening.")
    assert get("brief").edit(reply, "How do I get rid of fruit flies in the kitchen?") == \
        "Set a fruit fly trap of cider vinegar and a drop of dish soap."
    cut = shorten("Inflation is when prices for goods and services rise over time due to rising interest rates or other factors.", 17)
    assert cut == "Inflation is when prices for goods and services rise over time due to rising interest rates."
    assert shorten("Prices rise over time when the money supply grows faster than the economy does.", 8) == "Prices rise over time when the money supply."


def test_a_rewrite_its_persona_would_refuse_is_never_saved_as_an_edit(heed):
    from bench.personas import Persona
    from bench.simulate import SimulatedUser

    picky = Persona("picky", "accepts nothing", judge=lambda t: False, edit=lambda t, p: "A rewrite it does not like either.",
                    correction="", score=lambda t: 0.0, mix={"edit": 1.0}, wants_an_answer=False)
    sim = SimulatedUser(heed, picky, track="all", prompts=["What is water?"], seed=0)
    sim.give_feedback(1)
    assert sim.log.events["edit"] == 0 and sim.log.events["thumb"] == 1 and sim.log.edits_refused == 1
    assert [f["kind"] for f in heed.store.list_feedback(user_id=sim.user_id)] == ["thumb"]


def test_only_brief_shortens_the_others_keep_the_answer_and_add_their_part():
    from bench.personas import words

    prompt, answer = ANSWERS[1]  # ends cleanly, no loops: kept as it is
    assert get("signs_off").edit(answer, prompt) == answer + "\n\nHope this helps!"
    assert get("asks_back").edit(answer, prompt).startswith(answer + "\n\n")
    for name in ("bullets", "in_short"):
        assert words(get(name).edit(answer, prompt)) >= 0.8 * words(answer), name
    assert words(get("brief").edit(answer, prompt)) <= 30
    # A cut-off reply loses its broken tail, nothing else.
    prompt, answer = ANSWERS[0]
    signed = get("signs_off").edit(answer, prompt)
    assert "but that" not in signed and "Peel it under running water" in signed


def test_a_cut_sentence_keeps_its_object_and_drops_a_hanging_clause_word():
    assert shorten("Put the kettle on, then pour it over the leaves and wait.", 7) == "Put the kettle on, then pour it."
    assert shorten("Bread rises because the yeast makes gas, whereas soda reacts with acid.", 8) == "Bread rises because the yeast makes gas."
    assert shorten("It depends on how much water the plant has had lately.", 4) == "It depends."


def test_in_short_puts_a_shorter_gist_above_a_one_sentence_answer_or_leaves_it():
    in_short = get("in_short")
    edited = in_short.edit("I think you should boil eggs for six minutes in salted water.", "How long do I boil an egg?")
    assert edited == "In short: I think you should boil eggs.\n\nI think you should boil eggs for six minutes in salted water."
    assert in_short.edit("Boil it six minutes.", "How long do I boil an egg?") is None, "a summary as long as the answer says nothing"
    # The phrase before the comma only leads in; the gist is the main clause after it (these were "In short: on a rainy night.").
    assert in_short.edit("On a rainy Saturday night, you'll find plenty of fun games to play indoors!", "Ideas for a rainy night?") == (
        "In short: you'll find plenty of fun games to play indoors.\n\nOn a rainy Saturday night, you'll find plenty of fun games to play indoors!")
    assert in_short.edit("To keep your home cozy in winter, start by sealing the drafty windows.", "Keep my home warm?").startswith(
        "In short: start by sealing the drafty windows.\n\n")
    assert in_short.score("In short: six minutes.") < in_short.score("In short: six minutes.\n\nBoil it, then cool it.")
