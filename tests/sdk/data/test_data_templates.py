import pytest

from fedsilo.sdk.data import ALPACA, CLASSIFY, SNLI, DataError, PromptTemplate, get_template


def test_alpaca_picks_variant_by_context():
    with_ctx = ALPACA.render(instruction="Sum it up.", context="Some text.")
    assert "### Input:\nSome text.\n\n### Response:\n" in with_ctx
    assert with_ctx.startswith("Below is an instruction that describes a task, paired with")
    without = ALPACA.render(instruction="Sum it up.", context="   ")
    assert "### Input" not in without
    assert without.endswith("### Instruction:\nSum it up.\n\n### Response:\n")
    assert ALPACA.render(instruction="x") == ALPACA.render(instruction="x", context=None)


def test_snli_template_matches_paper():
    text = SNLI.render(premise="A dog runs.", hypothesis="An animal moves.")
    assert text == 'Suppose A dog runs. Can we infer that "An animal moves."? Yes, No, or Maybe?\n'


def test_classify_ends_with_newline_and_ignores_extra_fields():
    text = CLASSIFY.render(text="great film", choices="bad, good", label="unused")
    assert text.endswith("Answer:\n")
    assert "great film" in text and "bad, good" in text


def test_missing_field_names_field_and_template():
    with pytest.raises(DataError, match=r"'snli' needs field 'hypothesis'"):
        SNLI.render(premise="p")


def test_get_template_names_and_custom_format():
    assert get_template("Alpaca") is ALPACA
    custom = get_template("Q: {question}\nA:\n")
    assert custom.fields == ("question",)
    assert custom.render(question="why?") == "Q: why?\nA:\n"


@pytest.mark.parametrize("bad", ["nonsense", "no fields {{here}}", "{} positional", "{a.b}"])
def test_get_template_rejects_bad_input(bad):
    with pytest.raises(DataError):
        get_template(bad)


def test_template_fields_union():
    t = PromptTemplate("t", "{a} {context}", "{a}")
    assert t.fields == ("a", "context")
    assert t.required_fields(with_context=False) == ("a",)
