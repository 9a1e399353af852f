"""Content detectors: find personal and payment data in prompt text.

Every pattern, built-in or from the policy file, is compiled with RE2
(google-re2): matching time is linear in the text for any pattern, so a
careless custom regex cannot stall the gateway the way a backtracking one
(`(a+)+$`) stalls Python's `re`. RE2 has no lookaround, so the checks a regular
expression cannot make are validators run on each candidate: the Luhn digit of
card numbers, the mod-97 check of IBANs, the reserved ranges of US SSNs.

Text is also read as a person reads it (`fold`): a card number copied from a
form in full-width digits (４１１１ …), in another script's digits (٤١١١ …) or
with invisible characters between them (a zero-width space from a web page, a
soft hyphen from a PDF) is still a card number to the model, and so to the
detectors. What this cannot catch is said in docs/policy.md.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import re2

Validator = Callable[[str], bool]


def luhn_valid(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    iban = candidate.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    # Letters count as two digits (A=10 ... Z=35); the whole number mod 97 must be 1.
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def ssn_valid(candidate: str) -> bool:
    area, group, serial = candidate[:3], candidate[4:6], candidate[7:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def phone_valid(candidate: str) -> bool:
    return 7 <= sum(c.isdigit() for c in candidate) <= 15


# (pattern, validator) of each built-in detector.
BUILTINS: dict[str, tuple[str, Validator | None]] = {
    "email": (r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}", None),
    # International (+44 20 7946 0958) and North American ((212) 555-0199, 212-555-0199).
    "phone": (
        r"\+[1-9][0-9]{0,2}[ .\-]?(?:\([0-9]{1,4}\)[ .\-]?)?[0-9]{1,4}(?:[ .\-]?[0-9]{2,4}){2,4}\b"
        r"|(?:\([0-9]{3}\) ?|\b[0-9]{3}[ .\-])[0-9]{3}[ .\-][0-9]{4}\b",
        phone_valid,
    ),
    # 13 to 19 digits, optionally grouped by spaces or dashes, passing Luhn.
    "card": (r"\b[0-9](?:[ \-]?[0-9]){12,18}\b", luhn_valid),
    # Compact (DE89370400440532013000) or printed in groups of four (GB82 WEST 1234 ...).
    "iban": (
        r"\b[A-Za-z]{2}[0-9]{2}(?:[A-Za-z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)\b",
        iban_valid,
    ),
    # Written with dashes (123-45-6789); nine bare digits are too common to flag.
    "ssn": (r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", ssn_valid),
}


class PatternError(ValueError):
    """A custom detector's pattern is not valid RE2."""


def _options(ignore_case: bool) -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a bad custom pattern is reported to the author, not to stderr
    options.case_sensitive = not ignore_case
    return options


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    regex: re2._Regexp
    validator: Validator | None = None

    @classmethod
    def compile(
        cls, name: str, pattern: str, *, ignore_case: bool = False, validator: Validator | None = None
    ) -> Detector:
        try:
            return cls(name, re2.compile(pattern, _options(ignore_case)), validator)
        except re2.error as exc:
            raise PatternError(str(exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc)) from None

    def spans(self, text: str) -> Iterable[tuple[int, int]]:
        for match in self.regex.finditer(text):
            if self.validator is None or self.validator(match.group()):
                yield match.span()


def builtin(name: str) -> Detector | None:
    spec = BUILTINS.get(name)
    return Detector.compile(name, spec[0], validator=spec[1]) if spec else None


@dataclass(frozen=True, slots=True)
class Hit:
    detector: str
    start: int
    end: int


class _Folding(dict[int, str]):
    """What each character reads as, for the detectors; filled in as
    `str.translate` meets characters (a table of all of Unicode would take a
    second to build at start-up)."""

    _MAX_ENTRIES = 1 << 16  # past this, characters are folded again each time, not kept

    def __missing__(self, code: int) -> str:
        char = chr(code)
        category = unicodedata.category(char)
        if category == "Cf":  # format characters, drawn as nothing: zero-width space, soft hyphen, bidi controls
            folded = ""
        elif category == "Nd":  # a decimal digit of any script
            folded = str(unicodedata.decimal(char))
        elif category == "Pd":  # a dash of any kind
            folded = "-"
        else:  # compatibility forms: full-width ＠ and Ａ, no-break spaces, ligatures
            folded = unicodedata.normalize("NFKC", char)
        if len(self) < self._MAX_ENTRIES:
            self[code] = folded
        return folded


_FOLDING = _Folding()


def fold(text: str) -> str:
    """`text` as the detectors read it (see the module's docstring); ASCII is unchanged."""
    return text if text.isascii() else text.translate(_FOLDING)


def _origins(text: str) -> list[int]:
    """For each character of `fold(text)`, the index in `text` it came from."""
    origins: list[int] = []
    for i, char in enumerate(text):
        origins += [i] * len(_FOLDING[ord(char)])
    return origins


def scan(text: str, detectors: Iterable[Detector]) -> list[Hit]:
    """Every match of every detector in `text` or in its folded reading, in
    text order, as spans of `text`. Where the two readings match one place,
    the longer match is kept."""
    detectors = list(detectors)
    found = {Hit(d.name, s, e) for d in detectors for s, e in d.spans(text)}
    folded = fold(text)
    if folded != text:
        spans = [(d.name, s, e) for d in detectors for s, e in d.spans(folded)]
        if spans:  # the index map is a loop over every character: only when there is something to map
            origins = _origins(text)
            found |= {Hit(name, origins[s], origins[e - 1] + 1) for name, s, e in spans}
    hits: list[Hit] = []
    ends: dict[str, int] = {}  # how far each detector's last kept hit reaches
    for hit in sorted(found, key=lambda h: (h.start, -h.end)):
        if hit.start >= ends.get(hit.detector, 0):
            hits.append(hit)
            ends[hit.detector] = hit.end
    return hits


def redact(text: str, hits: Iterable[Hit]) -> str:
    """`text` with each hit replaced by `[REDACTED:<detector>]`; of overlapping
    hits the one that starts first (then the longest) is replaced."""
    out: list[str] = []
    at = 0
    for hit in sorted(hits, key=lambda h: (h.start, -h.end)):
        if hit.start < at:
            continue
        out += [text[at : hit.start], f"[REDACTED:{hit.detector}]"]
        at = hit.end
    out.append(text[at:])
    return "".join(out)
