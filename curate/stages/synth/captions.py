"""Wording a caption of `curate synth`: which attributes it names (`mentions`) and their values -> English.

Pure functions of their arguments. A caption always names the concept when it names anything; the noun phrase
puts count, size, style and colour before the concept ("two large hollow red stars"), tone and texture go into
" on a dark striped background". An unnamed count still shows in the grammar (a star, stars): only the number
word is a mention.
"""

from __future__ import annotations

from curate.stages.synth.world import WORLD, World

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
NOUN_PHRASE_ORDER = ("size", "style", "colour")  # adjectives before the noun, in this order


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(stated: dict, count: int, world: World = WORLD) -> str:
    """"two large hollow red stars" from the stated attributes; `count` picks singular or plural."""
    words = [stated[a] for a in NOUN_PHRASE_ORDER if a in stated]
    noun = stated["concept"] if count == 1 else world.plural(stated["concept"])
    words.append(noun)
    if "count" in stated:
        return " ".join([COUNT_WORDS[count]] + words)
    return " ".join([article(words[0])] + words) if count == 1 else " ".join(words)


def background_phrase(stated: dict) -> str:
    words = [stated[a] for a in ("tone", "texture") if a in stated]
    return f" on a {' '.join(words)} background" if words else ""


def caption_text(stated: dict, picture_count: int, template: int, world: World = WORLD) -> str:
    """The caption stating `stated` (attribute -> value, the concept included) in template number `template` of
    world.caption_templates; the stated count, else the picture's, decides singular or plural."""
    count = stated.get("count", picture_count)
    return world.caption_templates[template].format(np=noun_phrase(stated, count, world), bg=background_phrase(stated),
                                                    be="is" if count == 1 else "are")


def stated_attributes(attributes: dict, mentions) -> dict:
    """attribute -> value for the mentioned attributes (what the caption states when it is right)."""
    return {a: attributes[a] for a in mentions}


def caption_for(attributes: dict, mentions, template: int, world: World = WORLD) -> str:
    """A caption that names `mentions` of `attributes` truthfully (the concept must be among them)."""
    return caption_text(stated_attributes(attributes, mentions), attributes["count"], template, world)
