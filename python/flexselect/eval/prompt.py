"""The multiple-choice prompt and reading the chosen letter back out of a free-form reply."""

from __future__ import annotations

import re

from .datasets import LETTERS, Item

INSTRUCTION = "Answer with the option's letter from the given choices directly."


def build_prompt(question: str, options: list[str]) -> str:
    """Question, one "A. option" line per option, then the instruction: the prompt every method gets."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)] + [INSTRUCTION]
    return "\n".join(lines)


def item_prompt(item: Item) -> str:
    return build_prompt(item.question, item.options)


def extract_letter(reply: str, n_options: int, options: list[str] | None = None) -> str | None:
    """The option letter a reply chooses, or None when it names no option (scored wrong, never guessed).

    Tried in order, first hit wins: the whole reply is a letter ("B", "(b)", "B."); it starts with a delimited
    letter ("B) blue", "(C) ..."); a letter after "answer"/"option"/"choice" ("The answer is B", "Answer: (c)");
    the reply is exactly one option's text (needs `options`); one distinct letter in parentheses anywhere; one
    option's text inside the reply; one distinct stand-alone capital letter ("A" followed by a word read as the
    article). Only letters of the first `n_options` count.
    """
    text = reply.strip()
    if not text or n_options < 1:
        return None
    valid = LETTERS[:n_options]
    up, low = f"[{valid}]", f"[{valid}{valid.lower()}]"
    rules = [
        rf"^\(?({low})\)?[.:)]?$",
        rf"^\(({low})\)|^({up})[.:)]",
        rf"(?i:\b(?:answer|option|choice)\b(?:\s+is)?)\s*[:：]?\s*(?:\(({low})\)|({up})\b|({low})(?=[\s.,;!)]*$))",
    ]
    for pattern in rules:
        m = re.search(pattern, text)
        if m:
            return next(g for g in m.groups() if g).upper()
    by_text = _option_by_text(text, options[:n_options]) if options else None
    if by_text is not None and by_text[1]:
        return by_text[0]
    letter = _single({g.upper() for g in re.findall(rf"\(({low})\)", text)})
    if letter:
        return letter
    if by_text is not None:
        return by_text[0]
    # A sentence-initial "A" before a lower-case word is the article ("A man opens the door"), not option A.
    lone = {
        m.group(1)
        for m in re.finditer(rf"\b({up})\b", text)
        if not (
            m.group(1) == "A"
            and re.search(r"(?:^|[.!?]\s)$", text[: m.start()])
            and re.match(r"\s+(?!(?:is|was|and|or|seems|would)\b)[a-z]", text[m.end() :])
        )
    }
    return _single(lone)


def _option_by_text(text: str, options: list[str]) -> tuple[str, bool] | None:
    """(letter, exact) for the one option the reply repeats: whole reply first, else the one option it contains
    (an option contained only as part of another contained option, "red" in "red car", does not count)."""
    norm = _normalize(text)
    normalized = [_normalize(o) for o in options]
    exact = [i for i, o in enumerate(normalized) if o and o == norm]
    if len(exact) == 1:
        return LETTERS[exact[0]], True
    inside = [i for i, o in enumerate(normalized) if o and re.search(rf"(?<!\w){re.escape(o)}(?!\w)", norm)]
    inside = [i for i in inside if not any(j != i and normalized[i] in normalized[j] for j in inside)]
    return (LETTERS[inside[0]], False) if len(inside) == 1 else None


def _normalize(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _single(letters: set[str]) -> str | None:
    return next(iter(letters)) if len(letters) == 1 else None
