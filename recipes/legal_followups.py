"""A client's follow-up questions after the assistant has named a licence, and the answers the knowledge base
supports: each answer follows from the licence's ScanCode category, and for GPL-3.0 from its SPDX id too.

These are category-level guidance, the kind a licence-compliance desk gives first ("a copyleft licence: no,
not in a closed product you distribute"), not legal advice about one licence's clauses. Each question has a
small set of possible answers; a generated answer is *right* when, of that set, it is nearest (token F1) to the
reference, so a reworded "Yes: keep the notice" counts and a fluent answer of the wrong category does not.
"""

from __future__ import annotations

from adapters.heads.metrics import generation_metrics

CLOSED = "Can I use it in a closed-source product?"
SHIP = "What must I ship with it?"
GPL3 = "Is it compatible with GPL-3.0?"
QUESTIONS = (CLOSED, SHIP, GPL3)

# category -> (closed-source use, what to ship, GPL-3.0 compatibility)
ANSWERS = {
    "Permissive": (
        "Yes: keep its copyright notice and licence text with your product.",
        "Its copyright notice and licence text.",
        "Yes, as a rule: permissive code can go into a GPL-3.0 work, keeping its notices.",
    ),
    "Public Domain": (
        "Yes: it sets no conditions.",
        "Nothing is required.",
        "Yes: public-domain code can go into a GPL-3.0 work.",
    ),
    "Copyleft Limited": (
        "Yes: your own code may stay closed, but changes to the licensed files must be shared under the same licence.",
        "Its licence text and the source of the licensed files, with your changes.",
        "Often, not always: check the licence's own compatibility terms.",
    ),
    "Copyleft": (
        "No: if you distribute the product, its source must be shared under the same licence.",
        "Its licence text and the complete source code of the work.",
        "Only if it allows GPL-3.0: two different strong copyleft licences usually conflict.",
    ),
    "Commercial": (
        "Only with a paid or negotiated agreement from the owner.",
        "Whatever your agreement with the owner requires.",
        "No, unless the owner agrees: its terms are not GPL-3.0's.",
    ),
    "Proprietary Free": (
        "Only on the owner's terms: check whether they allow redistribution.",
        "The owner's licence terms, unchanged.",
        "No: its terms do not allow what GPL-3.0 requires.",
    ),
    "Free Restricted": (
        "Only within its restrictions: commercial use is often excluded.",
        "Its licence text, with its restrictions passed on to your users.",
        "No: its restrictions conflict with GPL-3.0.",
    ),
    "Source-available": (
        "Only as the owner allows: its use is restricted.",
        "Its licence text, with the owner's restrictions passed on.",
        "No: its restrictions conflict with GPL-3.0.",
    ),
    "Patent License": (
        "It depends on the code's own licence: this one grants patent rights only.",
        "Its licence text.",
        "It depends on the code's own licence: this one grants patent rights only.",
    ),
    "Unstated License": (
        "Ask the owner first: it states no clear terms.",
        "Ask the owner: it states no clear terms.",
        "Unknown: it states no clear terms, so ask the owner.",
    ),
    "CLA": (
        "It does not license the code: it covers contributions you make.",
        "Nothing: it covers contributions you make.",
        "It does not license the code: it covers contributions you make.",
    ),
}
# the GPL-3.0 family itself, and licences whose "or later" reaches GPL-3.0 (from the SPDX id, not the category)
GPL3_ITSELF = "Yes: it is GPL-3.0, or made to be combined with it."
_GPL3_IDS = ("GPL-3.0", "LGPL-3.0", "AGPL-3.0", "GPL-2.0-or-later", "LGPL-2.1-or-later", "LGPL-2.0-or-later")


def answers(category: str, spdx: str) -> dict[str, str]:
    """Question -> the answer the knowledge base supports for a licence of this category and SPDX id."""
    closed, ship, gpl3 = ANSWERS[category]
    if spdx.startswith(_GPL3_IDS):
        gpl3 = GPL3_ITSELF
    return {CLOSED: closed, SHIP: ship, GPL3: gpl3}


def possible(question: str) -> list[str]:
    """Every distinct answer to ``question``."""
    index = QUESTIONS.index(question)
    found = {a[index] for a in ANSWERS.values()} | ({GPL3_ITSELF} if question == GPL3 else set())
    return sorted(found)


def is_right(generated: str, question: str, reference: str) -> bool:
    """The generated answer is nearer (token F1) to the reference than to any other possible answer."""
    f1 = {a: generation_metrics([generated], [a])["token_f1"] for a in possible(question)}
    best = max(f1.values())
    return best > 0 and f1[reference] == best and sum(v == best for v in f1.values()) == 1


def guidance(listed: list[tuple[str, str]]) -> str:
    """The knowledge base's answers to the follow-ups for the categories of the ``listed`` licences (``(spdx,
    category)`` pairs), one line per category, for the assistant's context: it answers a follow-up by choosing
    the line of the licence it named, not by remembering eleven categories' rules."""
    lines = []
    for category in dict.fromkeys(c for _, c in listed):
        closed, ship, gpl3 = ANSWERS[category]
        lines.append(f"- {category}: closed-source use: {closed} To ship: {ship} GPL-3.0: {gpl3}")
    if any(spdx.startswith(_GPL3_IDS) for spdx, _ in listed):
        lines.append(f"- GPL-3.0 and its or-later family: GPL-3.0: {GPL3_ITSELF}")
    return "\n".join(lines)
