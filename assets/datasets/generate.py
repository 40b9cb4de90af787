#!/usr/bin/env python3
"""Writes Finch's three demo datasets (train + held-out JSONL files) into this folder.

Each teaches one behaviour a 135M model picks up in minutes of LoRA on a CPU, and that is
visible at a glance in its answers:

  json_extract/    Alpaca rows: a sentence about a person -> exactly {"name": .., "age": .., "city": ..}
  pirate_persona/  messages rows: plain questions -> answers that open and close in pirate speak
  numbered_list/   Alpaca rows: a comma-separated list -> a numbered list, one capitalised item a line

The rows are composed from the word lists below with a fixed seed, so running this script again
reproduces the files byte for byte. Held-out rows use names, facts and items that never occur in
the training rows, so they measure the behaviour, not memorisation.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
rng = random.Random(20261121)


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- json_extract ---------------------------------------------------------------------------
NAMES = """Maria Jonas Aiko Pedro Fatima Liam Chen Olga Kwame Sofia Mateo Priya Hugo Ines Omar Elena
Tariq Nora Felix Amara Lucas Mei Yusuf Clara Diego Hana Ravi Lena Tomas Zara Emil Layla Bruno Ada
Kofi Greta Ivan Nadia Pablo Rosa Sven Tara Victor Wanda Xavier Yara Zeno Alma Boris Carmen""".split()
CITIES = """Lisbon Berlin Osaka Lima Cairo Dublin Shanghai Kyiv Accra Madrid Bogota Mumbai Lyon Porto
Tunis Athens Nairobi Oslo Vienna Lagos Toronto Hanoi Ankara Quito Seoul Pune Graz Minsk Dakar Riga
Bergen Tallinn Seville Krakow Malmo Leeds Perth Denver Austin Utrecht""".split()
HELDOUT_NAMES = "Anouk Bilal Cosima Dario Eitan Farah Gideon Halima Ilya Jorun Kenji Liesel Marek Nilufar Orla".split()
HELDOUT_CITIES = "Bruges Cusco Fez Gdansk Hobart Izmir Jaipur Kobe Leipzig Mombasa Nantes Oaxaca Plovdiv Quebec".split()
SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} moved to {city} last year. {name} is {age}.",
    "At {age}, {name} still enjoys walking around {city} every morning.",
    "Our new colleague {name} ({age}) works from the {city} office.",
    "{name}, aged {age}, was born and raised in {city}.",
    "The winner of the {city} marathon was {name}, who is {age} years old.",
    "{city} is home to {name}, who turned {age} this spring.",
    "I met {name} in {city}; {name} told me they are {age}.",
    "Age: {age}. Name: {name}. Hometown: {city}.",
]
INSTRUCTIONS = [
    "Extract the person's name, age and city as JSON.",
    "Return the name, age and city from the text as a JSON object.",
    "Read the text and give me name, age and city in JSON.",
]


def json_rows(names, cities, count):
    rows, seen = [], set()
    while len(rows) < count:
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 90)
        sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        if sentence in seen:
            continue
        seen.add(sentence)
        answer = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
        rows.append({"instruction": rng.choice(INSTRUCTIONS), "input": sentence, "output": answer})
    return rows


write(HERE / "json_extract" / "train.jsonl", json_rows(NAMES, CITIES, 200))
write(HERE / "json_extract" / "heldout.jsonl", json_rows(HELDOUT_NAMES, HELDOUT_CITIES, 40))

# --- pirate_persona -------------------------------------------------------------------------
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw",
    "Austria": "Vienna", "Chile": "Santiago", "Cuba": "Havana", "India": "New Delhi",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Turkey": "Ankara",
}
HELDOUT_CAPITALS = {"Belgium": "Brussels", "Denmark": "Copenhagen", "Ghana": "Accra",
                    "Colombia": "Bogota", "Nepal": "Kathmandu", "Morocco": "Rabat"}
SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "sheep": "bleats",
          "lion": "roars", "horse": "neighs", "owl": "hoots", "snake": "hisses", "pig": "oinks",
          "frog": "croaks", "bee": "buzzes", "wolf": "howls", "mouse": "squeaks"}
HELDOUT_SOUNDS = {"donkey": "brays", "goose": "honks", "crow": "caws", "dove": "coos"}
COLOURS = {"grass": "green", "the sky on a clear day": "blue", "snow": "white", "a ripe banana": "yellow",
           "coal": "black", "a ripe tomato": "red", "an orange": "orange", "milk": "white",
           "a lemon": "yellow", "a strawberry": "red", "the sea": "blue", "chocolate": "brown",
           "a carrot": "orange", "a lime": "green", "a raven": "black", "a plum": "purple"}
HELDOUT_COLOURS = {"a cucumber": "green", "a flamingo": "pink", "an eggplant": "purple", "butter": "yellow"}
OPENERS = ["Arr, matey!", "Ahoy there!", "Shiver me timbers!", "Yo ho, landlubber!", "Avast, me hearty!"]
CLOSERS = ["Now swab the deck!", "Yo ho ho!", "That be the truth of the seven seas.",
           "Arr, mark me words!", "Hoist the sails and remember it!"]


def pirate_facts(capitals, sounds, colours, numbers):
    facts = []
    for country, capital in capitals.items():
        facts.append((f"What is the capital of {country}?", f"The capital o' {country} be {capital}."))
    for animal, sound in sounds.items():
        facts.append((f"What sound does a {animal} make?", f"A {animal} {sound}, same as on any ship I sailed."))
    for thing, colour in colours.items():
        facts.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} be {colour}, plain as a gold doubloon."))
    for i, (a, b) in enumerate(numbers):
        if i % 4 == 3:
            facts.append((f"What is {a} times {b}?", f"{a} times {b} be {a * b} pieces o' eight."))
        else:
            facts.append((f"What is {a} plus {b}?", f"{a} plus {b} be {a + b} pieces o' eight."))
    return facts


train_numbers = [(a, b) for a in range(2, 15) for b in range(2, 11)]
rng.shuffle(train_numbers)
heldout_numbers = [(a, b) for a in range(15, 22) for b in range(11, 14)]
rng.shuffle(heldout_numbers)


def pirate_rows(facts, count):
    rows = []
    for question, answer in facts[:count]:
        text = f"{rng.choice(OPENERS)} {answer} {rng.choice(CLOSERS)}"
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": text}]})
    return rows


train_facts = pirate_facts(CAPITALS, SOUNDS, COLOURS, train_numbers[:120])
rng.shuffle(train_facts)
heldout_facts = pirate_facts(HELDOUT_CAPITALS, HELDOUT_SOUNDS, HELDOUT_COLOURS, heldout_numbers[:16])
rng.shuffle(heldout_facts)
write(HERE / "pirate_persona" / "train.jsonl", pirate_rows(train_facts, 176))
write(HERE / "pirate_persona" / "heldout.jsonl", pirate_rows(heldout_facts, 30))

# --- numbered_list --------------------------------------------------------------------------
ITEMS = """apples milk bread eggs butter rice pasta tomatoes onions garlic cheese yogurt coffee tea
sugar flour salt pepper carrots potatoes lettuce spinach bananas oranges lemons chicken beans lentils
oats honey jam cereal soap shampoo toothpaste sponges candles batteries stamps envelopes pencils
notebooks glue tape scissors string matches napkins""".split()
HELDOUT_ITEMS = """cucumbers mangoes walnuts raisins vinegar mustard ketchup tortillas noodles
paprika cinnamon crayons markers staples thumbtacks lightbulbs""".split()
LIST_INSTRUCTIONS = [
    "Turn this into a numbered list.",
    "Make a numbered list from these items.",
    "Rewrite the items as a numbered list, one per line.",
]


def list_rows(items, count):
    rows, seen = [], set()
    while len(rows) < count:
        k = rng.randint(2, 6)
        chosen = rng.sample(items, k)
        key = tuple(chosen)
        if key in seen:
            continue
        seen.add(key)
        sep = rng.choice([", ", ", ", ",", " , "])
        source = sep.join(chosen)
        answer = "\n".join(f"{i}. {item[0].upper() + item[1:]}" for i, item in enumerate(chosen, 1))
        rows.append({"instruction": rng.choice(LIST_INSTRUCTIONS), "input": source, "output": answer})
    return rows


write(HERE / "numbered_list" / "train.jsonl", list_rows(ITEMS, 200))
write(HERE / "numbered_list" / "heldout.jsonl", list_rows(HELDOUT_ITEMS, 40))

# --- pirate_preference ----------------------------------------------------------------------
# Preference pairs (the layout of the studio's votes.jsonl): the pirate answer is chosen over the
# plain answer to the same question. Its own random stream, so the files above stay unchanged.
pref_rng = random.Random(20261128)


def plain_facts(capitals, sounds, colours, numbers):
    facts = []
    for country, capital in capitals.items():
        facts.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                      f"The capital o' {country} be {capital}."))
    for animal, sound in sounds.items():
        facts.append((f"What sound does a {animal} make?", f"A {animal} {sound}.",
                      f"A {animal} {sound}, same as on any ship I sailed."))
    for thing, colour in colours.items():
        facts.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}.",
                      f"{thing[0].upper() + thing[1:]} be {colour}, plain as a gold doubloon."))
    for i, (a, b) in enumerate(numbers):
        if i % 4 == 3:
            facts.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}.",
                          f"{a} times {b} be {a * b} pieces o' eight."))
        else:
            facts.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.",
                          f"{a} plus {b} be {a + b} pieces o' eight."))
    return facts


def preference_rows(facts, count):
    rows = []
    for question, plain, pirate in facts[:count]:
        chosen = f"{pref_rng.choice(OPENERS)} {pirate} {pref_rng.choice(CLOSERS)}"
        rows.append({"prompt": question, "chosen": chosen, "rejected": plain})
    return rows


pref_train = plain_facts(CAPITALS, SOUNDS, COLOURS, train_numbers[:40])
pref_rng.shuffle(pref_train)
pref_heldout = plain_facts(HELDOUT_CAPITALS, HELDOUT_SOUNDS, HELDOUT_COLOURS, heldout_numbers[:8])
pref_rng.shuffle(pref_heldout)
write(HERE / "pirate_preference" / "train.jsonl", preference_rows(pref_train, 80))
write(HERE / "pirate_preference" / "heldout.jsonl", preference_rows(pref_heldout, 20))
