"""`python -m sweep score`: the official numbers from files, one-line errors on bad input."""

from __future__ import annotations

import json
import lzma

import pytest

from objectives import squad
from tests.conftest import run_cli


def _squad_gold(shared_data):
    return squad.gold_answers(squad.read_dataset(shared_data / squad.LOCAL_FILES[0]))


def _score(*args):
    out = run_cli("score", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout), out.stderr


def test_squad_gold_answers_score_100(tmp_path, shared_data):
    preds = {qid: answers[0] for qid, answers in _squad_gold(shared_data).items()}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    result, _ = _score("squad", str(tmp_path / "p.json"), "--data", str(shared_data))
    assert result["exact_match"] == 100.0 and result["f1"] == 100.0
    assert result["total"] == 10570 and result["missing"] == 0


def test_squad_missing_and_unknown_ids_are_reported(tmp_path, shared_data):
    gold = _squad_gold(shared_data)
    ids = sorted(gold)
    preds = {qid: gold[qid][0] for qid in ids[: len(ids) // 2]} | {"not-a-question": "x"}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    dev = tmp_path / "dev.json"
    dev.write_bytes(lzma.open(shared_data / squad.LOCAL_FILES[0]).read())
    result, err = _score("squad", str(tmp_path / "p.json"), "--dataset", str(dev))
    assert result["missing"] == len(ids) - len(ids) // 2 and result["unknown"] == 1
    assert result["exact_match"] == pytest.approx(100 * (len(ids) // 2) / len(ids))
    assert "question ids missing (score 0)" in err and "not-a-question" in err


def test_alpacaeval_annotations_reproduce_the_leaderboard(tmp_path, shared_data):
    pool = shared_data / "alpacaeval/annotations/weighted_alpaca_eval_gpt4_turbo"
    (tmp_path / "a.json").write_bytes(lzma.open(pool / "claude-2.json.xz").read())
    result, _ = _score("alpacaeval", str(tmp_path / "a.json"), "--data", str(shared_data))
    assert result["win_rate"] == pytest.approx(17.19, abs=0.01)  # leaderboard CSV
    assert result["n_total"] == 805 and "length_controlled_winrate" in result


def prefer_longer(records):
    """A plug-in judge for the test: the longer answer wins."""
    return [2.0 if len(r["output_2"]) > len(r["output_1"]) else 1.0 for r in records]


def test_alpacaeval_outputs_judged_by_a_plugged_in_judge(tmp_path, shared_data):
    rows = [json.loads(line) for line in open(shared_data / "alpacaeval/alpaca_eval.jsonl")]
    outputs = [{"instruction": r["instruction"], "output": "short"} for r in rows[:30]]
    outputs[0]["output"] = "long " * 2000
    (tmp_path / "o.json").write_text(json.dumps(outputs))
    result, _ = _score(
        "alpacaeval",
        str(tmp_path / "o.json"),
        "--judge",
        "tests.sweep.test_score:prefer_longer",
        "--data",
        str(shared_data),
    )
    assert result["n_total"] == 30 and result["win_rate"] == pytest.approx(100 / 30)


BAD = [
    (["squad", "{missing}"], "no such file"),
    (["squad", "{broken}"], "is not valid JSON"),
    (["squad", "{empty_obj}"], "is empty"),
    (["squad", "{list}"], "should hold an object"),
    (["squad", "{numbers}"], "answers must be strings"),
    (["alpacaeval", "{empty_list}"], "is empty"),
    (["alpacaeval", "{obj}"], "should hold a list"),
    (["alpacaeval", "{no_pref}"], "record 0 lacks output_2, preference"),
    (["alpacaeval", "{list}", "--judge", "nonsense"], "unknown judge"),
    (["alpacaeval", "{list}", "--judge", "local"], "instructions are not AlpacaEval's"),
    (["squad", "{obj}", "--dataset", "{broken}"], "is not a SQuAD v1.1 JSON file"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_score_input_is_one_line(tmp_path, shared_data, args, message):
    files = {
        "missing": tmp_path / "nope.json",
        "broken": tmp_path / "broken.json",
        "empty_obj": tmp_path / "empty.json",
        "empty_list": tmp_path / "empty_list.json",
        "list": tmp_path / "list.json",
        "obj": tmp_path / "obj.json",
        "numbers": tmp_path / "numbers.json",
        "no_pref": tmp_path / "no_pref.json",
    }
    files["broken"].write_text('{"a": ')
    files["empty_obj"].write_text("{}")
    files["empty_list"].write_text("[]")
    files["list"].write_text('[{"instruction": "x", "output": "y"}]')
    files["obj"].write_text('{"q": "a"}')
    files["numbers"].write_text('{"q": 3}')
    files["no_pref"].write_text('[{"instruction": "x", "output_1": "y"}]')
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    out = run_cli("score", *argv, "--data", str(shared_data))
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert message in out.stderr


def test_unknown_task_is_rejected():
    out = run_cli("score", "mnli", "x.json")
    assert out.returncode == 2 and "invalid choice: 'mnli'" in out.stderr
