"""Answer parsing: realistic MLLM replies map to yes / no / unparsed and the right explanation."""

from __future__ import annotations

import pytest

from eagle.mllm.answers import parse_answer

OPTIONS = {"A": "yes", "B": "no"}

CASES = [
    # (reply, answer, explanation)
    ("Yes, there is a scratch on the upper left of the bolt.", "yes",
     "there is a scratch on the upper left of the bolt."),
    ("No. The object is intact and evenly coloured.", "no", "The object is intact and evenly coloured."),
    ("**Yes** - a crack runs along the bottom edge.", "yes", "a crack runs along the bottom edge."),
    ("yes", "yes", ""),
    ("NO", "no", ""),
    ("Answer: No. The surface looks uniform.", "no", "The surface looks uniform."),
    ("The answer is yes: the thread is damaged near the tip.", "yes", "the thread is damaged near the tip."),
    ("Final answer: Yes\nA hole is visible at the centre.", "yes", "A hole is visible at the centre."),
    ("A. Yes. There is a dent on the right side.", "yes", "There is a dent on the right side."),
    ("(B) No defect is visible.", "no", "No defect is visible."),
    ("B", "no", ""),
    ("A: the cable insulation is cut at the left.", "yes", "the cable insulation is cut at the left."),
    ("<think>The box marks a stain... maybe.</think>Yes, a dark stain at the top right.", "yes",
     "a dark stain at the top right."),
    ("I looked at both images carefully. No, the marked area is just a reflection.", "no",
     "the marked area is just a reflection."),
    ("Looking at the image, I think the answer is: no. It is fine.", "no", "It is fine."),
    ("There is no visible defect on the object.", "no", "There is no visible defect on the object."),
    ("The bottle appears to be completely normal.", "no", "The bottle appears to be completely normal."),
    ("A scratch runs across the lower half of the screw head.", "yes",
     "A scratch runs across the lower half of the screw head."),
    ("Nothing unusual.", "unparsed", "Nothing unusual."),
    ("It is hard to tell whether the mark is a defect.", "unparsed",
     "It is hard to tell whether the mark is a defect."),
    ("", "unparsed", ""),
    ("� first firstsing", "unparsed", "� first firstsing"),
    ("Not defective; the seam is straight.", "no", "Not defective; the seam is straight."),
]


@pytest.mark.parametrize(("reply", "answer", "explanation"), CASES)
def test_parse_answer(reply: str, answer: str, explanation: str) -> None:
    parsed = parse_answer(reply, OPTIONS)
    assert (parsed.answer, parsed.explanation) == (answer, explanation)


def test_option_letters_need_a_mapping() -> None:
    assert parse_answer("B", {}).answer == "unparsed"
    assert parse_answer("B", {"A": "no", "B": "yes"}).answer == "yes"
