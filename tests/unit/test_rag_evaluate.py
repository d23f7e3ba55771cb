"""Answer grading: the gold fact, refusals, citations and the threshold curve, on answers
made by hand (the notebook runs the same grading on the real model)."""

from __future__ import annotations

from llmlab.rag import NOT_FOUND, Answer, Hit
from llmlab.rag.evaluate import (
    HELDOUT2_QUESTIONS,
    HELDOUT3_QUESTIONS,
    HELDOUT_QUESTIONS,
    SAMPLE_DOCS,
    SAMPLE_QUESTIONS,
    AnswerReport,
    Question,
    grade,
    has_fact,
    load_questions,
    threshold_curve,
)

FEE = Question("What is the fee for a lost key fob?", ["membership.md"], "15 euros", "15")
MOON = Question("How many moons does Jupiter have?")


def hit(name: str, score: float = 0.5, chunk_id: str = "") -> Hit:
    return Hit("text", f"/docs/{name}", "line 1", score, chunk_id=chunk_id)


def test_every_answerable_question_has_a_fact_and_the_held_out_set_is_new():
    sample, held_out = load_questions(SAMPLE_QUESTIONS), load_questions(HELDOUT_QUESTIONS)
    held_out2 = load_questions(HELDOUT2_QUESTIONS)
    held_out3 = load_questions(HELDOUT3_QUESTIONS)
    for q in sample + held_out + held_out2 + held_out3:
        assert (q.fact is not None) == q.answerable
    assert not {q.question for q in sample} & {q.question for q in held_out}
    assert not {q.question for q in sample + held_out} & {q.question for q in held_out2}
    assert not {q.question for q in sample + held_out + held_out2} & {q.question for q in held_out3}
    assert sum(q.answerable for q in held_out) == 23 and len(held_out) == 28
    assert sum(q.answerable for q in held_out2) == 33 and len(held_out2) == 38
    assert sum(q.answerable for q in held_out3) == 30 and len(held_out3) == 35
    sources = {p.name for p in SAMPLE_DOCS.iterdir()}
    assert {s for q in held_out2 + held_out3 for s in q.sources} <= sources


def test_fact_is_found_in_any_spelling_ignoring_case():
    assert has_fact("The fee is 15 EUR [1].", "15")
    assert has_fact("Up to TWO guests.", ["two", "2"])
    assert not has_fact("Ask the front desk.", ["two", "2"]) and not has_fact("x", None)


def test_citation_numbers_and_other_numbers_do_not_count_as_the_fact():
    # A reply "1" with the sources listed as [1], [2], [3] does not say "two guests".
    assert not has_fact("The answer is: 1\n(Sources: [1], [2], [3])", ["two", "2"])
    assert not has_fact("Annual Report 2024, 12 euros per day.", "2")
    assert has_fact("Up to 2 guests [1].", "2") and has_fact("60 euros, see [2].", "60")
    assert has_fact("The lens is cleaned every Sunday.", ["clean", "maintenance"])
    questions = [
        load_questions(path)
        for path in (SAMPLE_QUESTIONS, HELDOUT_QUESTIONS, HELDOUT2_QUESTIONS, HELDOUT3_QUESTIONS)
    ]
    for q in sum(questions, []):
        assert not q.answerable or has_fact(q.answer, q.fact), q.question  # gold answers pass


def test_grades_fact_citation_and_refusal():
    right = grade(
        FEE, Answer(FEE.question, "A 15 euro fee [1].", [hit("membership.md")], True, [1])
    )
    wrong_file = grade(
        FEE, Answer(FEE.question, "15 [2].", [hit("membership.md"), hit("faq.md")], True, [2])
    )
    refused = grade(FEE, Answer(FEE.question, NOT_FOUND, [], found=False, best_score=0.2))
    moon = grade(MOON, Answer(MOON.question, NOT_FOUND, [], found=False, best_score=0.1))
    assert (right.fact_hit, right.citation_right, right.refused) == (True, True, False)
    assert (wrong_file.fact_hit, wrong_file.citation_right) == (True, False)
    assert (refused.fact_hit, refused.citation_right, refused.refused) == (False, None, True)
    report = AnswerReport([right, wrong_file, refused, moon])
    assert report.summary() == {
        "fact_hit_rate": round(2 / 3, 3),
        "refusal_rate": 1.0,
        "wrongly_refused": round(1 / 3, 3),
        "citation_accuracy": 0.5,
    }


def test_grade_keeps_the_passages_the_model_read_so_two_runs_can_be_compared():
    given = [hit("membership.md", chunk_id="m-3"), hit("faq.md", chunk_id="f-1")]
    answer = grade(FEE, Answer(FEE.question, "15 [1].", given, True, [1]))
    refused = grade(FEE, Answer(FEE.question, NOT_FOUND, [], found=False, best_score=0.2))
    assert answer.passages == ("m-3", "f-1")
    assert refused.passages == ()


def test_threshold_curve_counts_kept_and_refused_questions():
    scores = [(FEE, 0.30), (FEE, 0.50), (MOON, 0.10), (MOON, 0.28)]
    assert threshold_curve(scores, [0.0, 0.29, 0.6]) == [
        (0.0, 1.0, 0.0),
        (0.29, 1.0, 1.0),
        (0.6, 0.0, 1.0),
    ]
