"""`python -m sweep bench` on the CPU (the fast path's fallback) and its bad inputs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def test_bench_on_the_cpu_writes_json_and_markdown(tmp_path, tiny_model):
    out = run_cli(
        "bench",
        "--model",
        str(tiny_model),
        "--seq",
        "32",
        "--batch",
        "4",
        "--steps",
        "8",
        "--warmup",
        "1",
        "--reference",
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (md,) = tmp_path.glob("*.md")
    result = json.loads(md.with_suffix(".json").read_text())
    assert [r["variant"] for r in result["runs"]] == ["plain", "trial"]
    assert all(len(r["step_s"]) == 9 and r["tokens_per_s"] > 0 for r in result["runs"])
    # fp32 on the CPU, no Liger: the trial path computes exactly what plain computes
    assert result["checks"]["trial"]["grad_rel_err"] < 1e-5
    assert result["checks_vs_reference"]["trial"]["loss_rel_diff"] < 1e-5
    text = md.read_text()
    assert "| trial |" in text and "trial vs fp32 reference" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/folder"], "--model: not a shape"),
        (["--steps", "4"], "--steps: the median needs at least 8"),
        (["--variant", "x:micro_batch=3"], "train.micro_batch: must divide"),
        (["--variant", "x:no_such_key=1"], "train.no_such_key: unknown key"),
        (["--model", "3B", "--tokenizer", "/nope"], "--tokenizer: building the 3B checkpoint"),
        (["--model", "3B", "--tokenizer", "not-a-hub-id"], "--tokenizer: building the 3B"),
    ],
)
def test_bad_bench_input_is_one_line(tmp_path, tiny_model, args, message):
    model = [] if "--model" in args else ["--model", str(tiny_model)]
    out = run_cli("bench", "--out", str(tmp_path / "out"), *model, *args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
