"""Build benchmarks/gateway/paraphrases.jsonl: query pairs for the semantic cache, per category half
paraphrases (same intent and slot values, another wording: must match) and half near-misses (same
intent, one slot changed: another entity, number or operation; the same wording half of the time:
must not match). Deterministic (fixed seed).

    python benchmarks/gateway/make_paraphrases.py
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

PAIRS_PER_CATEGORY = 100  # half match, half near-miss
SEED = 14


@dataclass(frozen=True)
class Intent:
    templates: tuple[str, ...]  # wordings of one question, slots in braces
    slots: dict[str, tuple[str, ...]]


def _numbers(lo: int, hi: int, n: int, seed: int) -> tuple[str, ...]:
    return tuple(str(x) for x in random.Random(seed).sample(range(lo, hi), n))


COUNTRIES = ("France", "Germany", "Spain", "Italy", "Japan", "Canada", "Australia", "Brazil", "Egypt",
             "Kenya", "Norway", "Peru", "Poland", "Turkey", "Vietnam", "Argentina", "Sweden", "Portugal")

CATEGORIES: dict[str, tuple[Intent, ...]] = {
    "factual": (
        Intent(("What is the capital of {country}?", "Which city is the capital of {country}?",
                "Tell me the capital city of {country}.", "Name the capital of {country}."),
               {"country": COUNTRIES}),
        Intent(("Who wrote {book}?", "Who is the author of {book}?", "Which writer wrote the novel {book}?",
                "{book} was written by whom?"),
               {"book": ("Pride and Prejudice", "Moby-Dick", "War and Peace", "The Great Gatsby", "Don Quixote",
                         "Dracula", "Frankenstein", "Jane Eyre", "Les Miserables", "The Brothers Karamazov",
                         "Crime and Punishment", "Wuthering Heights")}),
        Intent(("What is the chemical symbol for {element}?", "Which symbol stands for {element} on the periodic table?",
                "What is the element symbol of {element}?", "How is {element} abbreviated in chemistry?"),
               {"element": ("gold", "silver", "iron", "sodium", "potassium", "lead", "copper", "mercury", "tin",
                            "helium", "neon", "zinc")}),
        Intent(("How tall is {mountain}?", "What is the height of {mountain}?", "How high is {mountain}?",
                "What is the elevation of {mountain}?"),
               {"mountain": ("Mount Everest", "K2", "Mont Blanc", "Kilimanjaro", "Denali", "Mount Fuji", "Aconcagua",
                             "the Matterhorn", "Mount Elbrus", "Mount Kosciuszko")}),
        Intent(("Who invented the {invention}?", "Who is credited with inventing the {invention}?",
                "Which person came up with the {invention}?", "Who was the inventor of the {invention}?"),
               {"invention": ("telephone", "light bulb", "printing press", "steam engine", "radio", "airplane",
                              "telescope", "World Wide Web", "dynamite", "television")}),
        Intent(("What is the population of {city}?", "How many people live in {city}?",
                "How many inhabitants does {city} have?", "What's the number of residents of {city}?"),
               {"city": ("Tokyo", "Paris", "Lagos", "Mumbai", "Chicago", "Berlin", "Cairo", "Toronto", "Sydney",
                         "Madrid")}),
    ),
    "coding": (
        Intent(("How do I {op} a list in {lang}?", "What's the best way to {op} a list in {lang}?",
                "In {lang}, how can I {op} a list?", "Show me how to {op} a list using {lang}."),
               {"op": ("reverse", "sort", "copy", "shuffle", "filter", "flatten"),
                "lang": ("Python", "JavaScript", "Java", "Go", "Rust", "C++", "Ruby", "C#")}),
        Intent(("How do I convert a string to {target} in {lang}?", "What is the way to turn a string into {target} in {lang}?",
                "In {lang}, how do you parse a string as {target}?", "Converting a string to {target} in {lang}: how?"),
               {"target": ("an integer", "a float", "a date", "a byte array", "a list of characters", "a boolean"),
                "lang": ("Python", "JavaScript", "Java", "Go", "Rust", "C++")}),
        Intent(("How do I read a {fmt} file in {lang}?", "What's the easiest way to parse a {fmt} file with {lang}?",
                "How can I load a {fmt} file using {lang}?", "Reading a {fmt} file in {lang}, how is it done?"),
               {"fmt": ("CSV", "JSON", "YAML", "XML", "Parquet", "TOML"),
                "lang": ("Python", "JavaScript", "Java", "Go", "Rust", "R")}),
        Intent(("What causes a {err} in Python?", "Why am I getting a {err} in my Python code?",
                "What does a {err} mean in Python?", "Python raises {err}, why does that happen?"),
               {"err": ("KeyError", "IndexError", "ZeroDivisionError", "ModuleNotFoundError", "RecursionError",
                        "AttributeError", "UnicodeDecodeError", "FileNotFoundError")}),
        Intent(("How do I {gitop} in git?", "What's the git command to {gitop}?", "Using git, how can I {gitop}?",
                "Which git command lets me {gitop}?"),
               {"gitop": ("undo the last commit", "delete a local branch", "rename a branch", "create a new branch",
                          "revert a merge", "stash my changes", "squash the last three commits",
                          "change the last commit message", "delete a remote branch", "list all tags")}),
    ),
    "conversion": (
        Intent(("Convert {n} {units}.", "How many {to} is {n} {frm}?", "What is {n} {frm} in {to}?",
                "{n} {frm} equals how many {to}?"),
               {"n": _numbers(2, 500, 40, 1),
                "pair": ("kilometers|miles", "miles|kilometers", "pounds|kilograms", "kilograms|pounds",
                         "feet|meters", "inches|centimeters", "liters|gallons", "ounces|grams")}),
        Intent(("Convert {n} degrees {frm} to {to}.", "What is {n} degrees {frm} in {to}?",
                "How much is {n} degrees {frm} in {to}?", "{n} degrees {frm} is how many degrees {to}?"),
               {"n": _numbers(-40, 220, 40, 2),
                "pair": ("Fahrenheit|Celsius", "Celsius|Fahrenheit", "Celsius|Kelvin", "Kelvin|Celsius")}),
        Intent(("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Can you compute {a} {op} {b} for me?",
                "How much is {a} {op} {b}?"),
               {"a": _numbers(2, 1000, 40, 3), "b": _numbers(2, 100, 40, 4),
                "op": ("plus", "minus", "times", "divided by")}),
        Intent(("What is {p} percent of {n}?", "Calculate {p} percent of {n}.", "How much is {p}% of {n}?",
                "Find {p} percent of {n}."),
               {"p": _numbers(1, 100, 30, 5), "n": _numbers(10, 5000, 40, 6)}),
        Intent(("What is the {root} root of {n}?", "Compute the {root} root of {n}.", "Find the {root} root of {n}.",
                "What number is the {root} root of {n}?"),
               {"root": ("square", "cube", "fourth"), "n": _numbers(2, 10000, 40, 7)}),
    ),
    "support": (
        Intent(("How do I {task}?", "I need to {task}, how do I do that?", "What are the steps to {task}?",
                "Can you help me {task}?"),
               {"task": ("reset my password", "change my email address", "update my billing address",
                         "cancel my subscription", "delete my account", "update my phone number",
                         "change my username", "turn on two-factor authentication", "download my invoices",
                         "add a team member", "change my payment card", "upgrade my plan")}),
        Intent(("Where is my order {order}?", "Can you tell me the status of order {order}?",
                "I want to track my order {order}.", "Has my order {order} shipped yet?"),
               {"order": _numbers(10000, 99999, 30, 8)}),
        Intent(("How do I get a refund for {product}?", "Can I return {product} for a refund?",
                "What's the refund process for {product}?", "I want my money back for {product}, what do I do?"),
               {"product": ("my headphones", "a damaged laptop", "an unused gift card", "a concert ticket",
                            "a late pizza delivery", "a software license", "a broken phone case", "a hotel booking")}),
        Intent(("How long does shipping to {country} take?", "What is the delivery time to {country}?",
                "How many days until an order arrives in {country}?", "When will a package sent to {country} arrive?"),
               {"country": COUNTRIES}),
        Intent(("What is included in the {plan} plan?", "What features does the {plan} plan have?",
                "Tell me what I get with the {plan} plan.", "What does the {plan} plan come with?"),
               {"plan": ("Basic", "Pro", "Team", "Enterprise", "Student", "Family", "Starter", "Business")}),
        Intent(("Do you accept {method}?", "Can I pay with {method}?", "Is {method} a supported payment method?",
                "Is it possible to pay using {method}?"),
               {"method": ("PayPal", "Apple Pay", "Bitcoin", "bank transfer", "American Express", "Google Pay",
                           "Klarna", "cash on delivery")}),
    ),
    "chitchat": (
        Intent(("Tell me a joke about {topic}.", "Do you know any funny jokes about {topic}?",
                "Make me laugh with a joke about {topic}.", "I'd love to hear a joke about {topic}."),
               {"topic": ("cats", "dogs", "programmers", "pirates", "cows", "doctors", "penguins", "lawyers",
                          "coffee", "mathematicians")}),
        Intent(("Can you recommend a {thing} for a {occasion}?", "What {thing} would you suggest for a {occasion}?",
                "Suggest a good {thing} for a {occasion}.", "I need a {thing} for a {occasion}, any ideas?"),
               {"thing": ("movie", "book", "song", "board game", "recipe"),
                "occasion": ("rainy day", "long flight", "birthday party", "date night", "lazy Sunday")}),
        Intent(("I'm feeling {mood} today, any advice?", "What should I do when I feel {mood}?",
                "Any tips for when you're feeling {mood}?", "How can I cope with feeling {mood}?"),
               {"mood": ("stressed", "bored", "lonely", "tired", "anxious", "sad", "unmotivated", "overwhelmed")}),
        Intent(("What's your favorite {thing}?", "Do you have a favorite {thing}?", "Which {thing} do you like the most?",
                "If you had to pick one {thing}, which would be your favorite?"),
               {"thing": ("color", "season", "animal", "food", "movie genre", "sport", "planet", "number")}),
        Intent(("Tell me a fun fact about {topic}.", "Share an interesting fact about {topic}.",
                "Give me a cool piece of trivia about {topic}.", "What's something surprising about {topic}?"),
               {"topic": ("octopuses", "space", "the ocean", "honey bees", "volcanoes", "ancient Rome", "elephants",
                          "the human brain")}),
        Intent(("Write a short poem about {topic}.", "Compose a little poem about {topic}.",
                "Can you write me a brief poem on {topic}?", "I'd like a short poem about {topic}, please."),
               {"topic": ("the sea", "autumn", "friendship", "the moon", "a lighthouse", "coffee", "the city at night")}),
    ),
}


def _render(template: str, fill: dict[str, str]) -> str:
    """Fill a template; a ``pair`` slot ("a|b") gives ``{frm}``, ``{to}`` and ``{units}`` ("a to b")."""
    values = dict(fill)
    if "pair" in fill:
        frm, to = fill["pair"].split("|")
        values.update(frm=frm, to=to, units=f"{frm} to {to}")
    return template.format(**values)


def make_pairs(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    for category, intents in CATEGORIES.items():
        seen: set[tuple[str, str]] = set()
        for match in [True] * (PAIRS_PER_CATEGORY // 2) + [False] * (PAIRS_PER_CATEGORY // 2):
            while True:
                intent = rng.choice(intents)
                fill = {slot: rng.choice(values) for slot, values in intent.slots.items()}
                t_candidate = rng.randrange(len(intent.templates))
                if match:
                    t_query, query_fill = rng.choice([t for t in range(len(intent.templates)) if t != t_candidate]), fill
                else:  # one slot changed; the same wording half of the time
                    slot = rng.choice(sorted(intent.slots))
                    query_fill = {**fill, slot: rng.choice([v for v in intent.slots[slot] if v != fill[slot]])}
                    t_query = t_candidate if rng.random() < 0.5 else rng.randrange(len(intent.templates))
                query = _render(intent.templates[t_query], query_fill)
                candidate = _render(intent.templates[t_candidate], fill)
                if (query, candidate) not in seen and (candidate, query) not in seen:
                    seen.add((query, candidate))
                    break
            rows.append({"category": category, "query": query, "candidate": candidate, "match": match})
    return rows


def main() -> None:
    out = Path(__file__).with_name("paraphrases.jsonl")
    rows = make_pairs()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out}: {len(rows)} pairs, {len(CATEGORIES)} categories, "
          f"{sum(r['match'] for r in rows)} paraphrases, {sum(not r['match'] for r in rows)} near-misses")


if __name__ == "__main__":
    main()
