"""`python -m sweep bench` on the CPU (the fast path's fallback) and its bad inputs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def test_bench_on_the_cpu_writes_json_and_markdown(tmp_path, tiny_model):
    scratch = tmp_path / "tmp"  # the bench's work folder goes here, and is removed at the end
    scratch.mkdir()
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
        "--out",
        str(tmp_path),
        env={"TMPDIR": str(scratch)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list(scratch.iterdir())
    (md,) = tmp_path.glob("*.md")
    result = json.loads(md.with_suffix(".json").read_text())
    # no autocast on the CPU: one plain recipe; each recipe measured in a process of its own
    assert [r["variant"] for r in result["runs"]] == ["plain", "trial"]
    assert all(len(r["step_s"]) == 9 and r["tokens_per_s"] > 0 for r in result["runs"])
    assert all(
        r["peak_allocated_gib"] is None and r["recorded_peak_gib"] > 0 for r in result["runs"]
    )
    # fp32 on the CPU, no Liger: the trial path computes exactly what plain computes
    plain, trial = (r["checks"] for r in result["runs"])
    assert plain["as_trained"] is None and plain["vs_fp32_plain"]["grad_rel_err"] == 0
    for key in ("as_trained", "fp32", "vs_fp32_plain"):
        assert trial[key]["grad_rel_err"] < 1e-5, key
        assert trial[key]["lora_tensors"] > 0
    text = md.read_text()
    assert "| trial | plain, both in fp32 |" in text and "| plain | plain in fp32 |" in text


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


def test_recipes_autocast_as_their_trainers_do():
    from sweep.bench import recipes

    variants = {"trial": {"compute_dtype": "auto"}, "fp32": {"compute_dtype": "float32"}}
    on_gpu = {r["name"]: r["autocast"] for r in recipes(True, variants)}
    assert on_gpu == {"plain": False, "plain+autocast": True, "trial": True, "fp32": False}
    assert [r["name"] for r in recipes(False, variants)] == ["plain", "trial", "fp32"]
