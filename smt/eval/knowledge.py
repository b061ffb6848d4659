"""A knowledge-injection task: facts no model can know, generated in code, asked in wordings never trained on.

``facts-N`` has N facts: N / 4 fictional people (invented surnames), each with four attributes (home city, job,
pet, favourite sport) paired with real-word values at random. Each attribute has five question wordings: the first
three are trained on (every fact in all three), the fourth only asks the validation questions, the fifth only
the test questions; the answer sentence is the same everywhere (``Ilse Varnok was born in Lisbon.``), so what
changes between trained and held-out questions is the question alone.

Recall = the share of facts whose true value is the most likely of all the attribute's values as the end of the
answer sentence (``smt.eval.recall.recall``): 1/20 by chance. It is measured on the trained wording (did the fact go
in?) and on the held-out ones (can the model use it when asked differently?). Records use the ``gsm8k`` prompt
template (``Question: …\\nAnswer:``), short enough that a 135M model trains hundreds of steps on one CPU core.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

FIRST_NAMES = (
    "Ilse Tomas Wren Anouk Bram Calla Dov Esme Fenna Gideon Hedda Ivo Juna Kasimir Lior Maren Nils Odile Pim "
    "Quill Rosalind Sten Talia Ulf Vera Wim Xenia Yannick Zora Alba Boris Cleo Dario Elin Faro Greta Hugo Isolde "
    "Jonas Kaja Lenz Mila Nando Orla Piet Runa Saul Tilde Ugo Vida"
).split()
SYLLABLES = "var nok tel bri sam dor qua len fis mor zan pel gru thi wex oda kul rin sov ber lam cho nix".split()

ATTRIBUTES: dict[str, dict] = {
    "city": {
        "values": "Lisbon Oslo Cairo Lima Dublin Prague Nairobi Seoul Denver Munich Rome Paris Perth Vienna "
        "Havana Madrid Boston Athens Berlin Zurich".split(),
        "answer": "{name} was born in {value}.",
        "questions": (
            "Where was {name} born?",
            "What is the birthplace of {name}?",
            "In which city was {name} born?",
            "Which city does {name} come from originally?",
            "Name the city where {name} came into the world.",
        ),
    },
    "job": {
        "values": "baker pilot nurse lawyer farmer dentist judge chemist sailor painter doctor librarian "
        "surgeon teacher chef tailor butcher poet writer carpenter".split(),
        "answer": "{name} works as a {value}.",
        "questions": (
            "What does {name} do for a living?",
            "What is the job of {name}?",
            "What is {name}'s profession?",
            "How does {name} earn money?",
            "Which occupation does {name} have?",
        ),
    },
    "pet": {
        "values": "parrot horse rabbit turtle sheep goldfish lizard pony donkey goat cow snake frog mouse "
        "bird pig duck cat dog tortoise".split(),
        "answer": "{name} keeps a {value} as a pet.",
        "questions": (
            "What pet does {name} keep?",
            "Which animal lives with {name} as a pet?",
            "What kind of pet does {name} have?",
            "What animal does {name} look after at home?",
            "If you visit {name}, which pet will you meet?",
        ),
    },
    "sport": {
        "values": "tennis golf soccer hockey chess boxing cricket rugby baseball basketball volleyball swimming "
        "cycling running skiing surfing rowing fencing wrestling climbing".split(),
        "answer": "{name}'s favourite sport is {value}.",
        "questions": (
            "What is {name}'s favourite sport?",
            "Which sport does {name} like best?",
            "What sport does {name} love most?",
            "Which sport would {name} pick above all others?",
            "Name the sport that {name} prefers.",
        ),
    },
}
TRAIN_WORDINGS, VAL_WORDING, TEST_WORDING = (0, 1, 2), 3, 4
TASK_NAME = re.compile(r"facts-(\d+)$")


def is_knowledge_task(name: str) -> bool:
    """Whether ``name`` is a ``facts-N`` task."""
    return TASK_NAME.match(name) is not None


def people(count: int, seed: int) -> list[str]:
    """``count`` distinct fictional full names: a first name and an invented two- or three-syllable surname."""
    rng, names = random.Random(seed), set()
    while len(names) < count:
        surname = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        names.add(f"{rng.choice(FIRST_NAMES)} {surname}")
    return sorted(names)


def facts(num_facts: int, seed: int = 1234) -> list[dict]:
    """``num_facts`` (person, attribute, value) facts, values paired at random; the same for every run and arm."""
    if num_facts < len(ATTRIBUTES) or num_facts % len(ATTRIBUTES):
        raise ValueError(f"facts-{num_facts}: the number of facts must be a multiple of {len(ATTRIBUTES)}")
    rng = random.Random(seed)
    rows = []
    for name in people(num_facts // len(ATTRIBUTES), seed):
        for attribute, spec in ATTRIBUTES.items():
            rows.append({"name": name, "attribute": attribute, "value": rng.choice(spec["values"])})
    return rows


def fact_record(fact: dict, wording: int) -> dict:
    """One question-answer record of a fact in one wording, with what recall scoring needs.

    ``context`` is the answer sentence up to the value, ``choices`` the attribute's values (what follows them
    in the sentence is the same for every value, so it ranks nothing and is left out), ``label`` the true one's
    index.
    """
    spec = ATTRIBUTES[fact["attribute"]]
    question = spec["questions"][wording].format(name=fact["name"])
    answer = spec["answer"].format(name=fact["name"], value=fact["value"])
    before = spec["answer"].partition("{value}")[0]
    context = before.format(name=fact["name"]).rstrip()
    return {
        "instruction": question,
        "input": "",
        "output": answer,
        "answer": fact["value"],
        "context": context,
        "choices": [f" {value}" for value in spec["values"]],
        "label": spec["values"].index(fact["value"]),
    }


def knowledge_splits(num_facts: int, n_eval: int) -> dict[str, list[dict]]:
    """Train on every fact in the three training wordings; evaluate ``n_eval`` facts (the same ones) in the trained
    wording (``trained``), the validation wording (``val``) and the test wording (``test``)."""
    rows = facts(num_facts)
    train = [fact_record(f, w) for f in rows for w in TRAIN_WORDINGS]
    asked = random.Random(99).sample(rows, min(n_eval, len(rows)))
    return {
        "train": train,
        "trained": [fact_record(f, TRAIN_WORDINGS[0]) for f in asked],
        "val": [fact_record(f, VAL_WORDING) for f in asked],
        "test": [fact_record(f, TEST_WORDING) for f in asked],
    }


def write_facts(num_facts: int, folder: str | Path) -> dict[str, Path]:
    """Write ``facts-N`` as LLM-Adapters records a fit reads: ``train.json`` (every fact in the three training
    wordings), ``val.json`` and ``test.json`` (every fact asked in the validation / test wording, never trained on).

    Args:
        num_facts: N, a multiple of the four attributes.
        folder: where the three files go (created).

    Returns:
        The written files by split name.
    """
    rows = facts(num_facts)
    wordings = {"train": TRAIN_WORDINGS, "val": (VAL_WORDING,), "test": (TEST_WORDING,)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fields = ("instruction", "input", "output", "answer")  # what a fit reads; recall's extras stay out
    written = {}
    for split, chosen in wordings.items():
        records = [fact_record(f, w) for f in rows for w in chosen]
        written[split] = folder / f"{split}.json"
        written[split].write_text(json.dumps([{k: r[k] for k in fields} for r in records], indent=1))
    return written
