"""src/train_qlora.py: running out of memory becomes an INFEASIBLE result, not a crash; the
Trainer it builds."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch

from src import cuda_graphs, models, speed, train_qlora


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_out_of_memory_is_recorded_as_infeasible(tmp_path, monkeypatch, error):
    def run_out(*args):
        raise error

    monkeypatch.setattr(train_qlora, "train_and_evaluate", run_out)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out_dir": str(tmp_path), "vram_budget_gb": 24.0}))
    result = train_qlora.main(spec)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert result.status.value == saved["status"] == "infeasible"
    assert saved["error"].startswith("oom: ") and saved["peak_memory_gib"] > 0


def test_other_errors_still_crash(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(train_qlora, "train_and_evaluate", broken)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out_dir": str(tmp_path)}))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train_qlora.main(spec)
    assert not (tmp_path / "result.json").exists()


def test_trainer_counts_flops_as_the_hf_trainer_with_one_parameter_count(
    tiny_model, tmp_path, monkeypatch
):
    from transformers import Trainer

    from tests.src.test_speed import _train_cfg, _trial

    model = _trial(tiny_model, tmp_path)
    tokenizer = models.load_tokenizer(str(tiny_model))
    trainer, _ = train_qlora.build_trainer(
        model, tokenizer, None, None, _train_cfg(), 0.1, tmp_path
    )
    batch = {"input_ids": torch.ones(3, 7, dtype=torch.long)}
    want = Trainer.floating_point_ops(trainer, batch)
    counted = []
    count = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kw: counted.append(1) or count(**kw))
    assert want > 0 and [trainer.floating_point_ops(batch) for _ in range(3)] == [want] * 3
    assert len(counted) == 1  # counted once, not at every step


def test_an_adapter_that_cannot_be_saved_fails_with_its_metric(
    tmp_path, monkeypatch, tiny_model, shared_data
):
    """Disk full at the save (injected): the trial still evaluates, then ends FAILED with
    the reason and its measured metric (issue 18)."""
    from sweep import config, trial
    from tests.conftest import write_config

    cfg = config.load(write_config(tmp_path, tiny_model, shared_data))
    study = cfg.studies["tiny"]
    params = {"model": "tiny", "method": "qlora", "r": 4, "lora_alpha": 8.0, "lr": 1e-3}
    folder = tmp_path / "trial"
    folder.mkdir()
    spec = trial.write_spec(cfg, study, params | {"dropout": 0.0}, folder)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_qlora, "save_weights", disk_full)
    result = train_qlora.main(spec)
    saved = json.loads((folder / "result.json").read_text())
    assert result.status.value == saved["status"] == "failed"
    assert saved["error"].startswith("adapter not saved: [Errno 28] No space left on device")
    assert 0 <= saved["metrics"]["accuracy"] <= 1 and not (folder / "adapter").exists()


def test_the_learning_curve_is_kept_with_validation_accuracy(
    tmp_path, tiny_model, shared_data, monkeypatch
):
    """Every step's tokens and loss, and at every validation its loss and (train.val_accuracy)
    the accuracy on the same rows: what the learning-curve table is made of (issue 19). Each
    validation tells the layers' graphs how many more will come (`GraphSet.begin_pass`; a
    stand-in set here: the CPU has no graphs)."""
    from sweep import config, trial
    from tests.conftest import write_config

    passes = []
    stand_in = SimpleNamespace(begin_pass=passes.append, stats={"capture_s": 0, "warm_up_s": 0})
    monkeypatch.setattr(cuda_graphs, "graph_set", lambda model: stand_in)

    path = write_config(tmp_path, tiny_model, shared_data)
    cfg = config.load(path, ["train.val_accuracy=true"], "tiny")
    study = cfg.studies["tiny"]
    params = {"model": "tiny", "method": "qlora", "r": 4, "lora_alpha": 8.0, "lr": 1e-3}
    folder = tmp_path / "trial"
    folder.mkdir()
    spec = trial.write_spec(cfg, study, params | {"dropout": 0.0}, folder)
    spec.write_text(json.dumps(json.loads(spec.read_text()) | {"profile_steps": [1, 2]}))
    result = train_qlora.main(spec)
    saved = json.loads((folder / "result.json").read_text())
    curve = saved["curve"]
    assert [row[0] for row in curve["train"]] == [1, 2, 3, 4]
    # each step's seconds: they add up to the training time (the whole-trial bench's steps)
    assert all(row[3] > 0 for row in curve["train"])
    assert sum(row[3] for row in curve["train"]) == pytest.approx(result.train_seconds, rel=0.01)
    # whole-trial bench --profile: steps 2 and 3 (after 1 done) under torch.profiler; its
    # window also holds what runs between them (step 2's validation), so it lies inside the
    # training loop, not inside the steps' own seconds (a loaded machine made that fail)
    profile = saved["profile"]
    assert profile["steps"] == [1, 3] and 0 < profile["wall_s"] < result.phases["train_loop"]
    assert profile["top_host_ops"] and profile["gpu_busy_s"] == 0.0  # the CPU: no kernels
    tokens = [row[1] for row in curve["train"]]
    assert tokens == sorted(tokens) and tokens[-1] == result.train_tokens > 0
    assert [row[0] for row in curve["val"]] == [2, 4]
    assert passes == [1, 0]  # validations at steps 2 and 4 of 4
    assert all(row[1] > 0 and 0 <= row[2] <= 1 for row in curve["val"])
    assert curve["val"][-1][1] == pytest.approx(result.last_val_loss)


def test_labelled_logits_train_the_same_trial(tmp_path, tiny_model, shared_data, monkeypatch):
    """A whole trial (Trainer, its token count per batch, validation, evaluation) with logits
    only where an answer token follows, against every position's: the same losses (to float
    rounding) and metric. Under a fused training loss (Liger's, stood in for here: its
    forward's `skip_logits` switch) training batches are cut where few positions are scored
    (`unfused_share`; these SST-2 rows score 1 in ~40), with the fused loss switched off for
    them; at `unfused_share = 0` only the validation batches are cut."""
    import transformers

    from sweep import config, trial
    from tests.conftest import write_config

    path = write_config(tmp_path, tiny_model, shared_data)
    params = {"model": "tiny", "method": "qlora", "r": 4, "lora_alpha": 8.0, "lr": 1e-3}
    saved, seen = {}, {}
    collate = speed.LabelledLogits.__call__
    forward = transformers.Qwen2ForCausalLM.forward

    def spy(self, features):
        out = collate(self, features)
        seen[name].append((self.evaluating, "logits_to_keep" in out, out.get("skip_logits")))
        return out

    @functools.wraps(forward)
    def liger_like(self, *args, skip_logits=None, **kwargs):  # Liger's switch, taken here
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(speed.LabelledLogits, "__call__", spy)
    monkeypatch.setattr(transformers.Qwen2ForCausalLM, "forward", liger_like)
    runs = (
        ("on", True, False, "0.0625"),
        ("fused", True, True, "0.0625"),
        ("fused-always", True, True, "0"),
        ("off", False, False, "0.0625"),
    )
    for name, labelled, fused, share in runs:
        monkeypatch.setattr(speed, "fuses_loss", lambda model, fused=fused: fused)
        sets = [f"train.labelled_logits={str(labelled).lower()}", f"train.unfused_share={share}"]
        cfg = config.load(path, sets, "tiny")
        folder = tmp_path / name
        folder.mkdir()
        spec = trial.write_spec(cfg, cfg.studies["tiny"], params | {"dropout": 0.0}, folder)
        seen[name] = []
        train_qlora.main(spec)
        saved[name] = json.loads((folder / "result.json").read_text())
    assert not seen["off"]
    assert seen["on"] and all(kept and skip is None for _, kept, skip in seen["on"])
    for name in ("fused", "fused-always"):
        assert {evaluating for evaluating, _, _ in seen[name]} == {True, False}
    # few positions scored: every batch cut; training's with the fused loss switched off
    assert all(kept and skip is (None if ev else False) for ev, kept, skip in seen["fused"])
    assert all(ev == kept and skip is None for ev, kept, skip in seen["fused-always"])
    off = saved["off"]
    for on in (saved["on"], saved["fused"], saved["fused-always"]):
        assert on["status"] == off["status"] == "success"
        for a, b in zip(on["curve"]["train"], off["curve"]["train"], strict=True):
            assert a[:2] == b[:2] and a[2] == pytest.approx(b[2], rel=1e-4)
        for a, b in zip(on["curve"]["val"], off["curve"]["val"], strict=True):
            assert a[0] == b[0] and a[1] == pytest.approx(b[1], rel=1e-4)
        assert on["metrics"] == pytest.approx(off["metrics"], rel=1e-3)


def test_step_losses_without_the_trainer_s_logging_are_the_ones_it_logs(
    tmp_path, tiny_model, shared_data, monkeypatch
):
    """The trial path takes each step's loss from `training_step` (summed over micro-batches
    in float32) instead of the Trainer's per-step logging, which waits for the card: with the
    Trainer's logging switched back on in the same trial, every step's two losses are equal,
    and the tokens and steps with them."""
    from sweep import config, trial
    from tests.conftest import write_config

    arguments = train_qlora.TrainingArguments

    def logging_on(**kwargs):
        assert kwargs["logging_strategy"] == "no"  # the trial path does not log
        return arguments(**kwargs | {"logging_strategy": "steps"})

    monkeypatch.setattr(train_qlora, "TrainingArguments", logging_on)
    path = write_config(tmp_path, tiny_model, shared_data)
    cfg = config.load(path, ["train.micro_batch=2"], "tiny")  # 2 micro-batches a step
    params = {"model": "tiny", "method": "qlora", "r": 4, "lora_alpha": 8.0, "lr": 1e-3}
    folder = tmp_path / "trial"
    folder.mkdir()
    spec = trial.write_spec(cfg, cfg.studies["tiny"], params | {"dropout": 0.0}, folder)
    train_qlora.main(spec)
    rows = json.loads((folder / "result.json").read_text())["curve"]["train"]
    taken, logged = rows[0::2], rows[1::2]
    assert [row[0] for row in taken] == [row[0] for row in logged] == [1, 2, 3, 4]
    for ours, theirs in zip(taken, logged, strict=True):
        assert ours[:3] == theirs[:3] and ours[2] > 0
