"""Answer normalisation shared by the factuality and math rewards.

Everything here is pure string work (no sympy, no I/O) so it is cheap enough to run on every sample.
"""
from __future__ import annotations

import re
import unicodedata

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_ARTICLES = {"a", "an", "the"}
# Single number words only: enough for "three" vs "3"; compound numbers ("twenty-one") are left as words on both
# sides, which still matches a reference spelled the same way.
_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000",
}
# Function words that carry no factual content; used by claim/document overlap and abstention leftovers.
STOPWORDS = frozenset("""
a an the and or but if then so of to in on at by for with from as into onto over under about than that this
these those there here it its it's is are was were be been being am do does did done have has had having i me my
we our you your he him his she her they them their what which who whom whose when where why how not no yes can
could would should will shall may might must also very just only all any some each such more most other
""".split())

_TOKEN_RE = re.compile(r"\d+(?:\.\d+)+|[^\W_]+")
_APOSTROPHES = "'\u2019\u2018\u02bc`"
_POSSESSIVE_RE = re.compile("[" + _APOSTROPHES + r"]s\b")


def strip_reasoning(text: str) -> str:
    """Drop <think>...</think> blocks (and an unterminated leading one): only the final answer is graded.

    A reasoning model that ran out of tokens inside its thinking has given no answer, so an unclosed <think>
    swallows the rest of the text.
    """
    text = _THINK_RE.sub(" ", text or "")
    lowered = text.lower()
    if "<think>" in lowered:
        text = text[: lowered.index("<think>")]
    elif "</think>" in lowered:  # chat templates often put the opening tag in the prompt
        text = text[lowered.rindex("</think>") + len("</think>"):]
    return text.strip()


def _fold(text: str) -> str:
    """Unicode NFKC, then drop accents (so "São" matches "Sao") and lowercase."""
    text = unicodedata.normalize("NFKC", text)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


def tokens(text: str, *, number_words: bool = True) -> list[str]:
    """Normalised word tokens: folded, apostrophes removed ("don't" -> "dont"), thousands separators removed,
    other punctuation turned into spaces, articles dropped, number words turned into digits."""
    text = _fold(text or "")
    text = _POSSESSIVE_RE.sub("", text)  # "Paris's" -> "paris" (so it still matches the answer "Paris")
    for ch in _APOSTROPHES:
        text = text.replace(ch, "")  # "don't" -> "dont": one token, so abstention phrases match either spelling
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000 (but keep "1, 2" as two numbers)
    out = []
    # A decimal number ("3.5") stays one token; every other non-word character separates tokens.
    for word in _TOKEN_RE.findall(text):
        if word in _ARTICLES:
            continue
        out.append(_NUMBER_WORDS.get(word, word) if number_words else word)
    return out


def normalize_answer(text: str, *, number_words: bool = True) -> str:
    """The comparison form of an answer: `tokens` joined by single spaces."""
    return " ".join(tokens(text, number_words=number_words))


def find_span(haystack: list[str], needle: list[str]) -> list[int]:
    """Start indices where `needle` occurs as a whole-token run inside `haystack`."""
    n = len(needle)
    if n == 0:
        return []
    return [i for i in range(len(haystack) - n + 1) if haystack[i:i + n] == needle]


def contains_span(haystack: list[str], needle: list[str]) -> bool:
    return bool(find_span(haystack, needle))


def remove_spans(haystack: list[str], needles: list[list[str]]) -> list[str]:
    """`haystack` with every whole-token occurrence of any needle cut out (longest needles first)."""
    keep = [True] * len(haystack)
    for needle in sorted(needles, key=len, reverse=True):
        for start in find_span(haystack, needle):
            if all(keep[start:start + len(needle)]):
                keep[start:start + len(needle)] = [False] * len(needle)
    return [tok for tok, k in zip(haystack, keep) if k]


def content_words(text: str) -> set[str]:
    """Tokens minus stop words: what a claim actually asserts, for lexical-overlap support checks."""
    return {t for t in tokens(text) if t not in STOPWORDS}


# A sentence ends at . ! ? followed by white space, or at a line break; decimals ("3.5") do not split because no
# space follows their dot. Bullet / numbered-list markers at line starts are dropped first ("1. Paris" is one item).
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")


def split_sentences(text: str) -> list[str]:
    out = []
    for line in (text or "").splitlines():
        out.extend(p.strip() for p in _SENTENCE_END_RE.split(_BULLET_RE.sub("", line)))
    return [p for p in out if p]


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} / \\fbox{...} with balanced braces; None when there is none or it never
    closes (a truncated response has no answer). Escaped braces (\\{ \\}) do not count toward the balance."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):  # a truncated last box falls back to the one before it
        depth, i = 1, start
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2  # skip the escaped character (\{ in a set is content, not structure)
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None
