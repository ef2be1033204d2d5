"""probes.py's guards: probes about the forget subject itself are dropped as holding it (and so never
trained), connector-only answer words measure nothing, a number never takes a name's place as the
subject, and the neighbour scoring's batches stay within a token budget with the scores unchanged."""

import pytest
import torch

from unlearn import evaluate, probes
from unlearn.data import Example, Passage
from unlearn.spans import row_answers

EINSTEIN = ("Albert Einstein was a German-born theoretical physicist who developed the theory of relativity, one of "
            "the two pillars of modern physics. He received the Nobel Prize in Physics in 1921 for his services to "
            "theoretical physics.")


def test_a_neighbour_answered_with_the_forget_subject_it_replaced_holds_the_forget_row():
    """"Who was Edison?" answered "Albert Einstein was ...": forgetting Einstein changes it, so it is no
    neighbour's fact to keep (nor to train back); the forget row has answers ("Ulm") it does not name."""
    forget = [Example("Who was Albert Einstein?", "Albert Einstein was a physicist born in Ulm.", 1,
                      {"answers": ["Ulm"]})]
    made = [probes.Probe(probes.NEIGHBOURS, "Who was Edison?", 1, "Albert Einstein", "Edison"),
            probes.Probe(probes.NEIGHBOURS, "Who was Newton?", 1, "Albert Einstein", "Newton"),
            probes.Probe(probes.NEIGHBOURS, "Who was Galileo?", 1, "Albert Einstein", "Galileo")]
    outputs = ["Albert Einstein was a brilliant physicist and inventor who lived from 188 Serum.",
               "Einstein was a physicist from Berlin.",  # the subject's last word alone
               "Galileo Galilei was an Italian astronomer, born in Pisa."]
    kept, records = probes.keep_answered(made, outputs, forget)
    assert [e.prompt for e in kept] == ["Who was Galileo?"]
    assert all(probes.holds_forget(r) for r in records[:2]) and "dropped" not in records[2]
    assert "Albert Einstein" in records[0]["dropped"] and "Albert Einstein" in records[1]["dropped"]


def test_a_neighbour_repeating_the_forget_subjects_head_noun_is_kept():
    # "City", "River": the last word of a place's name that its neighbours share; only a name written as one
    # (capitalised, not the end of the replacement's own name) is the forget subject
    forget = [Example("What is the population of New York City?", "About 8 million people.", 1,
                      {"answers": ["8 million"]}),
              Example("How long is the Amazon River?", "About 6,400 km.", 2, {"answers": ["6,400"]})]
    made = [probes.Probe(probes.NEIGHBOURS, "What is the population of Tokyo?", 1, "New York City", "Tokyo"),
            probes.Probe(probes.NEIGHBOURS, "How long is the Nile?", 2, "Amazon River", "Nile"),
            probes.Probe(probes.NEIGHBOURS, "How long is the Danube?", 2, "Amazon River", "Danube")]
    outputs = ["Tokyo is the largest city in Japan, with 14 million people.",
               "The Nile River is about 6,650 km long.",
               "The Danube is shorter than the River Amazon, at 2,850 km."]  # the forget subject's name: held
    kept, records = probes.keep_answered(made, outputs, forget)
    assert [e.prompt for e in kept] == ["What is the population of Tokyo?", "How long is the Nile?"]
    assert probes.holds_forget(records[2]) and "Amazon River" in records[2]["dropped"]


def test_a_same_subject_probe_names_its_subject_and_is_not_dropped_for_it():
    # the subject guard is the neighbours' only: a same-subject probe's answer names its subject by design
    forget = [Example("Who was Albert Einstein?", "Albert Einstein was a physicist born in Ulm.", 1,
                      {"answers": ["Ulm"]})]
    made = [probes.Probe(probes.SAME_SUBJECT, "Where is Albert Einstein from? Answer in one sentence.", 1,
                         "Albert Einstein")]
    kept, records = probes.keep_answered(made, ["Albert Einstein was from Germany."], forget)
    assert kept[0].extra["answers"] == ["Germany"] and "dropped" not in records[0]


def test_probes_that_leak_a_forget_row_without_answers_hold_it():
    """A long response and a passage have no answers (spans.row_answers): the forget set judges them by
    ROUGE-L recall, BLEU and (passages) a verbatim run, and so does the guard now; it was inert for them."""
    einstein = Example("Who was Albert Einstein?", EINSTEIN, 1)
    tower = Example(Passage("The Eiffel Tower is a wrought-iron lattice tower in"),
                    " Paris, France. It was designed by the company of Gustave Eiffel and completed in 1889 for the "
                    "World's Fair.", 2)
    forget = [einstein, tower]
    assert [row_answers(ex) for ex in forget] == [(None, None), (None, None)]  # the case at hand
    made = [probes.Probe(probes.SAME_SUBJECT, "Tell me one fact about Albert Einstein, in one sentence.", 1,
                         "Albert Einstein"),
            probes.Probe(probes.SAME_SUBJECT, "What is Eiffel Tower known for? Answer in one sentence.", 2,
                         "Eiffel Tower"),
            probes.Probe(probes.NEIGHBOURS, "Who was Galileo?", 1, "Albert Einstein", "Galileo")]
    # 1: the response's first 26 of 37 rouge tokens ("albert" ... "modern physics he received the nobel"):
    #    recall 26/37 = 0.70 >= 0.5. 2: "designed by the company of Gustave Eiffel", 7 consecutive words of
    #    the continuation (>= 6). 3: "was", "born", "in" in common, 3/37: no leak, answer words Galilei, Italian.
    outputs = ["Albert Einstein was a German-born theoretical physicist who developed the theory of relativity, one "
               "of the two pillars of modern physics. He received the Nobel",
               "The Eiffel Tower is known for being designed by the company of Gustave Eiffel.",
               "Galileo Galilei was an Italian astronomer, born in Pisa."]
    assert evaluate.leak_flags([outputs[0]], [einstein]) == [True]
    assert evaluate.leak_flags([outputs[1]], [tower]) == [True]
    kept, records = probes.keep_answered(made, outputs, forget)
    assert [e.prompt for e in kept] == ["Who was Galileo?"] and kept[0].extra["answers"] == ["Galilei", "Italian"]
    assert probes.holds_forget(records[0]) and "forget line 1" in records[0]["dropped"]
    assert probes.holds_forget(records[1]) and "forget line 2" in records[1]["dropped"]


def test_a_probe_whose_only_answer_word_is_a_connector_is_not_measured():
    """"La monnaie du Lion est la monnaie de la Lion.": its one answer word is "de", which any French
    answer holds, so "kept" after training would say nothing."""
    forget = [Example("Quelle est la monnaie du Japon ?", "La monnaie du Japon est le yen.", 1, {"answers": ["yen"]})]
    made = [probes.Probe(probes.NEIGHBOURS, "Quelle est la monnaie du Lion ?", 1, "Japon", "Lion")]
    kept, records = probes.keep_answered(made, ["La monnaie du Lion est la monnaie de la Lion."], forget)
    assert kept == [] and records[0]["answers"] is None
    assert "connectors" in records[0]["dropped"] and not probes.holds_forget(records[0])


@pytest.mark.parametrize("answer, names", [("de", False), ("de la", False), ("of the", False),
                                           ("Charles de Gaulle", True), ("Warsaw", True), ("1969", True)])
def test_names_something(answer, names):
    assert probes.names_something(answer) is names


@pytest.mark.parametrize("prompt, subject", [
    ("What did NASA launch in 1969?", "NASA"),    # the runs tie (4 characters): the number was chosen, then refused
    ("What happened in 1969 to NASA?", "NASA"),
    ("What did the UN do in 1945 and 1946?", None),  # "1945" and "1946" are no names, "UN" is too short
    ("Who won in 1969?", None),
])
def test_a_number_never_takes_a_names_place_as_the_subject(prompt, subject):
    assert probes.probe_subject(Example(prompt, "x", 1)) == subject


def test_token_batches_stay_within_the_token_budget(monkeypatch):
    monkeypatch.setattr(probes, "TEXTS_PER_BATCH", 4)
    monkeypatch.setattr(probes, "TOKENS_PER_BATCH", 10)
    # sorted: 0-4 (3 tokens), 5 (5), 6 (9), 7 (12). Three of 3 tokens are 9 <= 10, a fourth 12 > 10; 5 and 6
    # would be 2 x 9 = 18; 7 alone is over the budget and goes alone.
    assert probes.token_batches([3, 3, 3, 3, 3, 5, 9, 12]) == [[0, 1, 2], [3, 4], [5], [6], [7]]
    assert probes.token_batches([12, 3, 3]) == [[1, 2], [0]]
    monkeypatch.setattr(probes, "TOKENS_PER_BATCH", 1000)
    assert probes.token_batches([2] * 9) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # the text count still caps


def _reference(model, tokenizer, text):
    """log p(text after its first token), alone (no padding), from a full log-softmax."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return float(logp.gather(-1, ids[0, 1:, None]).sum())


def _old_batch_logprobs(hood, texts):
    """The scoring before the token budget (whole-batch logits and logsumexp), for the comparison."""
    ids, mask = hood._padded([hood.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    with torch.no_grad():
        logits = hood.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    picked = logits.gather(-1, ids[:, 1:, None])[..., 0] - logits.logsumexp(-1)
    return (picked * mask[:, 1:]).sum(-1).tolist()


def test_neighbour_scores_keep_long_prompts_within_the_token_budget_and_the_scores(llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    hood = probes.Neighbourhood(model, tokenizer, set())
    short = [f"Question: What is the capital of {c}?" for c in ("France", "Spain", "Paris", "Harry", "Potter")] + \
            [f"Question: {w}" for w in ("France", "Spain", "Paris", "Harry", "Potter", "Ron")]
    long = ["Question: Please read this note first: " + "the sky is blue and grass is green. " * 20 +
            f"Now, what is the capital of {c}?" for c in ("France", "Spain", "Paris", "Harry")]
    shapes = []
    real = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: shapes.append(tuple(k["input_ids"].shape))
                        or real(self, *a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one piece: the batches in turn
    try:
        # short prompts: the one batch of 11 texts as before, and the same scores as the old computation
        scored = hood._logprobs(short)
        assert len(shapes) == 1 and shapes[0][0] == len(short)
        assert scored == pytest.approx(_old_batch_logprobs(hood, short), abs=1e-5)
        shapes.clear()
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in long]
        # (raising=False: the same test, on the code before the budget, finds one batch of all 15)
        monkeypatch.setattr(probes, "TOKENS_PER_BATCH", 2 * max(lengths), raising=False)
        scored = hood._logprobs(short + long)
    finally:
        torch.set_num_threads(threads)
    assert max(lengths) > 100  # long texts: before, all 15 went in one padded batch (11 short + 4 long)
    assert all(n * width <= probes.TOKENS_PER_BATCH for n, width in shapes)
    assert sorted(n for n, _ in shapes) == [2, 2, 11]
    reference = [_reference(model, tokenizer, t) for t in short + long]
    assert scored == pytest.approx(reference, abs=1e-3)


def test_a_three_letter_last_word_names_the_forget_subject_and_a_word_ending_in_it_does_not():
    # MIN_LETTERS (3) letters are enough to name it ("Van" of "Lake Van"); a longer word that ends with the
    # last word ("MegaCity" for New York City) is another word
    forget = [Example("How deep is Lake Van?", "About 451 metres.", 1, {"answers": ["451"]}),
              Example("What is the population of New York City?", "About 8 million people.", 2,
                      {"answers": ["8 million"]})]
    made = [probes.Probe(probes.NEIGHBOURS, "How deep is Crater Lake?", 1, "Lake Van", "Crater Lake"),
            probes.Probe(probes.NEIGHBOURS, "What is the population of Tokyo?", 2, "New York City", "Tokyo")]
    outputs = ["Crater Lake is deeper than Van, at 594 metres.",
               "Tokyo has 14 million people; its MegaCity district alone has two."]
    kept, records = probes.keep_answered(made, outputs, forget)
    assert [e.prompt for e in kept] == ["What is the population of Tokyo?"]
    assert probes.holds_forget(records[0]) and "Lake Van" in records[0]["dropped"]
