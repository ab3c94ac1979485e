"""Word lists and templates shared by the task generators and the zoo's training data.

Why one module: the zoo models are trained on exactly these templates and words, so the tasks built
for them are in-distribution; hub tokenizers (GPT-2/NeoX BPE) filter them to single-token words.
Templates are natural text (punctuation attached); the zoo's word-level tokenizer splits punctuation.
IOI templates follow Wang et al. 2022 (BABA; ABBA swaps the first-clause names); greater-than nouns
follow Hanna et al. 2023.
"""

from __future__ import annotations

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Sarah", "David", "James", "Emma", "Michael", "Laura",
    "Daniel", "Anna", "Paul", "Lisa", "Mark", "Kate", "Peter", "Susan", "Tom", "Jane",
    "Robert", "Amy", "Steven", "Rachel", "Kevin", "Helen", "Brian", "Grace", "Eric", "Julia",
    "Adam", "Linda", "Jason", "Karen", "Ryan", "Emily", "Scott", "Nancy", "Jack", "Rose",
)
PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

# [A] is the indirect object (answer), [B] the subject (repeated). Prompts end before the final [A].
IOI_BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)
IOI_ABBA_TEMPLATES: tuple[str, ...] = tuple(
    t.replace("[B] and [A]", "[TMP]").replace("[TMP]", "[A] and [B]", 1) for t in IOI_BABA_TEMPLATES
)

GREATER_THAN_TEMPLATE = "The [NOUN] lasted from the year [XX][YY] to the year [XX]"
GREATER_THAN_NOUNS: tuple[str, ...] = (
    "war", "deal", "expedition", "contract", "trip", "project", "campaign", "strike", "season", "journey",
    "reign", "siege", "drought", "famine", "boom", "crisis", "voyage", "treaty", "rebellion", "era",
)
