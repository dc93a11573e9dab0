"""The built-in tasks: correct targets, seeded, splits that never overlap."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from qkv.errors import ConfigError, InputError
from qkv.train.tasks import BOS, EOS, PAD, TASKS, CharVocab, make_task, split_of

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def parse_date(src: str) -> dt.date:
    """An independent reader of the six spellings (regexes, not the generator's format strings)."""
    if m := re.fullmatch(r"(\d{2})[/.](\d{2})[/.](\d{4})", src):
        return dt.date(int(m[3]), int(m[2]), int(m[1]))
    if m := re.fullmatch(r"(\d{1,2}) ([A-Za-z]+) (\d{4})", src):
        day, month, year = m[1], m[2], m[3]
    elif m := re.fullmatch(r"([A-Za-z]+) (\d{1,2}), (\d{4})", src):
        month, day, year = m[1], m[2], m[3]
    else:
        raise AssertionError(f"unexpected date spelling {src!r}")
    number = next(i + 1 for i, name in enumerate(MONTHS) if name == month or name[:3] == month)
    return dt.date(int(year), number, int(day))


SPELLINGS = {r"\d{1,2} [A-Z][a-z]{3,8} \d{4}": "23 November 2026", r"\d{1,2} [A-Z][a-z]{2} \d{4}": "23 Nov 2026",
             r"[A-Z][a-z]{2} \d{1,2}, \d{4}": "Nov 23, 2026", r"[A-Z][a-z]{3,8} \d{1,2}, \d{4}": "November 23, 2026",
             r"\d{2}/\d{2}/\d{4}": "23/11/2026", r"\d{2}\.\d{2}\.\d{4}": "23.11.2026"}


def test_date_targets_are_the_iso_date_of_the_source():
    data = make_task("date", n_train=600, n_val=60, n_test=60)
    seen = set()
    for src, tgt in data.train + data.val + data.test:
        assert parse_date(src).isoformat() == tgt
        seen |= {example for pattern, example in SPELLINGS.items() if re.fullmatch(pattern, src)}
    assert seen == set(SPELLINGS.values())  # all six spellings occur (May is both short and long)
    assert all(parse_date(example) == dt.date(2026, 11, 23) for example in SPELLINGS.values())


@pytest.mark.parametrize("task, check", [("reverse", lambda s, t: t == s[::-1]),
                                         ("sort", lambda s, t: t == "".join(sorted(s)))])
def test_reverse_and_sort_targets(task, check):
    data = make_task(task, n_train=500, n_val=50, n_test=50, max_len=7)
    for src, tgt in data.train + data.val + data.test:
        assert check(src, tgt) and 1 <= len(src) <= 7


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_never_overlap_whatever_the_seed(task):
    a = make_task(task, seed=1, n_train=800, n_val=100, n_test=100)
    b = make_task(task, seed=2, n_train=800, n_val=100, n_test=100)
    key = (lambda s, t: t) if task == "date" else (lambda s, t: s)  # a date's every spelling shares a split
    for x in (a, b):
        for y in (a, b):
            tr = {key(*p) for p in x.train}
            assert tr.isdisjoint(key(*p) for p in y.val) and tr.isdisjoint(key(*p) for p in y.test)
            assert {key(*p) for p in x.val}.isdisjoint(key(*p) for p in y.test)
    assert len({s for s, _ in a.train}) == len(a.train)  # distinct examples
    assert a.train != b.train  # the seed chooses the examples ...
    assert all(split_of(key(*p)) == "train" for p in b.train)  # ... never their split


def test_same_seed_same_data():
    assert make_task("sort", seed=5, n_train=300) == make_task("sort", seed=5, n_train=300)


def test_vocab_round_trip_and_specials():
    v = CharVocab("abc")
    assert (PAD, BOS, EOS) == (0, 1, 2) and v.size == 6
    assert v.decode([BOS, *v.encode("cab"), EOS, PAD]) == "cab"
    assert v.token_strings([1, 3, 2]) == ["<bos>", "a", "<eos>"]
    with pytest.raises(InputError, match="not in this task's alphabet"):
        v.encode("abz")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="translate"), "unknown task"),
    (dict(name="reverse", n_train=0), "n_train must be a positive integer"),
    (dict(name="reverse", max_len=True), "max_len must be a positive integer"),
    (dict(name="reverse", max_len=1, n_train=500), "too few distinct examples"),
])
def test_bad_task_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_task(**kwargs)
