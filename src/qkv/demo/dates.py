"""The built-in translation task: dates as people write them -> ISO 8601 (YYYY-MM-DD).

    "Tuesday, February 3, 1981" -> "1981-02-03"        "二〇一九年三月七日" -> "2019-03-07"

Nothing is downloaded: every example is rendered here from a calendar date and one of
`FORMS` (28 written forms, ISO 8601 itself among them). Two conventions keep every
string readable one way only, so that a perfect translator exists:

- Numeric forms: a four-digit year written first means year-month-day (2019/03/07,
  2019-03-07, 20190307); otherwise the separator fixes the order: "/" is month/day/year
  (US), "." and "-" are day.month.year (European). "03/07/2019" is therefore 7 March and
  "03.07.2019" is 3 July; "31/12/2019" is not a date of this task.
- Dates run from `FIRST_DATE` to `LAST_DATE` (1950-2049), so a two-digit year has one
  reading: 50-99 are 1950-1999, 00-49 are 2000-2049 (`expand_two_digit_year`).

Held-out dates. `split_dates` shuffles every calendar date of the range with a seed and
holds out a fraction of them: a held-out date never appears in training, in any form, so
exact match on them measures generalisation rather than memory.

Vocabulary. `Vocab` maps characters to ids after four special tokens (pad 0, bos 1, eos 2,
unk 3, the ids `TransformerConfig` expects). The source vocabulary holds every character
any form can produce (`source_alphabet`); the target vocabulary holds "0-9" and "-".
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

__all__ = [
    "FIRST_DATE",
    "FORMS",
    "LAST_DATE",
    "SPECIALS",
    "DateForm",
    "DateSplit",
    "Example",
    "UnknownCharacterError",
    "Vocab",
    "chinese_number",
    "expand_two_digit_year",
    "make_examples",
    "render",
    "source_alphabet",
    "source_vocab",
    "split_dates",
    "target_vocab",
]

FIRST_DATE = date(1950, 1, 1)
LAST_DATE = date(2049, 12, 31)

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
CHINESE_DIGITS = "〇一二三四五六七八九"
CHINESE_WEEKDAYS = "一二三四五六日"  # 星期一 (Monday) ... 星期日 (Sunday)


def expand_two_digit_year(yy: int) -> int:
    """The year a two-digit year means in this task: 50-99 -> 1950-1999, 00-49 -> 2000-2049."""
    if not 0 <= yy <= 99:
        raise ValueError(f"a two-digit year lies in [0, 99]; got {yy}")
    return 1900 + yy if yy >= 50 else 2000 + yy


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 3 -> "3rd", 11 -> "11th", 22 -> "22nd"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def chinese_number(n: int) -> str:
    """A month or day number (1-31) in Chinese numerals: 7 -> 七, 10 -> 十, 21 -> 二十一."""
    if not 1 <= n <= 99:
        raise ValueError(f"chinese_number covers 1-99; got {n}")
    tens, ones = divmod(n, 10)
    if tens == 0:
        return CHINESE_DIGITS[ones]
    head = "" if tens == 1 else CHINESE_DIGITS[tens]  # 十一, not 一十一
    return head + "十" + (CHINESE_DIGITS[ones] if ones else "")


def chinese_year(year: int) -> str:
    """Digit by digit, as years are read: 2019 -> 二〇一九."""
    return "".join(CHINESE_DIGITS[int(c)] for c in str(year))


def _yy(d: date) -> str:
    return f"{d.year % 100:02d}"


def _mon(d: date) -> str:
    return MONTHS[d.month - 1][:3]


def _month(d: date) -> str:
    return MONTHS[d.month - 1]


def _wd(d: date) -> str:
    return WEEKDAYS[d.weekday()]


@dataclass(frozen=True)
class DateForm:
    """One way of writing a date: `render(date) -> str`; `example` is 2019-03-07 rendered."""

    name: str
    render: Callable[[date], str]

    @property
    def example(self) -> str:
        return self.render(date(2019, 3, 7))


# fmt: off
FORMS: tuple[DateForm, ...] = (
    DateForm("ymd_slash", lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}"),      # 2019/03/07
    DateForm("ymd_dash", lambda d: d.isoformat()),                               # 2019-03-07
    DateForm("ymd_compact", lambda d: f"{d.year}{d.month:02d}{d.day:02d}"),      # 20190307
    DateForm("mdy_slash", lambda d: f"{d.month}/{d.day}/{d.year}"),              # 3/7/2019
    DateForm("mdy_slash_padded", lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}"),
    DateForm("mdy_slash_yy", lambda d: f"{d.month}/{d.day}/{_yy(d)}"),           # 3/7/19
    DateForm("dmy_dot", lambda d: f"{d.day}.{d.month}.{d.year}"),                # 7.3.2019
    DateForm("dmy_dot_padded", lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}"),
    DateForm("dmy_dot_yy", lambda d: f"{d.day:02d}.{d.month:02d}.{_yy(d)}"),     # 07.03.19
    DateForm("dmy_dash", lambda d: f"{d.day:02d}-{d.month:02d}-{d.year}"),       # 07-03-2019
    DateForm("day_month", lambda d: f"{d.day} {_month(d)} {d.year}"),            # 7 March 2019
    DateForm("month_day", lambda d: f"{_month(d)} {d.day}, {d.year}"),           # March 7, 2019
    DateForm("day_mon", lambda d: f"{d.day} {_mon(d)} {d.year}"),                # 7 Mar 2019
    DateForm("mon_day", lambda d: f"{_mon(d)} {d.day}, {d.year}"),               # Mar 7, 2019
    DateForm("month_ordinal", lambda d: f"{_month(d)} {ordinal(d.day)}, {d.year}"),
    DateForm("ordinal_of_month", lambda d: f"the {ordinal(d.day)} of {_month(d)} {d.year}"),
    DateForm("weekday_month_day", lambda d: f"{_wd(d)}, {_month(d)} {d.day}, {d.year}"),
    DateForm("rfc2822", lambda d: f"{_wd(d)[:3]}, {d.day:02d} {_mon(d)} {d.year}"),
    DateForm("lower_day_month", lambda d: f"{d.day} {_month(d).lower()} {d.year}"),
    DateForm("lower_month_day", lambda d: f"{_month(d).lower()} {d.day}, {d.year}"),
    DateForm(
        "lower_weekday_ordinal",
        lambda d: f"{_wd(d).lower()} {ordinal(d.day)} {_month(d).lower()} {d.year}",
    ),                                                                     # thursday 7th march 2019
    DateForm("upper_day_mon", lambda d: f"{d.day:02d} {_mon(d).upper()} {d.year}"),  # 07 MAR 2019
    DateForm("dd_mon_yy", lambda d: f"{d.day:02d}-{_mon(d)}-{_yy(d)}"),          # 07-Mar-19
    DateForm("mon_day_apostrophe_yy", lambda d: f"{_mon(d)} {d.day} '{_yy(d)}"),  # Mar 7 '19
    DateForm("zh_digits", lambda d: f"{d.year}年{d.month}月{d.day}日"),          # 2019年3月7日
    DateForm("zh_digits_padded", lambda d: f"{d.year}年{d.month:02d}月{d.day:02d}日"),
    DateForm(
        "zh_numerals",
        lambda d: f"{chinese_year(d.year)}年{chinese_number(d.month)}月{chinese_number(d.day)}日",
    ),                                                                     # 二〇一九年三月七日
    DateForm(
        "zh_weekday",
        lambda d: f"{d.year}年{d.month}月{d.day}日星期{CHINESE_WEEKDAYS[d.weekday()]}",
    ),                                                                     # 2019年3月7日星期四
)
# fmt: on
_FORMS_BY_NAME = {f.name: f for f in FORMS}


def render(d: date, form: str | DateForm) -> str:
    """`d` written in `form` (a `DateForm` or its name)."""
    if isinstance(form, str):
        if form not in _FORMS_BY_NAME:
            raise ValueError(f"unknown date form {form!r}; known: {sorted(_FORMS_BY_NAME)}")
        form = _FORMS_BY_NAME[form]
    if not FIRST_DATE <= d <= LAST_DATE:
        raise ValueError(f"dates of this task lie in [{FIRST_DATE}, {LAST_DATE}]; got {d}")
    return form.render(d)


@dataclass(frozen=True)
class Example:
    """One translation pair: `source` (a written form) -> `target` (ISO 8601)."""

    source: str
    target: str
    date: date
    form: str


@dataclass(frozen=True)
class DateSplit:
    """Calendar dates for training and the disjoint set held out from it."""

    train: tuple[date, ...]
    heldout: tuple[date, ...]


def all_dates() -> list[date]:
    """Every calendar date from FIRST_DATE to LAST_DATE, in order."""
    n = (LAST_DATE - FIRST_DATE).days + 1
    return [FIRST_DATE + timedelta(days=i) for i in range(n)]


def split_dates(seed: int, heldout_fraction: float = 0.1) -> DateSplit:
    """Shuffle all dates with `seed`; hold out `heldout_fraction` of them (never trained on)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1); got {heldout_fraction}")
    dates = all_dates()
    random.Random(seed).shuffle(dates)
    n_heldout = max(1, round(len(dates) * heldout_fraction))
    return DateSplit(
        train=tuple(sorted(dates[n_heldout:])), heldout=tuple(sorted(dates[:n_heldout]))
    )


def make_examples(dates: Sequence[date], n: int, seed: int) -> list[Example]:
    """`n` examples, each a date drawn from `dates` in a form drawn from FORMS (seeded)."""
    if not dates:
        raise ValueError("make_examples needs at least one date")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d, form = rng.choice(dates), rng.choice(FORMS)
        out.append(Example(form.render(d), d.isoformat(), d, form.name))
    return out


def source_alphabet() -> str:
    """Every character some form can produce, sorted (independent of any seed).

    All forms of every day of the leap year 2000 cover the month, weekday, day and ordinal
    spellings; January 1 of every year covers all year digits.
    """
    leap = [date(2000, 1, 1) + timedelta(days=i) for i in range(366)]
    years = [date(y, 1, 1) for y in range(FIRST_DATE.year, LAST_DATE.year + 1)]
    chars = {c for d in leap + years for form in FORMS for c in form.render(d)}
    return "".join(sorted(chars))


SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class UnknownCharacterError(ValueError):
    """Text holds characters outside the vocabulary; `chars` lists them in order of appearance."""

    def __init__(self, chars: Sequence[str], text: str) -> None:
        self.chars = tuple(chars)
        shown = " ".join(repr(c) for c in self.chars)
        super().__init__(f"{text!r} contains characters the model has never seen: {shown}")


class Vocab:
    """Character-level vocabulary: ids 0-3 are <pad> <bos> <eos> <unk>, then the characters."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("Vocab takes single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("Vocab characters must be distinct")
        self.chars = "".join(chars)
        self.tokens = (*SPECIALS, *chars)
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {len(SPECIALS)} special + {self.chars!r})"

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` outside the vocabulary, each once, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, strict: bool = True):
        """text -> list of ids; unknown characters raise UnknownCharacterError (strict) or
        become <unk>."""
        if strict and (unknown := self.unknown(text)):
            raise UnknownCharacterError(unknown, text)
        ids = [self._ids.get(c, self.unk_id) for c in text]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text: stops at the first <eos>, skips <pad> and <bos>, writes <unk> as '?'."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append("?" if i == self.unk_id or not 0 <= i < len(self) else self.tokens[i])
        return "".join(out)

    def to_list(self) -> list[str]:
        """The characters (no specials), for saving in a checkpoint."""
        return list(self.chars)


def source_vocab() -> Vocab:
    """Every character the written forms use."""
    return Vocab(source_alphabet())


def target_vocab() -> Vocab:
    """ISO 8601 dates need ten digits and the dash."""
    return Vocab("-0123456789")
