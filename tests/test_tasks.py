"""The task families: every generated answer passes its own scorer and validity check, splits are disjoint and
deterministic, and the scorers refuse wrong answers."""

import pytest

from dgemma import tasks


@pytest.mark.parametrize("family", sorted(tasks.FAMILIES))
def test_family_generates_scorable_disjoint_splits(family):
    train, test = tasks.examples(family, 300, "train"), tasks.examples(family, 60, "test")
    assert len(train) == 300 and len(test) == 60
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert [e.prompt for e in tasks.examples(family, 20, "test")] == [e.prompt for e in test[:20]]
    for e in train[:50] + test[:20]:
        assert tasks.score(family, " " + e.answer + "\n", e.answer)
        assert tasks.valid(family, e.answer) in (True, None)
        assert not tasks.score(family, e.answer + "x", e.answer)
    if tasks.FAMILIES[family].structured:
        assert tasks.valid(family, test[0].answer[:-1]) is False  # a truncated structure is not valid
    assert len({e.prompt for e in train}) > 250  # enough distinct prompts to learn from


def test_answers_are_right():
    assert tasks.examples("add", 1, "train")[0].answer == str(eval(tasks.examples("add", 1, "train")[0].prompt[5:]))
    e = tasks.examples("sort", 1, "train")[0]
    assert e.answer.split() == sorted(e.prompt.split()[1:], key=int)
    e = tasks.examples("fill", 1, "test")[0]
    terms = e.prompt.removeprefix("Fill the gap: ").split()
    i = terms.index("_")
    terms[i] = e.answer
    values = list(map(int, terms))
    assert len({b - a for a, b in zip(values, values[1:], strict=False)}) == 1
    with pytest.raises(ValueError, match="unknown task family"):
        tasks.examples("poetry", 1, "train")
