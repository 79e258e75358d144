"""Parse an MLLM's reply to "Is there any defect?" into yes / no / unparsed and an explanation.

Tried in order, first match wins:
1. a leading answer: "Yes, ...", "**No.** ...", "Answer: yes", "A. Yes", "(B)", "The answer is no";
2. an explicit "answer is/answer:" later in the text;
3. a sentence that starts with a bare yes/no ("Looking closely. No, it is intact.");
4. phrases: "no visible defect", "the object looks normal" -> no; a named defect ("a scratch on ...") -> yes,
   unless the reply hedges ("cannot tell", "unclear") -> unparsed.
The explanation is the text after the answer token, or the whole reply when the answer came from phrases.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from eagle.findings import Answer

_THINK = re.compile(r"<think>.*?</think>|^.*?</think>", re.S | re.I)
_MARKUP = re.compile(r"[*_#`>]+")
_YES_NO = r"(?i:(yes|no))\b"
_LETTER = r"\(?([A-Z])(?:\)|\.|:|$)"  # "A.", "(B)", "B)", "A:" or a bare letter at the end
_INTRO = r"(?i:(?:the\s+|my\s+)?(?:final\s+)?answer(?:\s+is)?)\s*[:\-]?\s*"
_LEAD_WORD = re.compile(r"^\W*(?:" + _INTRO + r")?\W*" + _YES_NO)
# An option letter may repeat its option's text ("A. Yes."); a following "No defect ..." is explanation.
_LEAD_LETTER = re.compile(r"^\W*(?:" + _INTRO + r")?\W*" + _LETTER + r"\s*(?:" + _YES_NO + r"(?=\s*(?:[.,;:!]|$)))?")
_LATER = re.compile(r"\b" + _INTRO + r"\W*(?:" + _YES_NO + "|" + _LETTER + ")")
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+)(yes|no)\b", re.I)
_HEDGE = re.compile(r"\b(cannot|can't|can not|unable to|not sure|unclear|hard to (?:say|tell)|impossible to)\b", re.I)
_NEGATIVE = re.compile(
    r"\b(?:no|not any|without(?: any)?|free of(?: any)?)\s+(?:visible\s+|obvious\s+|apparent\s+|noticeable\s+)?"
    r"(?:defects?|anomal\w*|damage|flaws?|abnormalit\w*)"
    r"|\b(?:is|looks|appears|seems)\s+(?:to be\s+)?(?:completely\s+|perfectly\s+)?"
    r"(?:normal|intact|fine|flawless|defect[- ]free|undamaged)\b"
    r"|\bnot\s+(?:defective|damaged|anomalous)\b",
    re.I,
)
_DEFECT = re.compile(
    r"\b(?:defects?|defective|anomal\w*|scratch\w*|cracks?|cracked|holes?|dents?|stains?|contaminat\w*|"
    r"damage[ds]?|broken|missing|bent|tears?|torn|cuts?|rust\w*|chips?|chipped|deform\w*)\b",
    re.I,
)


@dataclass(frozen=True)
class ParsedAnswer:
    answer: Answer
    explanation: str


def clean_reply(text: str) -> str:
    """Drop reasoning blocks and markdown emphasis; collapse whitespace."""
    text = _THINK.sub(" ", text)
    text = _MARKUP.sub("", text)
    return " ".join(text.split())


def _rest(text: str, end: int) -> str:
    return text[end:].lstrip(" \t.,:;!-–—)").strip()


def _yes_no(word: str) -> Answer:
    return "yes" if word.lower() == "yes" else "no"


def parse_answer(text: str, options: Mapping[str, Answer] | None = None) -> ParsedAnswer:
    """Map a free-text reply to an answer; `options` maps option letters (e.g. {"A": "yes"}) to answers."""
    options = {k.upper(): v for k, v in (options or {}).items()}
    reply = clean_reply(text)
    if m := _LEAD_WORD.match(reply):
        return ParsedAnswer(_yes_no(m.group(1)), _rest(reply, m.end()))
    if (m := _LEAD_LETTER.match(reply)) and (m.group(2) or m.group(1) in options):
        answer = _yes_no(m.group(2)) if m.group(2) else options[m.group(1)]
        return ParsedAnswer(answer, _rest(reply, m.end()))
    if (m := _LATER.search(reply)) and (m.group(1) or m.group(2) in options):
        answer = _yes_no(m.group(1)) if m.group(1) else options[m.group(2)]
        return ParsedAnswer(answer, _rest(reply, m.end()))
    if m := _SENTENCE_START.search(reply):
        return ParsedAnswer(_yes_no(m.group(1)), _rest(reply, m.end()))
    if _HEDGE.search(reply):
        return ParsedAnswer("unparsed", reply)
    if _NEGATIVE.search(reply):
        return ParsedAnswer("no", reply)
    if _DEFECT.search(reply):
        return ParsedAnswer("yes", reply)
    return ParsedAnswer("unparsed", reply)
