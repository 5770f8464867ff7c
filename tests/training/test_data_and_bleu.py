"""Reading training files, tokenizing with EOS, and multi-reference BLEU."""

from __future__ import annotations

import json

import pytest
import sacrebleu

from server.training.bleu import multi_reference_bleu
from server.training.data import Example, group_references, parse_mr, read_examples, table_prompt, tokenize

E2E_CSV = '''mr,ref
"name[Alimentum], area[city centre], familyFriendly[no]","There is a place in the city centre, Alimentum, that is not family-friendly."
"name[Alimentum], area[city centre], familyFriendly[no]","In the city centre there is a venue name Alimentum, this is not a family-friendly venue."
"name[Aromi], eatType[coffee shop]",Aromi is a coffee shop.
'''


def test_reads_e2e_csv_into_table_prompts_and_spaced_completions(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text(E2E_CSV)
    examples = read_examples(path)
    assert len(examples) == 3
    assert examples[0].prompt == table_prompt("name[Alimentum], area[city centre], familyFriendly[no]")
    assert "name: Alimentum | area: city centre | familyFriendly: no" in examples[0].prompt
    assert examples[2].completion == " Aromi is a coffee shop."
    groups = group_references(examples)
    assert [len(refs) for _, refs in groups] == [2, 1]
    assert groups[1][1] == ["Aromi is a coffee shop."]


def test_parse_mr_keeps_values_with_spaces_and_signs():
    assert parse_mr("name[The Eagle], priceRange[£20-25], customer rating[3 out of 5]") == [
        ("name", "The Eagle"), ("priceRange", "£20-25"), ("customer rating", "3 out of 5")]
    with pytest.raises(ValueError, match="no slot"):
        parse_mr("just words")


def test_reads_jsonl_and_names_the_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Q:", "completion": " A"}) + "\n\n")
    assert read_examples(good) == [Example("Q:", " A")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q:", "completion": " A"}) + "\n" + json.dumps({"prompt": "Q:"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        read_examples(bad)
    wrong = tmp_path / "x.txt"
    wrong.write_text("hi")
    with pytest.raises(ValueError, match="expected .jsonl or .csv"):
        read_examples(wrong)
    csv = tmp_path / "other.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"columns 'mr' and 'ref'.*\['a', 'b'\]"):
        read_examples(csv)


def test_tokenize_appends_eos_to_the_completion_only(tokenizer):
    [t] = tokenize(tokenizer, [Example("Q:", " ab")], max_length=16)
    assert t.prompt_ids == tuple(tokenizer("Q:")["input_ids"])
    assert t.completion_ids == tuple(tokenizer(" ab", add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)
    assert len(t) == 2 + 3 + 1


def test_tokenize_refuses_long_and_promptless_examples_with_numbers(tokenizer):
    with pytest.raises(ValueError, match=r"example 1 has 10 tokens \(prompt 2 \+ completion 8 with EOS\); "
                                         r"max_length is 8"):
        tokenize(tokenizer, [Example("Q:", " a"), Example("Q:", " abcdef")], max_length=8)
    with pytest.raises(ValueError, match=r"example 0 has an empty prompt"):
        tokenize(tokenizer, [Example("", " a")], max_length=8)


def test_bleu_scores_each_hypothesis_against_all_its_references():
    hyps = ["Aromi is a coffee shop in the city centre .", "The Eagle is cheap ."]
    refs = [["Aromi is a coffee shop .", "Aromi is a coffee shop in the city centre ."], ["The Eagle is cheap ."]]
    score = multi_reference_bleu(hyps, refs)
    assert score.score == pytest.approx(100.0)  # each matches one of its references exactly
    assert score.max_references == 2 and score.num_hypotheses == 2
    # Against only the first reference it is lower: the second reference counted.
    first_only = multi_reference_bleu(hyps, [r[:1] for r in refs])
    assert first_only.score < 90
    assert first_only.score == pytest.approx(sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]]).score)


def test_bleu_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        multi_reference_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="input 1 has no reference"):
        multi_reference_bleu(["a", "b"], [["a"], []])
