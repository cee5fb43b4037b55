"""The built-in date task: forms, determinism, the split by date, Chinese forms, vocabulary."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from qkv.demo.dates import (
    FIRST_DATE,
    FORMS,
    LAST_DATE,
    SPECIALS,
    UnknownCharacterError,
    Vocab,
    chinese_number,
    expand_two_digit_year,
    make_examples,
    render,
    source_alphabet,
    source_vocab,
    split_dates,
    target_vocab,
)
from qkv.demo.dates import ordinal as english_ordinal

MARCH_7 = date(2019, 3, 7)  # a Thursday


@pytest.fixture(scope="module")
def split():
    return split_dates(seed=0)


@pytest.fixture(scope="module")
def examples(split):
    return make_examples(split.train, 5_000, seed=0)


def test_at_least_twenty_distinct_written_forms(examples):
    assert len({f.name for f in FORMS}) == len(FORMS) >= 20
    assert len({f.render(MARCH_7) for f in FORMS}) == len(FORMS)  # all write it differently
    assert len({ex.form for ex in examples}) == len(FORMS)  # and all are sampled


def test_the_forms_the_issue_asks_for():
    written = {f.name: f.render(MARCH_7) for f in FORMS}
    assert written["day_month"] == "7 March 2019"  # long month name
    assert written["mon_day"] == "Mar 7, 2019"  # short month name
    assert written["weekday_month_day"] == "Thursday, March 7, 2019"  # weekday
    assert written["month_ordinal"] == "March 7th, 2019"  # ordinal
    assert written["mdy_slash"] == "3/7/2019"  # month-day-year with /
    assert written["dmy_dot"] == "7.3.2019"  # day-month-year with .
    assert written["dmy_dash"] == "07-03-2019"  # day-month-year with -
    assert written["mdy_slash_yy"] == "3/7/19"  # two-digit year
    assert written["lower_month_day"] == "march 7, 2019"  # lowercase
    assert written["upper_day_mon"] == "07 MAR 2019"  # capitals
    assert written["zh_digits"] == "2019年3月7日"
    assert written["zh_numerals"] == "二〇一九年三月七日"
    assert written["zh_weekday"] == "2019年3月7日星期四"
    assert render(date(1981, 2, 3), "weekday_month_day") == "Tuesday, February 3, 1981"


def test_split_and_examples_are_deterministic_under_a_seed(split):
    assert split_dates(seed=0) == split
    assert split_dates(seed=1) != split
    assert make_examples(split.train, 300, seed=5) == make_examples(split.train, 300, seed=5)
    assert make_examples(split.train, 300, seed=5) != make_examples(split.train, 300, seed=6)


def test_heldout_dates_never_appear_in_training(split, examples):
    train, heldout = set(split.train), set(split.heldout)
    assert not train & heldout
    n_days = (LAST_DATE - FIRST_DATE).days + 1
    assert len(train) + len(heldout) == n_days
    assert len(heldout) == round(0.1 * n_days)
    assert all(ex.date in train for ex in examples)
    assert all(ex.date in heldout for ex in make_examples(split.heldout, 500, seed=1))


def test_every_target_parses_back_to_its_date(examples):
    for ex in examples:
        assert date.fromisoformat(ex.target) == ex.date
        assert len(ex.target) == 10
        assert render(ex.date, ex.form) == ex.source


def test_every_written_string_has_one_reading():
    """No two dates share a written string (e.g. 3/7 vs 7/3): a perfect translator exists.
    Whole years cover every day/month swap; the year range keeps two-digit years unique."""
    seen: dict[str, date] = {}
    for year in (1950, 1969, 1999, 2000, 2019, 2049):
        start = date(year, 1, 1)
        for i in range((date(year + 1, 1, 1) - start).days):
            d = start + timedelta(days=i)
            for form in FORMS:
                s = form.render(d)
                assert seen.setdefault(s, d) == d, f"{s!r} is both {seen[s]} and {d}"


@pytest.mark.parametrize("yy, year", [(50, 1950), (99, 1999), (0, 2000), (49, 2049), (19, 2019)])
def test_two_digit_years(yy, year):
    assert expand_two_digit_year(yy) == year
    d = date(year, 12, 31)
    assert render(d, "mdy_slash_yy") == f"12/31/{yy:02d}"
    assert render(d, "dd_mon_yy") == f"31-Dec-{yy:02d}"


def test_chinese_numerals():
    expected = {1: "一", 7: "七", 10: "十", 11: "十一", 19: "十九", 20: "二十", 21: "二十一",
                30: "三十", 31: "三十一"}  # fmt: skip
    for n, text in expected.items():
        assert chinese_number(n) == text
    assert render(date(2019, 3, 7), "zh_numerals") == "二〇一九年三月七日"
    assert render(date(2000, 10, 1), "zh_numerals") == "二〇〇〇年十月一日"
    assert render(date(1988, 12, 31), "zh_numerals") == "一九八八年十二月三十一日"
    assert render(date(2019, 3, 10), "zh_weekday") == "2019年3月10日星期日"  # Sunday
    assert render(date(2019, 3, 7), "zh_digits_padded") == "2019年03月07日"


def test_english_ordinals():
    got = [english_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)]
    assert got == ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd",
                   "31st"]  # fmt: skip


def test_lowercase_and_capitalised_forms_exist():
    written = [f.render(MARCH_7) for f in FORMS]
    assert any("march" in s for s in written)
    assert any("March" in s for s in written)
    assert any("MAR" in s for s in written)
    assert any("thursday" in s for s in written)


def test_render_rejects_dates_outside_the_range_and_unknown_forms():
    with pytest.raises(ValueError, match="1950-01-01"):
        render(date(1949, 12, 31), "day_month")
    with pytest.raises(ValueError, match="unknown date form"):
        render(MARCH_7, "klingon")


def test_vocabulary_round_trips(examples):
    src, tgt = source_vocab(), target_vocab()
    assert src.tokens[:4] == SPECIALS == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (Vocab.pad_id, Vocab.bos_id, Vocab.eos_id, Vocab.unk_id) == (0, 1, 2, 3)
    assert set(source_alphabet()) >= {c for ex in examples for c in ex.source}
    for ex in examples[:500]:
        ids = src.encode(ex.source, bos=True, eos=True)
        assert ids[0] == Vocab.bos_id and ids[-1] == Vocab.eos_id
        assert src.decode(ids) == ex.source
        assert tgt.decode([*tgt.encode(ex.target, eos=True), Vocab.pad_id]) == ex.target
    assert len(tgt) == 4 + 11
    assert Vocab(src.to_list()) == src


def test_unknown_characters():
    src = source_vocab()
    with pytest.raises(UnknownCharacterError, match="never seen") as info:
        src.encode("7 Mär 2019€")
    assert info.value.chars == ("ä", "€")
    assert src.encode("ä", strict=False) == [Vocab.unk_id]
    assert src.decode([Vocab.unk_id]) == "?"
    with pytest.raises(ValueError, match="distinct"):
        Vocab("aa")
