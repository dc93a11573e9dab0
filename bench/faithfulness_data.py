"""Generated items for bench/faithfulness.py: subject–verb agreement and indirect-object identification.

Two tasks whose right answer hangs on one earlier word, so an attribution measure can be scored on whether
it points at that word (the *evidence*):

  agreement  Linzen et al. 2016 / Marvin & Linzen 2018: "The keys to the old cabinet" -> " are" (foil
             " is"); the verb's number is the subject noun's, across 0–3 *attractors* — nouns of the
             opposite number in prepositional phrases or an object relative clause ("that the guard likes").
             Evidence: the subject noun.
  ioi        Wang et al. 2022: "When Mary and John went to the store, John gave a drink to" -> " Mary"
             (foil " John"). Evidence: the indirect object's mention in the first clause.

Every word list and template exists once per split, and the splits share none of them (checked at import),
so nothing chosen on `train` has seen a `test` noun, name or frame. No downloads: the items are drawn by a
seeded generator, ``make_dataset(task, split, n, seed)``, and kept only if target and foil are each one token
of SmolLM2's tokenizer (with their leading space) and the evidence word maps to token positions.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

TASKS = ("agreement", "ioi")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Item:
    """One prompt. ``evidence_span`` is the evidence word's [start, end) in ``text``; ``evidence_positions``
    are the token positions covering it (every piece when the word is split into several tokens)."""

    task: str
    text: str
    target: str  # with its leading space, e.g. " are"
    foil: str
    evidence_word: str
    evidence_span: tuple[int, int]
    evidence_positions: tuple[int, ...]
    template: str  # which frame made it: splits share none
    attractors: int | None = None  # agreement only: opposite-number nouns between subject and verb


# -- vocabulary: subject–verb agreement --------------------------------------------------------------------

# (singular, plural); a few irregular plurals in each split so "-s" is not the only cue.
NOUNS = {
    "train": [
        ("key", "keys"), ("cabinet", "cabinets"), ("book", "books"), ("letter", "letters"), ("table", "tables"),
        ("window", "windows"), ("door", "doors"), ("car", "cars"), ("bottle", "bottles"),
        ("picture", "pictures"), ("report", "reports"), ("plan", "plans"), ("road", "roads"),
        ("bridge", "bridges"), ("tower", "towers"), ("garden", "gardens"), ("lamp", "lamps"), ("box", "boxes"),
        ("dish", "dishes"), ("church", "churches"), ("story", "stories"), ("city", "cities"),
        ("knife", "knives"), ("leaf", "leaves"), ("man", "men"), ("child", "children"), ("author", "authors"),
        ("friend", "friends"), ("painting", "paintings"), ("computer", "computers"), ("phone", "phones"),
        ("chair", "chairs"), ("ship", "ships"), ("engine", "engines"), ("coin", "coins"),
        ("flower", "flowers"), ("tree", "trees"), ("river", "rivers"), ("house", "houses"), ("shoe", "shoes"),
        ("song", "songs"), ("ticket", "tickets"), ("idea", "ideas"), ("girl", "girls"), ("dog", "dogs"),
    ],
    "test": [
        ("map", "maps"), ("desk", "desks"), ("bag", "bags"), ("wall", "walls"), ("bike", "bikes"),
        ("cup", "cups"), ("clock", "clocks"), ("photo", "photos"), ("rule", "rules"), ("gate", "gates"),
        ("path", "paths"), ("tent", "tents"), ("shelf", "shelves"), ("wolf", "wolves"), ("woman", "women"),
        ("mouse", "mice"), ("foot", "feet"), ("baby", "babies"), ("party", "parties"), ("glass", "glasses"),
        ("bus", "buses"), ("boat", "boats"), ("stone", "stones"), ("card", "cards"), ("poem", "poems"),
        ("game", "games"), ("horse", "horses"), ("cat", "cats"), ("bird", "birds"), ("machine", "machines"),
        ("lake", "lakes"), ("hill", "hills"), ("farm", "farms"), ("shop", "shops"), ("room", "rooms"),
        ("street", "streets"), ("egg", "eggs"), ("apple", "apples"), ("guest", "guests"), ("uncle", "uncles"),
        ("sister", "sisters"), ("brother", "brothers"), ("village", "villages"), ("letterbox", "letterboxes"),
        ("blanket", "blankets"),
    ],
}
# People who can be the subject of the relative clause's verb ("that the guards like").
AGENTS = {
    "train": [("guard", "guards"), ("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"),
              ("pilot", "pilots"), ("lawyer", "lawyers"), ("nurse", "nurses"), ("student", "students"),
              ("singer", "singers"), ("soldier", "soldiers"), ("driver", "drivers"), ("baker", "bakers"),
              ("painter", "painters"), ("officer", "officers"), ("visitor", "visitors")],
    "test": [("manager", "managers"), ("dancer", "dancers"), ("chef", "chefs"), ("judge", "judges"),
             ("sailor", "sailors"), ("coach", "coaches"), ("actor", "actors"), ("waiter", "waiters"),
             ("player", "players"), ("worker", "workers"), ("scientist", "scientists"), ("banker", "bankers"),
             ("poet", "poets"), ("clerk", "clerks"), ("reporter", "reporters")],
}
# The relative clause's own verb agrees with its attractor: (plural form, singular form).
RC_VERBS = {
    "train": [("like", "likes"), ("know", "knows"), ("hate", "hates"), ("remember", "remembers"),
              ("describe", "describes")],
    "test": [("admire", "admires"), ("mention", "mentions"), ("want", "wants"), ("praise", "praises"),
             ("recommend", "recommends")],
}
PREPOSITIONS = {"train": ["to", "near", "behind", "for", "of", "on"],
                "test": ["beside", "with", "above", "under", "from", "in"]}
ADJECTIVES = {"train": ["old", "new", "small", "big", "red", "famous"],
              "test": ["large", "blue", "broken", "tiny", "green", "strange"]}
# Sentence openings, number-neutral; "" starts with "The".
PREFIXES = {"train": ["", "It seems that ", "Apparently, ", "As expected, ", "In fact, "],
            "test": ["", "Everyone says that ", "Sadly, ", "Of course, ", "To be honest, "]}
# Number-neutral adverbs between the noun phrase and the verb ("The keys surely are"): they end every
# attractor-free prompt, so the evidence (the subject) is never the last token — the deletion tests always
# keep the last token, and every measure would otherwise be handed the evidence for free.
ADVERBS = {"train": ["certainly", "probably", "clearly", "really", "also"],
           "test": ["surely", "definitely", "still", "indeed", "truly"]}
# (singular, plural) verb forms the model chooses between.
VERB_PAIRS = [(" is", " are"), (" was", " were"), (" has", " have")]

# -- vocabulary: indirect-object identification ------------------------------------------------------------

# Common first names, each one token with a leading space in SmolLM2's tokenizer (checked when the list was
# written; the one-token filter below still guards it). Names that are also common words (Will, Mark, Grace)
# are left out so the target is unambiguously a name.
NAMES = {
    "train": ("Mary John James Robert Michael William David Richard Joseph Thomas Charles Daniel Matthew Anthony "
              "Paul Steven Andrew Kevin Brian George Edward Ronald Jason Ryan Jacob Eric Patricia Jennifer Linda "
              "Elizabeth Barbara Susan Jessica Sarah Karen Nancy Lisa Betty Margaret Sandra Ashley Emily Michelle "
              "Dorothy Carol Amanda Melissa Rebecca Laura Sharon").split(),
    "test": ("Jonathan Stephen Larry Justin Scott Frank Raymond Gregory Samuel Benjamin Patrick Jack Dennis Jerry "
             "Alexander Tyler Henry Adam Peter Nathan Walter Harold Arthur Roger Keith Kathleen Amy Angela Helen "
             "Anna Nicole Emma Samantha Katherine Christine Rachel Catherine Janet Ruth Maria Heather Diane Julie "
             "Victoria Olivia Kelly Lauren Hannah Martha Alice").split(),
}
PLACES = {
    "train": ("store park office school beach market station library kitchen garden restaurant hospital museum "
              "church bakery theater airport farm hotel gym").split(),
    "test": ("cafe zoo harbor stadium bank studio lake mall bar camp forest castle village temple factory clinic "
             "hall pool island cinema").split(),
}
OBJECTS = {
    "train": "drink book ball pen gift letter key bag hat cake phone ring map basket camera coin cup shirt toy "
             "flower".split(),
    "test": "apple bottle card box watch ticket sandwich necklace pencil umbrella towel candle plate guitar "
            "jacket lamp orange photo note kite".split(),
}
# {a}, {b}: the two names of the first clause (IO and S in either order); {s}: the subject again; {obj}: an
# object with its article. Every template ends right before the indirect object.
IOI_TEMPLATES = {
    "train": [
        "When {a} and {b} went to the {place}, {s} gave {obj} to",
        "After {a} and {b} arrived at the {place}, {s} handed {obj} to",
        "While {a} and {b} were working at the {place}, {s} passed {obj} to",
        "Then, {a} and {b} had a long day at the {place}. {s} gave {obj} to",
        "Yesterday {a} and {b} met at the {place}, and {s} showed {obj} to",
        "When {a} and {b} got back from the {place}, {s} threw {obj} to",
        "Since {a} and {b} were bored at the {place}, {s} sent {obj} to",
        "Before {a} and {b} left the {place}, {s} brought {obj} to",
    ],
    "test": [
        "Friends {a} and {b} found {obj} at the {place}. {s} gave it to",
        "After the lunch, {a} and {b} went to the {place}. {s} offered {obj} to",
        "The {place} was quiet when {a} and {b} arrived, so {s} handed {obj} to",
        "On Monday {a} and {b} visited the {place}, where {s} lent {obj} to",
        "Once {a} and {b} reached the {place}, {s} tossed {obj} to",
        "As {a} and {b} sat in the {place}, {s} passed {obj} to",
        "Later that day {a} and {b} cleaned the {place}, and {s} returned {obj} to",
    ],
}


def _words(tables: list[dict], split: str) -> set[str]:
    """Every word of ``split`` in ``tables``, pairs flattened (a template counts as one string)."""
    out = set()
    for table in tables:
        for entry in table[split]:
            out.update(entry if isinstance(entry, tuple) else [entry])
    return out


def _check_disjoint() -> None:
    """Fail at import if a word or template of a task is in both splits: the test items must be unseen."""
    for task, tables in [("agreement", [NOUNS, AGENTS, RC_VERBS, PREPOSITIONS, ADJECTIVES, ADVERBS]),
                         ("ioi", [NAMES, PLACES, OBJECTS, IOI_TEMPLATES])]:
        shared = _words(tables, "train") & _words(tables, "test")
        if shared:
            raise AssertionError(f"{task}: {sorted(shared)} in both train and test")
    # The openings share only "" (no opening at all), which has no words to leak.
    if set(PREFIXES["train"]) & set(PREFIXES["test"]) != {""}:
        raise AssertionError("PREFIXES share more than the empty opening")


_check_disjoint()


# -- generators: one raw item (text, target, foil, evidence word, its span, template, attractors) ---------

def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _agreement_raw(rng: random.Random, split: str, n_attr: int, plural: bool) -> tuple:
    """A subject noun phrase followed by ``n_attr`` attractors of the other number, then maybe an adverb."""
    sg, pl = rng.choice(NOUNS[split])
    subject = pl if plural else sg
    prefix = rng.choice(PREFIXES[split])
    head = f"{prefix}{'the' if prefix else 'The'} "
    adj = f"{rng.choice(ADJECTIVES[split])} " if rng.random() < 0.3 else ""
    start = len(head) + len(adj)
    text, kinds = head + adj + subject, []
    # At most one relative clause, and last: after it a further phrase would attach to its verb.
    n_rc = 1 if n_attr and rng.random() < 0.35 else 0
    for _ in range(n_attr - n_rc):
        a_sg, a_pl = rng.choice([p for p in NOUNS[split] if sg not in p])
        a_adj = f"{rng.choice(ADJECTIVES[split])} " if rng.random() < 0.3 else ""
        text += f" {rng.choice(PREPOSITIONS[split])} the {a_adj}{a_sg if plural else a_pl}"
        kinds.append("pp")
    if n_rc:
        g_sg, g_pl = rng.choice(AGENTS[split])
        v_pl, v_sg = rng.choice(RC_VERBS[split])
        text += f" that the {g_sg} {v_sg}" if plural else f" that the {g_pl} {v_pl}"
        kinds.append("rc")
    if n_attr == 0 or rng.random() < 0.5:
        text += f" {rng.choice(ADVERBS[split])}"
        kinds.append("adv")
    v_sg, v_pl = rng.choice(VERB_PAIRS)
    target, foil = (v_pl, v_sg) if plural else (v_sg, v_pl)
    template = f"{split}p{PREFIXES[split].index(prefix)}:" + "+".join(["np", *kinds])
    return text, target, foil, subject, (start, start + len(subject)), template, n_attr


def _ioi_raw(rng: random.Random, split: str, io_first: bool) -> tuple:
    """One IOI sentence; ``io_first`` alternates the ABBA / BABA orders of Wang et al."""
    t = rng.randrange(len(IOI_TEMPLATES[split]))
    io, s = rng.sample(NAMES[split], 2)
    a, b = (io, s) if io_first else (s, io)
    fields = dict(a=a, b=b, s=s, place=rng.choice(PLACES[split]), obj=_article(rng.choice(OBJECTS[split])))
    text = IOI_TEMPLATES[split][t].format(**fields)
    # The first clause's mention of the IO: the template writes {a} before {b}, each once, before {s}.
    before = IOI_TEMPLATES[split][t].split("{a}" if io_first else "{b}")[0].format(**fields)
    start = len(before)
    return text, " " + io, " " + s, io, (start, start + len(io)), f"{split}{t}:{'ABBA' if io_first else 'BABA'}", None


# -- the one-token filter and the dataset ----------------------------------------------------------------

@lru_cache(maxsize=1)
def _smollm2_tokenizer():
    import qkv

    return qkv.load("smollm2", dtype="float32").tokenizer


def _evidence_positions(tokenizer, text: str, span: tuple[int, int]) -> tuple[int, ...]:
    """Token positions whose characters overlap ``span`` (all the pieces of a word split into several)."""
    ids, offsets, special = tokenizer.encode_with_offsets(text)
    a, b = span
    return tuple(i for i, (s, e) in enumerate(offsets) if not special[i] and s < b and e > a)


def _one_token(tokenizer, piece: str) -> bool:
    return len(tokenizer.encode(piece, add_bos=False)) == 1


def build(task: str, split: str, n: int, seed: int, tokenizer=None) -> tuple[list[Item], Counter]:
    """``n`` items and a count of what was drawn and why some were dropped (reasons as keys)."""
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS}, got {task!r}, {split!r}")
    tokenizer = tokenizer or _smollm2_tokenizer()
    rng = random.Random(f"{task}/{split}/{seed}")  # str seeds hash stably across runs and processes
    items, seen, stats = [], set(), Counter()
    while len(items) < n:
        if stats["drawn"] >= 50 * n + 100:
            raise RuntimeError(f"{task}/{split}: only {len(items)} of {n} items survive the filters ({dict(stats)})")
        i = stats["drawn"]
        stats["drawn"] += 1
        raw = (_agreement_raw(rng, split, i % 4, (i // 4) % 2 == 1) if task == "agreement"
               else _ioi_raw(rng, split, i % 2 == 0))  # balanced: attractor counts, numbers, name orders
        item = _keep(tokenizer, task, raw, seen, stats)
        if item is not None:
            items.append(item)
    return items, stats


def _keep(tokenizer, task: str, raw: tuple, seen: set, stats: Counter) -> Item | None:
    text, target, foil, word, span, template, n_attr = raw
    if (text, target, foil) in seen:
        stats["dropped: duplicate"] += 1
        return None
    if not (_one_token(tokenizer, target) and _one_token(tokenizer, foil)):
        stats["dropped: target or foil not one token"] += 1
        return None
    positions = _evidence_positions(tokenizer, text, span)
    n_tokens = len(tokenizer.encode(text))
    if not positions or positions[-1] == n_tokens - 1:
        stats["dropped: evidence not mapped (or last token)"] += 1
        return None
    seen.add((text, target, foil))
    return Item(task, text, target, foil, word, span, positions, template, n_attr)


def make_dataset(task: str, split: str, n: int, seed: int, tokenizer=None) -> list[Item]:
    """``n`` seeded items of ``task`` ("agreement" or "ioi") from ``split`` ("train" or "test"). The tokenizer
    defaults to SmolLM2's (the model is loaded once to get it)."""
    return build(task, split, n, seed, tokenizer)[0]
