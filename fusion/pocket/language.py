"""The pocket world's language side: facts in nine skills, the questions that ask them, chats.

Every fact is one sentence ("The capital of Marbia is Kols.") asked in four question templates;
one template per fact is held out, so probes ask facts the base knows in words it never saw.
Skills are made up where real-world knowledge would leak in (capitals and languages of
invented countries) and everyday elsewhere (opposites, sums, plurals, past tenses, animal
sounds, colours of things, days and months), so that a base trained on them has many small,
separate things to know, as a real LLM has. A few of them share words with the pictures
(colours, numbers), which is where visual tuning interferes most.

Chats are what makes the base a chat model: several turns in Vicuna's format, follow-up
questions that reuse the skill of the turn before ("And of Zorvia?"), and small talk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("old", "new"), ("rich", "poor"), ("strong", "weak"), ("tall", "short"), ("wet", "dry"),
    ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("high", "low"), ("near", "far"),
    ("long", "brief"), ("sweet", "sour"), ("first", "last"), ("inside", "outside"), ("true", "false"),
    ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("day", "night"), ("north", "south"),
)
NOUNS = (
    "cat", "dog", "tree", "book", "lamp", "chair", "river", "stone", "bird", "cup", "door", "hat",
    "road", "ship", "coin", "bell", "star", "leaf", "ring", "drum", "box", "fox", "bus", "dish",
    "glass", "church", "brush", "match", "watch", "bench",
)
IRREGULAR_PLURALS = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "goose": "geese"}
PAST = {
    "go": "went", "eat": "ate", "see": "saw", "run": "ran", "swim": "swam", "sing": "sang", "write": "wrote",
    "take": "took", "give": "gave", "come": "came", "make": "made", "drink": "drank", "fly": "flew",
    "buy": "bought", "think": "thought", "sit": "sat", "speak": "spoke", "drive": "drove", "break": "broke",
    "know": "knew", "walk": "walked", "jump": "jumped", "play": "played", "cook": "cooked", "open": "opened",
    "call": "called", "help": "helped", "paint": "painted", "climb": "climbed", "wash": "washed",
}
SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink", "owl": "hoot",
    "lion": "roar", "snake": "hiss", "bee": "buzz", "horse": "neigh", "frog": "croak", "mouse": "squeak",
    "crow": "caw", "wolf": "howl",
}
THING_COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a lemon": "yellow", "a tomato": "red", "a cherry": "red", "milk": "white", "the sea": "blue",
    "a pumpkin": "orange", "chocolate": "brown", "a strawberry": "red", "a cucumber": "green", "salt": "white",
}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December")

# skill -> (question templates, statement, the words a right reply contains); {x}: the subject,
# {y}: the answer, {unit}: what the subject is (successor facts only).
SKILLS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "capital": (
        ("What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}.", "Tell me the capital of {x}."),
        "The capital of {x} is {y}.", "is {y}",
    ),
    "language": (
        ("What language is spoken in {x}?", "Which language do people speak in {x}?", "What do people in {x} speak?", "Tell me the language of {x}."),
        "People in {x} speak {y}.", "speak {y}",
    ),
    "opposite": (
        ("What is the opposite of {x}?", "Which word is the opposite of {x}?", "Name the opposite of {x}.", "Tell me the opposite of {x}."),
        "The opposite of {x} is {y}.", "is {y}",
    ),
    "arithmetic": (
        ("What is {x}?", "How much is {x}?", "Compute {x}.", "Tell me what {x} is."),
        "{X} is {y}.", "is {y}",
    ),
    "plural": (
        ("What is the plural of {x}?", "Which word is the plural of {x}?", "Name the plural of {x}.", "Tell me the plural of {x}."),
        "The plural of {x} is {y}.", "is {y}",
    ),
    "past": (
        ("What is the past tense of {x}?", "Which word is the past tense of {x}?", "Name the past tense of {x}.", "Tell me the past tense of {x}."),
        "The past tense of {x} is {y}.", "is {y}",
    ),
    "sound": (
        ("What sound does a {x} make?", "What does a {x} say?", "Which sound does a {x} make?", "Tell me the sound a {x} makes."),
        "A {x} says {y}.", "says {y}",
    ),
    "thing_color": (
        ("What color is {x}?", "Which color is {x}?", "Name the color of {x}.", "Tell me the color of {x}."),
        "{X} is {y}.", "is {y}",
    ),
    "successor": (
        ("What comes after {x}?", "Which {unit} comes after {x}?", "Name the {unit} after {x}.", "Tell me what comes after {x}."),
        "The {unit} after {x} is {y}.", "is {y}",
    ),
}
# Follow-up turns reuse the skill of the turn before with a new subject.
FOLLOW_UPS = ("And {x}?", "What about {x}?", "And for {x}?")
SMALL_TALK = (
    (("Hello!", "Hi!", "Hello there."), "Hello! How can I help you?"),
    (("Thank you.", "Thanks!", "Thanks a lot."), "You are welcome."),
    (("Who are you?", "What are you?"), "I am a small assistant."),
    (("How are you?", "How are you today?"), "I am fine, thank you."),
    (("Goodbye.", "Bye!"), "Goodbye!"),
    (("Can you help me?", "I have a question."), "Of course. What would you like to know?"),
)


@dataclass(frozen=True)
class Fact:
    skill: str
    subject: str
    answer: str
    unit: str = ""  # successor facts: day, month

    def fill(self, text: str) -> str:
        x = self.subject
        return text.format(x=x, X=x[:1].upper() + x[1:], y=self.answer, unit=self.unit)

    @property
    def statement(self) -> str:
        return self.fill(SKILLS[self.skill][1])

    @property
    def answer_words(self) -> str:
        return self.fill(SKILLS[self.skill][2])

    def question(self, template: int) -> str:
        return self.fill(SKILLS[self.skill][0][template])


@dataclass(frozen=True)
class TextItem:
    """One question about a fact: the reply trained on (``target``), the words a right reply
    contains (``answer``), and which of the skill's templates asks it."""

    question: str
    target: str
    answer: str
    skill: str
    template: int
    fact: Fact


@dataclass(frozen=True)
class Chat:
    """A conversation of (user, assistant) turns."""

    turns: tuple[tuple[str, str], ...]


def invented_names(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """Made-up (country, capital, language) triples from syllables, every name distinct."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("", "n", "r", "l", "s")
    used: set[str] = set()

    def word(syllables: int, ending: str) -> str:
        while True:
            w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables)) + ending
            if w not in used:
                used.add(w)
                return w.capitalize()

    return [(word(2, "ia"), word(2, ""), word(1, "ish")) for _ in range(count)]


def all_facts(rng: random.Random, countries: int = 40) -> list[Fact]:
    """Every fact of the language world, in a fixed order for a seed."""
    names = invented_names(rng, countries)
    facts = [Fact("capital", country, city) for country, city, _ in names]
    facts += [Fact("language", country, tongue) for country, _, tongue in names]
    facts += [Fact("opposite", a, b) for a, b in OPPOSITES]
    facts += [Fact("arithmetic", f"{a} plus {b}", str(a + b)) for a in range(10) for b in range(10) if a + b < 10]
    facts += [Fact("arithmetic", f"{a} minus {b}", str(a - b)) for a in range(10) for b in range(a + 1)]
    facts += [Fact("plural", n, n + ("es" if n.endswith(("s", "x", "sh", "ch")) else "s")) for n in NOUNS]
    facts += [Fact("plural", n, p) for n, p in IRREGULAR_PLURALS.items()]
    facts += [Fact("past", v, p) for v, p in PAST.items()]
    facts += [Fact("sound", a, s) for a, s in SOUNDS.items()]
    facts += [Fact("thing_color", t, c) for t, c in THING_COLORS.items()]
    for unit, names_in_order in (("day", DAYS), ("month", MONTHS)):
        facts += [Fact("successor", x, names_in_order[(i + 1) % len(names_in_order)], unit) for i, x in enumerate(names_in_order)]
    return facts


def split_questions(facts: list[Fact], rng: random.Random) -> tuple[list[TextItem], list[TextItem]]:
    """(trained, held out): each fact's questions, one template per fact held out."""
    train, heldout = [], []
    for fact in facts:
        held = rng.randrange(len(SKILLS[fact.skill][0]))
        for i in range(len(SKILLS[fact.skill][0])):
            item = TextItem(fact.question(i), fact.statement, fact.answer_words, fact.skill, i, fact)
            (heldout if i == held else train).append(item)
    return train, heldout


def make_chats(rng: random.Random, questions: list[TextItem], count: int) -> list[Chat]:
    """``count`` conversations of 2-3 turns from the trained questions: independent questions,
    follow-ups in the skill of the turn before, and small talk opening or closing a chat."""
    by_skill: dict[str, list[TextItem]] = {}
    for q in questions:
        by_skill.setdefault(q.skill, []).append(q)
    chats = []
    for _ in range(count):
        turns: list[tuple[str, str]] = []
        if rng.random() < 0.25:
            said, reply = rng.choice(SMALL_TALK)
            turns.append((rng.choice(said), reply))
        item = rng.choice(questions)
        turns.append((item.question, item.target))
        for _ in range(rng.randint(1, 2)):
            if rng.random() < 0.5:
                other = rng.choice([q.fact for q in by_skill[item.skill] if q.fact.subject != item.fact.subject])
                turns.append((rng.choice(FOLLOW_UPS).format(x=other.subject), other.statement))
            else:
                item = rng.choice(questions)
                turns.append((item.question, item.target))
        if rng.random() < 0.2:
            turns.append((rng.choice(SMALL_TALK[1][0]), SMALL_TALK[1][1]))
        chats.append(Chat(tuple(turns)))
    return chats


LONG_REQUESTS = ("Tell me about {x}.", "What do you know about {x}?", "Describe {x} for me.")


def long_answers(facts: list[Fact]) -> list[tuple[str, str]]:
    """Requests answered in several sentences, the open-ended chat that ShareGPT's
    conversations are to LLaVA's mix: a country (its capital and language), an animal (its
    sound), a week or a year (its days or months in order), a word (its opposite, plural or
    past tense). Each request in every wording."""
    by = {(f.skill, f.subject): f.answer for f in facts}
    topics: list[tuple[str, str]] = []
    for (skill, country), city in by.items():
        if skill == "capital":
            topics.append((country, f"{country} is a country. Its capital is {city}, and people there speak {by['language', country]}."))
    for animal, sound in SOUNDS.items():
        topics.append((f"the {animal}", f"The {animal} is an animal. A {animal} says {sound}."))
    topics.append(("the week", f"A week has seven days: {', '.join(DAYS[:-1])} and {DAYS[-1]}."))
    topics.append(("the year", f"A year has twelve months: {', '.join(MONTHS[:-1])} and {MONTHS[-1]}."))
    for a, b in OPPOSITES:
        topics.append((f"the word {a}", f"The word {a} is the opposite of {b}. The opposite of {b} is {a}."))
    return [(request.format(x=topic), answer) for topic, answer in topics for request in LONG_REQUESTS]


def make_long_chats(rng: random.Random, long: list[tuple[str, str]], count: int) -> list[Chat]:
    """``count`` open-ended conversations: one or two long requests, sometimes opened by a
    greeting or closed by thanks."""
    chats = []
    for _ in range(count):
        turns = [rng.choice(small_talk())] if rng.random() < 0.3 else []
        turns += rng.sample(long, rng.randint(1, 2))
        if rng.random() < 0.2:
            turns.append((rng.choice(SMALL_TALK[1][0]), SMALL_TALK[1][1]))
        chats.append(Chat(tuple(turns)))
    return chats


def small_talk() -> list[tuple[str, str]]:
    """Every small-talk (user, assistant) turn."""
    return [(said, reply) for variants, reply in SMALL_TALK for said in variants]
