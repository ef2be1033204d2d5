"""General-knowledge anchors: questions whose original answers a run holds in place where probes cannot.

A run that trains on its probes (`--retain-probes`, `ga`'s and `rmu`'s default) holds the original's
answers to neighbour prompts ("What is the capital of Spain?" beside "... of France?") with the retain
KL, so that forgetting one fact does not take the kind of fact along. A forget row gets a neighbour probe
only when it names a subject (probes.probe_subject) and is not a passage. Chat rows that name no one ("What
is the largest land animal?", "Who invented the telephone?") got nothing of the kind, and the ascent spread:
on the dev scenario `nature` the default kept 0.54-0.62 of the shared unrelated facts ("The largest mammal
in the world is currently unknown.").

For each such row the run adds PER_ROW of the questions below, in their order, at most all of them.
They are answered by the original model itself in the probes' generation (greedy, probes.ANSWER_TOKENS),
so what is held is the model's own behaviour, right or wrong, never a fact from outside; an answer that
holds a forget answer (probes.forget_held) is dropped, as a probe's is. They join the retain rows and
are never measured: they are training rows, not evidence. Passages get none: they have their same-subject
probes, and on them the anchors cost (more steps, more of the passages' other cut points reproduced, normal
text answered less like the original; docs/quality.md, "Anchors for chat rows only").

The questions: general knowledge of many kinds (places, history, art, science, food, language, numbers),
short, in English. Each is written with the answer it asks for, which no code reads: the test
(tests/test_anchors.py) checks with it that no anchor shares an answer or half a question's words with a
row of the quality benchmark (bench/scenarios/, every scenario and candidate file) or examples/, so that
the benchmark's figures do not measure a row the run trained on. Candidates that did were left out; five
texts that hold an anchor's answer word, found after the bank was judged, are named in the test with why.
The order is a fixed shuffle (random.Random(0)), so that any first N spread over the kinds.
Chosen on the dev split: docs/quality.md, "General-knowledge anchors" and "Anchors for chat rows only".
"""

from __future__ import annotations

from unlearn.data import prompt_key
from unlearn.spans import is_long_response

PER_ROW = 4  # anchors per forget row that can get no neighbour probe

# (question, the answer it asks for: read by the disjointness test only)
ANCHORS = (
    ("Which instrument measures air pressure?", "barometer"),
    ("Which empire was ruled by Genghis Khan?", "Mongol"),
    ("What is a word that means the same as another word called?", "synonym"),
    ("What is the capital of Hungary?", "Budapest"),
    ("What is the plural of mouse?", "mice"),
    ("Which spice gives curry its yellow colour?", "turmeric"),
    ("Which city was buried by the eruption of Mount Vesuvius in 79 AD?", "Pompeii"),
    ("Which planet is famous for its rings?", "Saturn"),
    ("Which fruit is used to make wine?", "grapes"),
    ("How many degrees are in a right angle?", "90"),
    ("Which ancient civilisation built the pyramids of Teotihuacan?", "Aztec"),
    ("In which country is the city of Marrakesh?", "Morocco"),
    ("Which mountain range runs along the western side of South America?", "Andes"),
    ("What is the capital of Finland?", "Helsinki"),
    ("Which bird is known for mimicking human speech?", "parrot"),
    ("Which Dutch artist painted The Night Watch?", "Rembrandt"),
    ("Which ancient people built Machu Picchu?", "Inca"),
    ("Which fruit is dried to make raisins?", "grapes"),
    ("What is the tallest species of grass?", "bamboo"),
    ("Who discovered radium with her husband Pierre?", "Marie Curie"),
    ("What is the largest species of shark?", "whale shark"),
    ("Which chess piece can only move diagonally?", "bishop"),
    ("Which vitamin do we get from sunlight?", "D"),
    ("How often are the Summer Olympic Games held?", "four years"),
    ("What do you call molten rock that comes out of a volcano?", "lava"),
    ("Which dance originated in Argentina?", "tango"),
    ("What is the name of the galaxy we live in?", "Milky Way"),
    ("What is the capital of Vietnam?", "Hanoi"),
    ("What do bees collect from flowers?", "nectar"),
    ("What is the capital of Chile?", "Santiago"),
    ("At how many degrees Fahrenheit does water freeze?", "32"),
    ("Which organ pumps blood around the body?", "heart"),
    ("Who was the queen of ancient Egypt who allied with Mark Antony?", "Cleopatra"),
    ("What is 7 times 8?", "56"),
    ("Which insect makes honey?", "bee"),
    ("What is tofu made from?", "soybeans"),
    ("How many minutes are in an hour?", "60"),
    ("Which currency is used in Switzerland?", "franc"),
    ("Which mountain is the highest in Africa?", "Kilimanjaro"),
    ("In which sport do players try to score a touchdown?", "American football"),
    ("What is the capital of Turkey?", "Ankara"),
    ("What does CPU stand for?", "central processing unit"),
    ("How many days are in a leap year?", "366"),
)


def gets_anchors(example, subject: str | None) -> bool:
    """Whether a forget row gets anchors: a chat row that names no SUBJECT (probes.probe_subject), so that no
    neighbour probe stands for it. A long chat response is not counted: it gets topic probes, and the refusal it
    gets by default trains on no probes (config.LONG_RESPONSE_DEFAULT). A passage is not counted either: it gets
    no neighbour probe, but its same-subject probes hold the subject, and anchors there cost more than they kept
    (docs/quality.md, "Anchors for chat rows only")."""
    return not example.is_passage and subject is None and not is_long_response(example)


def wanted(forget: list, subjects: list) -> int:
    """How many anchors a run with FORGET rows (SUBJECTS: probes.probe_subject of each) asks for: PER_ROW for each
    row that `gets_anchors`, at most all of them."""
    return min(len(ANCHORS), PER_ROW * sum(gets_anchors(ex, s) for ex, s in zip(forget, subjects)))


def questions(forget: list, subjects: list, taken=frozenset()) -> list[str]:
    """The anchor questions such a run adds: the first `wanted` in ANCHORS' order, none that asks a forget
    prompt (it would be trained both ways) or a prompt in TAKEN (prompt_key of the probes made: a neighbour
    probe may ask "What is the capital of Hungary?" too, and one prompt is held once, or not at all when the
    probe was dropped as expected to change); the next ones stand in for those."""
    asked = {prompt_key(ex.prompt) for ex in forget if ex.prompt is not None} | set(taken)
    return [q for q, _ in ANCHORS if prompt_key(q) not in asked][:wanted(forget, subjects)]
