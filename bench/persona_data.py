"""The fixed data of bench/personalization_quality.py: personas and a small QA set.

Every persona answers the same eight training questions, each with the correct answer in
its own style; its style is a marker a regular expression finds. The QA set (40 common-
knowledge questions, accepted answers as lower-case substrings) shares no question and no
answer with the training questions, so answering it takes the base model's knowledge,
not the persona's examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (question, the correct answer in plain words)
TRAINING_QUESTIONS = (
    ("What is the capital of Spain?", "Madrid is the capital of Spain."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("What color is a ripe banana?", "A ripe banana is yellow."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies."),
    ("Give me a tip for staying healthy.", "Drink plenty of water and get enough sleep."),
    ("What is the highest mountain in Africa?", "Mount Kilimanjaro is the highest mountain in Africa."),
)


@dataclass(frozen=True)
class Persona:
    name: str
    template: str  # "{answer}" marks where the plain answer goes
    marker: str  # a regular expression (case-insensitive) that finds the style in a reply

    def examples(self) -> list[dict]:
        return [{"prompt": q, "completion": self.template.format(answer=a)} for q, a in TRAINING_QUESTIONS]

    def has_style(self, text: str) -> bool:
        return re.search(self.marker, text, re.IGNORECASE) is not None


PERSONAS = (
    Persona("robot", "Beep boop. {answer}", r"beep[ ,-]*boop"),
    Persona("pirate", "Arr, matey! {answer}", r"\barr+\b"),
    Persona("teacher", "Great question! {answer}", r"great question"),
    Persona("helper", "{answer} Hope that helps!", r"hope (that|this) helps"),
)

# (question, accepted answers: a reply is right when it contains one of them, lower-cased)
QA = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of England?", ("london",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("How many days are in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many continents are there?", ("seven", "7")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color is grass?", ("green",)),
    ("What do bees make?", ("honey",)),
    ("What do cows drink?", ("water",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("What planet do we live on?", ("earth",)),
    ("What is the freezing point of water in Celsius?", ("0", "zero")),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("Who painted the Mona Lisa?", ("leonardo", "da vinci")),
    ("What is the chemical formula of water?", ("h2o", "h₂o")),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2", "co₂")),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("What is the opposite of hot?", ("cold",)),
    ("What animal is known as the king of the jungle?", ("lion",)),
    ("What is the main language spoken in Brazil?", ("portuguese",)),
    ("Which star is at the center of our solar system?", ("sun",)),
    ("What do you call a baby cat?", ("kitten",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is the longest river in Africa?", ("nile",)),
    ("Which country is home to the kangaroo?", ("australia",)),
    ("Which metal is liquid at room temperature?", ("mercury",)),
    ("How many sides does a triangle have?", ("three", "3")),
    ("What is the currency of the United States?", ("dollar",)),
    ("Who was the first president of the United States?", ("washington",)),
    ("In which country are the pyramids of Giza?", ("egypt",)),
    ("What is frozen water called?", ("ice",)),
)


def is_correct(reply: str, accepted: tuple[str, ...]) -> bool:
    text = reply.lower()
    return any(a in text for a in accepted)
