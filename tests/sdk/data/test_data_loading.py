import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsilo.sdk.data import DataError, DatasetSpec, load_examples

ROWS = [
    {"label": 1, "content": "stocks rally", "note": "a"},
    {"label": 2, "content": "team wins cup", "note": "b"},
    {"label": 1, "content": "bank cuts rates", "note": "c"},
    {"label": 2, "content": "striker scores", "note": "d"},
]
WORDS = {"1": "Business", "2": "Sports"}


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        keys = list(rows[0])
        lines = [sep.join(keys)] + [sep.join(str(r[k]) for k in keys) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _spec(path, **kw):
    base = dict(
        path=str(path),
        kind="classification",
        template="classify",
        columns={"text": "content"},
        label_column="label",
        label_words=WORDS,
    )
    base.update(kw)
    return DatasetSpec(**base)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_load_each_format(tmp_path, suffix):
    path = _write(tmp_path / f"news{suffix}", ROWS)
    examples, task = load_examples(_spec(path), cache_dir=tmp_path / "cache")
    assert task.kind == "classification"
    assert task.candidates == ("Business", "Sports")
    assert task.name == "news"
    assert [e.response for e in examples] == ["Business", "Sports", "Business", "Sports"]
    assert [e.group for e in examples] == [e.response for e in examples]
    assert examples[0].prompt.startswith("stocks rally\n")
    assert "Business, Sports" in examples[0].prompt


def test_explicit_format_overrides_suffix(tmp_path):
    path = tmp_path / "news.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    examples, _ = load_examples(_spec(path, format="jsonl"), cache_dir=tmp_path / "cache")
    assert len(examples) == 4


def test_unknown_format(tmp_path):
    path = _write(tmp_path / "news.jsonl", ROWS).rename(tmp_path / "news.xml")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_examples(_spec(path))
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        load_examples(_spec(path, format="xml"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(_spec(tmp_path / "nope.csv"))


def test_unknown_column_lists_available(tmp_path):
    path = _write(tmp_path / "news.csv", ROWS)
    with pytest.raises(DataError, match=r"'text'.*available columns: label, content, note"):
        load_examples(_spec(path, columns={}), cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="'lbl'"):
        load_examples(_spec(path, label_column="lbl"), cache_dir=tmp_path / "cache")


def test_mapping_key_not_in_template(tmp_path):
    path = _write(tmp_path / "news.csv", ROWS)
    with pytest.raises(DataError, match=r"maps field.*'txt'"):
        load_examples(_spec(path, columns={"txt": "content"}), cache_dir=tmp_path / "cache")


def test_label_without_word(tmp_path):
    path = _write(tmp_path / "news.csv", [*ROWS, {"label": 3, "content": "x", "note": "e"}])
    with pytest.raises(DataError, match=r"label value\(s\) '3'.*no label word"):
        load_examples(_spec(path), cache_dir=tmp_path / "cache")


def test_numeric_labels_need_words_but_word_labels_do_not(tmp_path):
    path = _write(tmp_path / "news.csv", ROWS)
    with pytest.raises(DataError, match="set label_words"):
        load_examples(_spec(path, label_words=None), cache_dir=tmp_path / "cache")
    rows = [{"label": w, "content": "c"} for w in ("no", "yes", "no")]
    path = _write(tmp_path / "words.jsonl", rows)
    examples, task = load_examples(_spec(path, label_words=None), cache_dir=tmp_path / "cache")
    assert task.candidates == ("no", "yes")
    assert [e.response for e in examples] == ["no", "yes", "no"]


def test_generation_with_optional_context_and_group(tmp_path):
    rows = [
        {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "qa"},
        {
            "instruction": "Summarise.",
            "context": "Long text.",
            "response": "Short.",
            "category": "s",
        },
    ]
    path = _write(tmp_path / "gen.jsonl", rows)
    spec = DatasetSpec(
        path=str(path), kind="generation", response_column="response", label_column="category"
    )
    examples, task = load_examples(spec, cache_dir=tmp_path / "cache")
    assert task.kind == "generation" and task.candidates == ()
    assert "### Input" not in examples[0].prompt
    assert "### Input:\nLong text." in examples[1].prompt
    assert [(e.response, e.group) for e in examples] == [("Apple.", "qa"), ("Short.", "s")]
    # a data set without a context column still works with alpaca (context is optional)
    path2 = _write(
        tmp_path / "gen2.jsonl", [{k: r[k] for k in ("instruction", "response")} for r in rows]
    )
    spec2 = DatasetSpec(path=str(path2), kind="generation", response_column="response")
    examples2, _ = load_examples(spec2, cache_dir=tmp_path / "cache")
    assert examples2[1].group is None and "### Input" not in examples2[1].prompt


def test_generation_needs_response_column(tmp_path):
    path = _write(tmp_path / "gen.jsonl", [{"instruction": "a", "response": "b"}])
    with pytest.raises(DataError, match="needs response_column"):
        load_examples(DatasetSpec(path=str(path), kind="generation"), cache_dir=tmp_path / "c")


def test_limit_is_seeded_subset(tmp_path):
    rows = [{"label": 1 + i % 2, "content": f"row {i}"} for i in range(40)]
    path = _write(tmp_path / "many.jsonl", rows)
    a, _ = load_examples(_spec(path), limit=10, seed=1, cache_dir=tmp_path / "cache")
    b, _ = load_examples(_spec(path), limit=10, seed=1, cache_dir=tmp_path / "cache")
    c, _ = load_examples(_spec(path), limit=10, seed=2, cache_dir=tmp_path / "cache")
    assert a == b and len(a) == 10 and a != c
    assert len({e.prompt for e in a}) == 10
    for e in a:  # prompt and label stay paired after the shuffle
        i = int(e.prompt.split("\n")[0].split()[1])
        assert e.response == WORDS[str(1 + i % 2)]
    with pytest.raises(DataError, match="limit"):
        load_examples(_spec(path), limit=0)
