"""The fast trial path computes what the plain recipe computes (issue 6), on the CPU.

On the GPU the same comparison runs inside `python -m sweep bench` (Liger's kernels included).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
from transformers import Trainer, TrainingArguments

from src import bench, models, speed, train_qlora
from src.data import IGNORE
from sweep.config import Train


def _train_cfg(**changes) -> dict:
    return {**dataclasses.asdict(Train()), **changes}


def _trial(tiny_model, tmp_path, dropout: float = 0.0, **changes):
    """The model as a trial builds it: LoRA r4 on the 4-bit tiny Qwen2."""
    params = {"method": "qlora", "r": 4, "lora_alpha": 8, "dropout": dropout}
    spec = bench.model_spec(str(tiny_model))
    return train_qlora.setup(spec, params, _train_cfg(**changes), tmp_path)[0]


def random_b(model, scale: float = 1.0) -> None:
    """LoRA B random too (it starts at zero), or A's gradient would be zero."""
    gen = torch.Generator().manual_seed(4)  # on the CPU: the same draws for a CUDA model
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(scale * torch.randn(param.shape, generator=gen))


def test_bf16_trial_path_matches_plain_recipe(tiny_model, tmp_path):
    """bf16 compute: plain upcasts norms and embeddings to fp32, the trial path keeps them in
    bf16; the loss and the LoRA gradients must still agree: relative error of all LoRA
    gradients < 1e-2, of each tensor < 2e-2 (measured 0.74 % and 1.2 %: bf16 rounding)."""
    batch = torch.randint(100, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = models.plain_lora(str(tiny_model), 4, 8, 0.0, torch.bfloat16)
    assert any(p.dtype == torch.float32 for p in plain.parameters() if not p.requires_grad)
    want = bench.loss_and_grads(plain, batch)
    trial = _trial(tiny_model, tmp_path, compute_dtype="bfloat16")
    frozen = [p for p in trial.parameters() if not p.requires_grad and p.dtype.is_floating_point]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # no fp32 upcast
    check = bench.compare(want, bench.loss_and_grads(trial, batch))
    assert check["lora_tensors"] == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    assert check["loss_rel_diff"] < 1e-2
    assert check["grad_rel_err"] < 1e-2 and check["grad_rel_err_max"] < 2e-2


def test_fp32_trial_path_equals_plain_recipe(tiny_model, tmp_path):
    batch = torch.randint(100, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    want = bench.loss_and_grads(models.plain_lora(str(tiny_model), 4, 8, 0.0, torch.float32), batch)
    check = bench.compare(want, bench.loss_and_grads(_trial(tiny_model, tmp_path), batch))
    assert check["loss_rel_diff"] < 1e-6 and check["grad_rel_err_max"] < 1e-5


def _examples(lengths: list[int]) -> list[dict]:
    gen = torch.Generator().manual_seed(2)
    out = []
    for n in lengths:
        ids = torch.randint(100, 1000, (n,), generator=gen).tolist()
        prompt = n // 2  # the loss on the answer half only, as src/data.py does
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * n,
                "labels": [IGNORE] * prompt + ids[prompt:],
            }
        )
    return out


def _losses_and_grads(model, *batches) -> list[tuple[float, list]]:
    """(loss, trainable parameters' gradients) of each batch, gradients cleared after each."""
    results = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        results.append(
            (loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
        )
        model.zero_grad()
    return results


def test_padding_free_batch_gives_the_padded_loss_and_gradients(tiny_model, tmp_path):
    """Concatenated examples with restarting positions must not attend across examples:
    the loss and gradients equal those of the padded batch."""
    model = _trial(tiny_model, tmp_path)
    tokenizer = models.load_tokenizer(str(tiny_model))
    examples = _examples([7, 19, 12])
    flat = speed.collator(tokenizer, packing=True, cuda=False)(examples)
    padded = speed.collator(tokenizer, packing=False, cuda=False)(examples)
    assert flat["input_ids"].shape == (1, 38) and "attention_mask" not in flat
    assert padded["input_ids"].shape == (3, 19)
    (loss_a, grads_a), (loss_b, grads_b) = _losses_and_grads(model, padded, flat)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [True, False])
def test_labelled_logits_give_the_full_loss_and_gradients(tiny_model, tmp_path, packing):
    """Rows of a long masked prompt and a short answer (as SQuAD's): logits only where a
    labelled token follows give the loss and gradients of the full logits, packed or padded,
    with checkpointing's recomputation (train mode), from a tenth of the positions."""
    model = _trial(tiny_model, tmp_path)
    model.train()
    random_b(model)
    tokenizer = models.load_tokenizer(str(tiny_model))
    examples = _examples([23, 9, 31])
    for example, answer in zip(examples, (3, 2, 4), strict=True):
        ids = example["input_ids"]
        example["labels"] = [IGNORE] * (len(ids) - answer) + ids[-answer:]
    full = speed.collator(tokenizer, packing, cuda=False)(copy.deepcopy(examples))
    kept = speed.collator(tokenizer, packing, cuda=False, labelled=True)(copy.deepcopy(examples))
    scored = int(full["labels"][:, 1:].ne(IGNORE).sum())
    assert scored == 9 and int(kept["labels"].ne(IGNORE).sum()) == scored
    positions = kept["logits_to_keep"]
    assert kept["labels"].shape[1] == len(positions) <= scored + 1
    assert positions[-1] == full["input_ids"].shape[1] - 1
    (loss_a, grads_a), (loss_b, grads_b) = _losses_and_grads(model, full, kept)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_only_a_model_that_takes_logits_to_keep_gets_labelled_logits(tiny_model, tmp_path):
    assert speed.keeps_logits(_trial(tiny_model, tmp_path))  # PEFT over transformers' Qwen2

    class RemoteCode(torch.nn.Module):
        def forward(self, input_ids, labels=None):
            return input_ids

    assert not speed.keeps_logits(RemoteCode())


def test_labelled_logits_of_a_batch_without_labels_score_nothing():
    batch = {"labels": torch.full((2, 5), IGNORE)}
    out = speed.labelled_logits(batch)
    assert out["logits_to_keep"].tolist() == [4]
    assert out["labels"].tolist() == [[IGNORE], [IGNORE]]
    every = {"labels": torch.arange(10).reshape(2, 5)}  # all scored: left as it is
    assert "logits_to_keep" not in speed.labelled_logits(every)


@pytest.mark.parametrize("scored,cut", [(2, True), (3, False)])
def test_a_fused_loss_keeps_every_position_where_many_are_scored(scored, cut):
    """Under Liger's fused training loss a batch is cut only where it scores at most
    `unfused_share` of its positions (then with the fused loss switched off for it); a batch
    scoring more keeps every position for the fused loss; validation is always cut."""
    labels = torch.full((1, 32), IGNORE)
    labels[0, -scored:] = 7
    collate = speed.LabelledLogits(lambda f: {"input_ids": torch.ones(1, 32), "labels": labels},
                                   fused=True, unfused_share=3 / 32)  # fmt: skip
    out = collate([])
    assert ("logits_to_keep" in out) is cut and out.get("skip_logits") is (False if cut else None)
    assert out["labels"] is not labels or not cut  # the collated batch itself left as it was
    collate.evaluating = True
    out = collate([])
    assert (
        out["logits_to_keep"].tolist() == list(range(31 - scored, 32)) and "skip_logits" not in out
    )


def test_equal_lengths_are_stacked_not_flattened(tiny_model):
    tokenizer = models.load_tokenizer(str(tiny_model))
    batch = speed.collator(tokenizer, packing=True, cuda=False)(_examples([9, 9]))
    assert batch["input_ids"].shape == (2, 9)


def test_micro_batches_take_the_same_optimizer_step(tiny_model, tmp_path):
    """batch 4 in one pass vs 2 micro-batches of 2: the same SGD step (token-weighted loss)."""
    from datasets import Dataset

    data = Dataset.from_list(_examples([5, 11, 8, 14]))
    weights = []
    for micro in (0, 2):
        cfg = _train_cfg(
            batch_size=4,
            micro_batch=micro,
            max_steps=1,
            optimizer="sgd",
            warmup_ratio=0.0,
            max_seq_len=64,
        )
        torch.manual_seed(0)
        model = _trial(tiny_model, tmp_path, **cfg)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
        trainer, _ = train_qlora.build_trainer(
            model,
            models.load_tokenizer(str(tiny_model)),
            data,
            None,
            cfg,
            0.1,
            tmp_path / str(micro),
        )
        assert trainer.args.gradient_accumulation_steps == (4 // micro if micro else 1)
        trainer.train()
        weights.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*weights, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert isinstance(trainer, Trainer) and isinstance(trainer.args, TrainingArguments)


@pytest.mark.parametrize(("share", "expected"), [(1.0, 2), (0.5, 1), (0.0, 0)])
def test_checkpoint_share_counts_layers(tiny_model, tmp_path, share, expected):
    model = _trial(tiny_model, tmp_path)  # 2 decoder layers, checkpointing on
    assert speed.checkpoint_share(model, share) == expected


def test_kernels_fall_back_on_the_cpu(tiny_model):
    model = models.load_16bit_model(str(tiny_model), torch.float32)
    if not torch.cuda.is_available():
        assert speed.fuse_kernels(model, "auto") == []
    assert speed.fuse_kernels(model, "none") == []


def test_compiled_checkpointed_layers_give_the_eager_gradients(tiny_model, tmp_path):
    """torch.compile per decoder layer (on the CPU here; the trial path compiles on CUDA only),
    with checkpointing and dropout on: the same loss and LoRA gradients as eager layers without
    checkpointing, so the recomputation replays the forward's dropout masks. Inductor draws
    its random numbers like eager here (fallback_random) to make the masks comparable."""
    batch = torch.randint(100, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)  # the same LoRA A
        model = _trial(tiny_model, tmp_path, dropout=0.3, gradient_checkpointing=compiled)
        random_b(model)
        assert speed.compile_layers(model, compiled) == (2 if compiled else 0)
        model.train()
        torch.manual_seed(5)
        with torch._inductor.config.patch(fallback_random=True):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        results.append((loss.item(), [p.grad for p in model.parameters() if p.requires_grad]))
    (want_loss, want), (got_loss, got) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    speed.decompile_layers(model)
    assert all(layer._compiled_call_impl is None for layer in speed.decoder_layers(model))


def test_trials_keep_attention_off_cudnn(monkeypatch):
    """cuDNN's SDPA builds a plan per new batch shape; a trial turns it off (on CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        speed.attention_backends(False)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        speed.attention_backends(True)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)  # torch's default
    assert not Train().cudnn_attention  # the trial's default


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), **kw):
    """What torch's varlen flash attention computes, by plain SDPA per sequence (the CPU has
    no flash kernel): causal within each [start, end) of the boundaries, empty ones skipped."""
    assert window_size == (-1, 0) and max_q == q.shape[0]
    _reference_varlen.calls += 1
    return speed.per_sequence_attention(q, k, v, cu_q.tolist())


def _acausal_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), **kw):
    """A kernel that lost the causal switch (as a backward could): each sequence sees all."""
    out = torch.zeros_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            part = torch.nn.functional.scaled_dot_product_attention(
                *(t[start:end].transpose(0, 1) for t in (q, k, v)), enable_gqa=True
            )
            out[start:end] = part.transpose(0, 1)
    return out


@pytest.mark.parametrize("kernel,agrees", [(_reference_varlen, True), (_acausal_varlen, False)])
def test_the_varlen_check_tells_a_right_kernel_from_a_wrong_one(monkeypatch, kernel, agrees):
    """Packed attention is installed only where the kernel passes `varlen_check`: a kernel
    computing what flash's does passes, one that attends past the causal edge does not."""
    _reference_varlen.calls = 0
    how = ({"window_size": (-1, 0)}, True, True)
    monkeypatch.setattr(speed, "_varlen", lambda: (kernel, *how))
    monkeypatch.setattr(speed, "DEVICES", {"cpu"})
    speed.varlen_check.cache_clear()
    try:
        gap = speed.varlen_check("cpu")
    finally:
        speed.varlen_check.cache_clear()
    assert (gap < speed.CHECK_TOLERANCE) is agrees, gap


@pytest.mark.parametrize("check", [lambda device: 1.16, "raises"])
def test_packed_attention_stays_off_where_the_kernel_fails_its_check(monkeypatch, capsys, check):
    """A kernel that disagrees with SDPA, or that cannot run, leaves SDPA in place and the
    trial says why on stderr (one line); the trial goes on."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def raises(device):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore")

    monkeypatch.setattr(speed, "packed_attention_available", lambda: True)
    monkeypatch.setattr(speed, "varlen_check", raises if check == "raises" else check)
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert speed.install_packed_attention() is False
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("packed_attention off: ")
    assert ("Ampere" if check == "raises" else "1.160") in said[0]


@pytest.fixture
def packed_on_cpu(monkeypatch):
    """Packed attention registered in this test only, the per-sequence SDPA standing in for
    torch's flash kernel (CUDA-only): the registry is restored afterwards."""
    from transformers.modeling_utils import AttentionInterface

    monkeypatch.setattr(
        AttentionInterface, "_global_mapping", dict(AttentionInterface._global_mapping)
    )
    monkeypatch.setattr(
        speed, "_varlen", lambda: (_reference_varlen, {"window_size": (-1, 0)}, True, True)
    )
    monkeypatch.setattr(speed, "DEVICES", {"cpu"})
    _reference_varlen.calls = 0
    speed.register_packed_attention()


def _packed_and_padded(tiny_model, tmp_path):
    model = _trial(tiny_model, tmp_path)
    random_b(model)
    tokenizer = models.load_tokenizer(str(tiny_model))
    examples = _examples([7, 19, 12])
    packed = speed.collator(tokenizer, packing=True, cuda=False, bucket=True, packed=True)(examples)
    padded = speed.collator(tokenizer, packing=False, cuda=False)(examples)
    return model, tokenizer, packed, padded


def test_packed_attention_gives_the_padded_loss_and_gradients(tiny_model, tmp_path, packed_on_cpu):
    """A concatenated row through the packed attention (its boundaries carried by the batch
    from the collator through PEFT and the model to every attention call) gives the padded
    batch's loss and gradients. torch's flash kernel is CUDA-only: on the CPU a per-sequence
    SDPA stands in for it, so this checks the plumbing and the boundaries; tests/gpu checks
    the kernel."""
    model, _, packed, padded = _packed_and_padded(tiny_model, tmp_path)
    # 38 tokens padded to 64 (one more sequence), boundaries padded with empty sequences
    assert packed["input_ids"].shape == (1, 64)
    assert packed[speed.BOUNDARIES].tolist() == [0, 7, 26, 38, 64] + [64] * 11
    (loss_a, grads_a), (loss_b, grads_b) = _losses_and_grads(model, padded, packed)
    assert _reference_varlen.calls == 2  # the packed row's forward, once per layer
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def test_a_trial_s_packed_rows_skip_transformers_mask(
    tiny_model, tmp_path, packed_on_cpu, monkeypatch
):
    """The trial's loss on a packed row (`TrialTrainer.compute_loss`) runs without the mask
    transformers builds for restarting positions, and without its check of the row (a wait
    for the card): the same loss and gradients as with them, the implementation "sdpa"
    again afterwards; a batch without boundaries (stacked equal lengths) as the model gives it."""
    from datasets import Dataset
    from transformers import masking_utils

    model, tokenizer, packed, _ = _packed_and_padded(tiny_model, tmp_path)
    checks = []
    find = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(
        masking_utils, "find_packed_sequence_indices", lambda *a: (checks.append(1), find(*a))[1]
    )
    rows = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2)
    trainer, _ = train_qlora.build_trainer(
        model, tokenizer, rows, None, _train_cfg(max_steps=1, batch_size=2), 1e-3, tmp_path
    )
    ((masked, grads_a),) = _losses_and_grads(model, packed)
    assert checks, "transformers no longer checks packed rows: this test checks nothing"
    checks.clear()
    loss = trainer.compute_loss(model, dict(packed))
    loss.backward()
    grads_b = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert checks == [] and _reference_varlen.calls == 4
    assert float(loss) == pytest.approx(masked, rel=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    stacked = speed.collator(tokenizer, packing=True, cuda=False, packed=True)(_examples([9, 9]))
    assert speed.BOUNDARIES not in stacked
    with torch.no_grad():
        assert float(trainer.compute_loss(model, dict(stacked))) == float(model(**stacked).loss)


def test_maskless_reaches_the_model_through_its_wrappers(tiny_model, tmp_path, packed_on_cpu):
    """PEFT's wrapper, and DataParallel's around it (the Trainer's where a process sees
    several GPUs): the model's own config is switched, and switched back."""
    model = _trial(tiny_model, tmp_path)
    config = model.get_base_model().config
    for wrapped in (model, torch.nn.DataParallel(model)):
        with speed.maskless(wrapped, True):
            assert config._attn_implementation == speed.MASKLESS
        assert config._attn_implementation == "sdpa"
    with speed.maskless(torch.nn.Linear(2, 2), True):  # no config: nothing to switch
        pass


def test_a_packed_row_without_a_mask_never_falls_back_to_sdpa(packed_on_cpu):
    """Where the varlen kernel cannot take a packed row (here: attention dropout in
    training), a row without a mask is an error, not attention across its sequences."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = type("Layer", (), {"training": True})()
    q = torch.randn(1, 2, 8, 4)
    bounds = torch.tensor([0, 3, 8], dtype=torch.int32)
    attention = ALL_ATTENTION_FUNCTIONS[speed.MASKLESS]
    with pytest.raises(ValueError, match="without a mask"):
        attention(module, q, q, q, None, dropout=0.1, **{speed.BOUNDARIES: bounds})


def test_only_liger_s_forward_counts_as_a_fused_loss(tiny_model, tmp_path):
    assert not speed.fuses_loss(_trial(tiny_model, tmp_path))  # transformers' own forward

    def forward(self, input_ids, labels=None):
        return input_ids

    forward.__module__ = "liger_kernel.transformers.model.qwen2"
    fused = type("Fused", (torch.nn.Module,), {"forward": forward})()
    assert speed.fuses_loss(fused)


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdamW32bit", "AdamW8bit"])
def test_the_optimizer_step_is_the_library_s_without_its_per_parameter_waits(name, monkeypatch):
    """bitsandbytes' step, as is and with `without_parameter_waits`: the same parameters after
    three steps, its per-parameter sync never called, and the library left as it was."""
    import bitsandbytes.optim as bnb_optim
    from bitsandbytes.optim import optimizer as bnb_optimizer

    def run(unwaited: bool) -> tuple[list[torch.Tensor], int]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 4096, generator=gen)) for _ in range(3)]
        optimizer = getattr(bnb_optim, name)(params, lr=1e-2)
        if unwaited:
            assert speed.without_parameter_waits(optimizer)
        waits = []
        monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda p: waits.append(p))
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        assert bnb_optimizer.sync_gpu is not speed._no_wait
        monkeypatch.undo()
        return [p.detach().clone() for p in params], len(waits)

    (waited, waits), (unwaited, none) = run(False), run(True)
    assert waits >= 9 and none == 0
    assert all(torch.equal(a, b) for a, b in zip(waited, unwaited, strict=True))
    assert not speed.without_parameter_waits(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]))


def counted_updates(monkeypatch) -> list:
    """bitsandbytes' update calls (8-bit blockwise and 32-bit), one entry each from now on."""
    import bitsandbytes.functional as bnb_functional

    calls = []
    for fn in ("optimizer_update_8bit_blockwise", "optimizer_update_32bit"):
        real = getattr(bnb_functional, fn)
        monkeypatch.setattr(
            bnb_functional, fn, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))
        )
    return calls


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdamW32bit", "AdamW8bit"])
def test_grouped_updates_are_the_library_s_to_the_bit(name, monkeypatch):
    """One update per group where it gives the same numbers: tensors of a multiple of 256
    elements and at least 4,096 (8-bit states) join the group, the others (a 32-bit state, a
    block cut by the tensor's end) keep their own update; three steps give the parameters of
    the library's per-tensor step to the bit, through the same `Parameter` objects."""
    import bitsandbytes.optim as bnb_optim

    shapes = [(16, 256), (8, 100), (64, 64), (48, 300), (32, 512)]

    def run(grouped: bool) -> tuple[list[torch.Tensor], int, int]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        optimizer = getattr(bnb_optim, name)(params, lr=1e-2, weight_decay=0.1)
        joined = speed.grouped_updates(optimizer) if grouped else 0
        calls = counted_updates(monkeypatch)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        monkeypatch.undo()
        assert all(p.grad is not None for p in params)  # the gradients stay where they were
        return [p.detach().clone() for p in params], joined, len(calls)

    (alone, none, per_tensor), (grouped, joined, fewer) = run(False), run(True)
    assert none == 0 and per_tensor == 3 * len(shapes)
    eight_bit = "8bit" in name
    assert joined == (3 if eight_bit else 5)
    assert fewer == 3 * ((1 + 2) if eight_bit else 1)
    assert all(torch.equal(a, b) for a, b in zip(alone, grouped, strict=True))
    stepped = getattr(bnb_optim, name)([torch.nn.Parameter(torch.ones(64, 64)) for _ in range(2)])
    for p in stepped.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    stepped.step()
    assert speed.grouped_updates(stepped) == 0  # states exist: left as it is
    assert speed.grouped_updates(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])) == 0


def test_grouped_updates_train_the_same_adapter(tiny_model, tmp_path):
    """Three trial steps with and without grouped updates (32-bit states: the tiny model's
    LoRA tensors are below 8-bit states' minimum size): the same LoRA weights to the bit, and
    the adapter saves and loads back as trained."""
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    tokenizer = models.load_tokenizer(str(tiny_model))
    rows = Dataset.from_list([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}] * 8)
    trained = {}
    for grouped in (False, True):
        torch.manual_seed(0)
        model = _trial(tiny_model, tmp_path / str(grouped))
        random_b(model, 0.1)
        cfg = _train_cfg(max_steps=3, batch_size=2, optimizer="paged_adamw_32bit",
                         grouped_updates=grouped)  # fmt: skip
        trainer, _ = train_qlora.build_trainer(
            model, tokenizer, rows, None, cfg, 1e-2, tmp_path / str(grouped)
        )
        trainer.train()
        groups = trainer.optimizer.optimizer.param_groups  # accelerate's wrapper around it
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert (sum(len(g["params"]) for g in groups) < len(lora)) == grouped
        trained[grouped] = lora
        model.save_pretrained(tmp_path / f"adapter-{grouped}")
    assert trained[False].keys() == trained[True].keys()
    assert all(torch.equal(trained[False][n], trained[True][n]) for n in trained[False])
    saved = load_peft_weights(str(tmp_path / "adapter-True"))
    set_peft_model_state_dict(model, saved)  # the saved tensors are the trained ones
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], trained[True][n]) for n in trained[True])
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in saved.values())


def test_a_trial_s_optimizer_steps_without_waits_and_the_plain_recipe_s_with(tiny_model, tmp_path):
    from datasets import Dataset

    model = _trial(tiny_model, tmp_path)
    tokenizer = models.load_tokenizer(str(tiny_model))
    rows = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2)
    for plain in (False, True):
        trainer, _ = train_qlora.build_trainer(
            model, tokenizer, rows, None, _train_cfg(max_steps=1, batch_size=2), 1e-3, tmp_path,
            plain=plain,
        )  # fmt: skip
        optimizer = trainer.create_optimizer()
        assert inspect.ismethod(optimizer.step) == plain  # the library's own, or the wrapper


def test_validation_runs_at_its_own_batch_size_in_trials_only(tiny_model, tmp_path):
    from datasets import Dataset

    model = _trial(tiny_model, tmp_path)
    tokenizer = models.load_tokenizer(str(tiny_model))
    rows = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2)
    sizes = {}
    for plain in (False, True):
        for val_batch in (0, 6):
            cfg = _train_cfg(max_steps=1, batch_size=2, val_batch_size=val_batch)
            trainer, _ = train_qlora.build_trainer(
                model, tokenizer, rows, rows, cfg, 1e-3, tmp_path, plain=plain
            )
            sizes[plain, val_batch] = trainer.args.per_device_eval_batch_size
    assert sizes == {(False, 0): 2, (False, 6): 6, (True, 0): 2, (True, 6): 2}


class _Driver:
    """libcuda.so.1 as ctypes would load it: the calls `speed.cuda_waits` makes, recorded."""

    def __init__(self, devices: int):
        self.devices, self.flags = devices, {}

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, count):
        count._obj.value = self.devices
        return 0

    def cuDeviceGet(self, device, index):
        device._obj.value = 100 + index
        return 0

    def cuDevicePrimaryCtxSetFlags_v2(self, device, flags):
        self.flags[device.value] = flags
        return 0


@pytest.mark.parametrize("mode, flags", [("block", 4), ("spin", 1), ("auto", 0)])
def test_cuda_waits_sets_every_visible_device_s_context_flags(monkeypatch, mode, flags):
    import ctypes

    driver = _Driver(devices=2)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: driver)
    assert speed.cuda_waits(mode)
    assert driver.flags == {100: flags, 101: flags}


def test_cuda_waits_leaves_the_default_without_a_mode_or_a_driver(monkeypatch):
    import ctypes

    def no_driver(name):
        raise OSError(name)

    assert not speed.cuda_waits(None) and not speed.cuda_waits("sometimes")
    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    assert not speed.cuda_waits("block")
    driver = _Driver(devices=0)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: driver)
    assert not speed.cuda_waits("block") and driver.flags == {}


def test_the_sweep_knows_the_wait_modes_a_trial_process_knows():
    """sweep/placement checks `SWEEP_CUDA_WAIT` without importing torch, so it names the
    modes itself: they must be the ones src/speed.cuda_waits sets, and the variable the one
    the trial process reads."""
    from sweep import placement

    assert set(placement.CUDA_WAIT_MODES) == set(speed.CUDA_WAITS)
    assert f'os.environ.get("{placement.CUDA_WAIT}")' in inspect.getsource(train_qlora.serve)
