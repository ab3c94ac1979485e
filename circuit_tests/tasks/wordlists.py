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

# Gendered pronoun (Mathwin et al. 2023 / Tigges' gender-pronoun.csv): "So [NAME] is [PREDICATE], isn't" -> he/she.
GENDER_FEMALE_NAMES: tuple[str, ...] = ("Judy", "Julie", "Amy", "Lisa", "Sarah", "Anna", "Mary", "Susan", "Karen", "Carol")
GENDER_MALE_NAMES: tuple[str, ...] = ("Jack", "Mark", "John", "Joe", "Sean", "Paul", "Ryan", "David", "Gary", "Carl")
GENDER_PREDICATES: tuple[str, ...] = (
    "such a good cook", "a very good athlete", "a really great friend", "a really nice person", "such a funny person",
)
GENDER_TEMPLATE = "So [NAME] is [PREDICATE], isn't"
GENDER_PRONOUNS: tuple[str, str] = ("she", "he")  # (female, male); the answer follows the prompt after a space

# Subject-verb agreement (Marvin & Linzen 2018 style): the prompt ends just before the main verb, whose
# number must agree with [SUBJ]; [ATTR] is an attractor noun of either number and [RELV] (object
# relative clause) agrees with [ATTR]. Pairs are (singular, plural).
SVA_TEMPLATES: tuple[str, ...] = (
    "The [SUBJ]",
    "The [SUBJ] near the [ATTR]",
    "The [SUBJ] behind the [ATTR]",
    "The [SUBJ] next to the [ATTR]",
    "The [SUBJ] with the [ATTR]",
    "The [SUBJ] that the [ATTR] [RELV]",
)
SVA_NOUNS: tuple[tuple[str, str], ...] = (
    ("author", "authors"), ("pilot", "pilots"), ("surgeon", "surgeons"), ("farmer", "farmers"),
    ("manager", "managers"), ("customer", "customers"), ("officer", "officers"), ("teacher", "teachers"),
    ("senator", "senators"), ("dancer", "dancers"), ("doctor", "doctors"), ("guard", "guards"),
    ("nurse", "nurses"), ("student", "students"), ("artist", "artists"), ("lawyer", "lawyers"),
)
SVA_VERBS: tuple[tuple[str, str], ...] = (
    ("is", "are"), ("was", "were"), ("has", "have"), ("laughs", "laugh"), ("smiles", "smile"),
    ("swims", "swim"), ("sleeps", "sleep"), ("runs", "run"), ("works", "work"), ("writes", "write"),
)
SVA_REL_VERBS: tuple[tuple[str, str], ...] = (("likes", "like"), ("knows", "know"), ("hates", "hate"), ("admires", "admire"))

# Colored objects (Merullo et al. 2023, after Ippolito & Callison-Burch): one in-context example + a query,
# "Q: On the [SURFACE], [PRESENTER] a [COLOR] [OBJ], a [COLOR] [OBJ], and a [COLOR] [OBJ]. What color is
# the [OBJ]?\nA: [Color]". The answer is the title-case color after a space.
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black")
COLORED_OBJECTS: tuple[str, ...] = (
    "pencil", "necklace", "lighter", "textbook", "puzzle", "cup", "book", "ball", "key",
    "hat", "phone", "plate", "bowl", "shoe", "bag", "pen", "box",
)
COLOR_ANSWERS: tuple[str, ...] = tuple(c.title() for c in COLORS)  # " Red": the answer tokens
COLORED_ARTICLES: tuple[str, ...] = ("a", "an")  # "an orange cup"
COLORED_SURFACES: tuple[str, ...] = ("table", "desk", "floor")
COLORED_PRESENTERS: tuple[str, ...] = ("there is", "you see", "I see")
# One question: [A*] articles (a/an), [C*] colors, [O*] objects, [Q] the queried object. A prompt is one
# answered example ("... A: Blue\n") followed by an unanswered question.
COLORED_QUESTION = ("Q: On the [SURF], [PRES] [A1] [C1] [O1], [A2] [C2] [O2], and [A3] [C3] [O3]. "
                    "What color is the [Q]?\nA:")
