"""The hand-written checkpoint that CUDA graphs replay (src/cuda_graphs.py), on the CPU: the
same checkpoint runs there eagerly. The graphs themselves are checked on the GPU
(tests/gpu/test_cuda_graphs.py and the bench's gradient comparison)."""

from __future__ import annotations

import pytest
import torch

from src import cuda_graphs, fused_lora, models, speed, train_qlora
from tests.src.test_speed import _examples, _trial, random_b


def _loss_and_grads(model, batch) -> tuple[float, list]:
    model.train()
    torch.manual_seed(5)  # the same dropout masks in the same order
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]


def test_checkpoint_replays_dropout_and_gives_the_eager_gradients(tiny_model, tmp_path):
    """Layers through `cuda_graphs.Checkpoint` (eager runner), dropout 0.3: the same loss and
    LoRA gradients as layers that keep their activations, so the recomputation drew the
    forward's masks; and no layer keeps torch's own checkpointing besides."""
    ids = torch.randint(100, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}
    results = []
    for ours in (False, True):
        torch.manual_seed(0)  # the same LoRA A
        model = _trial(tiny_model, tmp_path, dropout=0.3, gradient_checkpointing=ours)
        random_b(model)
        layers = speed.decoder_layers(model)
        assert cuda_graphs.install(layers, graphs=False) == (2 if ours else 0)
        assert not any(layer.gradient_checkpointing for layer in layers)
        results.append(_loss_and_grads(model, batch))
    (want_loss, want), (got_loss, got) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():  # evaluation runs the layers as they are
        installed = model(**batch).loss
        speed.decompile_layers(model)
        assert all(layer._compiled_call_impl is None for layer in layers)
        assert all(layer.gradient_checkpointing for layer in layers)  # torch's, as before
        assert model(**batch).loss.item() == installed.item()


def test_dequantize_once_gives_the_same_gradients_from_two_thirds_of_the_dequantizations(
    tiny_model, tmp_path, monkeypatch
):
    """`dequantize_once`: a recomputed layer's LoRA layers keep the dense weight of their
    recomputation for their backward. The same loss and gradients, bit for bit, and per
    step two dequantizations of each 4-bit weight (forward, recomputation) instead of three;
    nothing kept outside a recomputation."""
    import bitsandbytes.functional as F

    ids = torch.randint(100, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}
    real, calls = F.dequantize_4bit, []
    monkeypatch.setattr(F, "dequantize_4bit", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    results = []
    for once in (False, True):
        torch.manual_seed(0)
        model = _trial(tiny_model, tmp_path, dropout=0.3)
        random_b(model)
        cuda_graphs.install(speed.decoder_layers(model), graphs=False, dequantize_once=once)
        calls.clear()
        results.append((*_loss_and_grads(model, batch), len(calls)))
    (want_loss, want, three), (got_loss, got, two) = results
    assert got_loss == want_loss
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert (three, two) == (3 * 14, 2 * 14)  # 7 linear layers in each of 2 decoder layers
    with torch.no_grad(), fused_lora.weights_kept():  # no gradients: nothing to keep
        calls.clear()
        model(**batch)
        assert len(calls) == 14


@pytest.mark.parametrize(
    ("n", "bucket"), [(1, 64), (64, 64), (65, 128), (700, 704), (1000, 1024), (4097, 4608)]
)
def test_bucket_lengths(n, bucket):
    assert speed.bucket_length(n) == bucket
    assert bucket - n <= max(63, n // 8)


def test_bucketed_batch_gives_the_same_loss_and_gradients(tiny_model, tmp_path):
    """Padding a padding-free row (and a stacked one) to its bucket changes nothing the loss
    or the gradients see, and the collator counts the padding it added."""
    model = _trial(tiny_model, tmp_path)
    random_b(model)
    tokenizer = models.load_tokenizer(str(tiny_model))
    cases = (([7, 19, 12], (1, 38), (1, 64)), ([9, 9], (2, 9), (2, 64)))
    for lengths, shape, padded_shape in cases:
        plain = speed.collator(tokenizer, packing=True, cuda=False)(_examples(lengths))
        bucketed = speed.collator(tokenizer, packing=True, cuda=False, bucket=True)
        batch = bucketed(_examples(lengths))
        assert plain["input_ids"].shape == shape and batch["input_ids"].shape == padded_shape
        assert bucketed.padding == (padded_shape[1] - shape[1]) * shape[0]
        assert "attention_mask" not in batch
        (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_grads(model, b) for b in (plain, batch))
        model.zero_grad()
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        for a, b in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_graphs_only_for_adapters_with_checkpointing_on_cuda(monkeypatch):
    """Full fine-tuning would hold a second copy of every weight's gradient per batch shape."""
    cfg = {"cuda_graphs": True, "gradient_checkpointing": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_qlora.graphs_on(cfg, "qlora") and train_qlora.graphs_on(cfg, "lora")
    assert not train_qlora.graphs_on(cfg, "full")
    assert not train_qlora.graphs_on({**cfg, "gradient_checkpointing": False}, "qlora")
    assert not train_qlora.graphs_on({**cfg, "cuda_graphs": False}, "qlora")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not train_qlora.graphs_on(cfg, "qlora")


def test_a_cpu_trial_has_no_graphs(tiny_model, tmp_path):
    model = _trial(tiny_model, tmp_path)
    assert not cuda_graphs.installed(model)
    assert cuda_graphs.install(speed.decoder_layers(model), graphs=False) == 2
    assert not cuda_graphs.installed(model)  # the eager checkpoint only


def _signature(gradients: bool, rows: int, length: int, hidden: int = 64, mask=(1, 2)) -> tuple:
    """A `GraphedLayer` key as `GraphSet` sees it: (gradients, hidden shape, *the rest)."""
    shape = (rows, length, hidden)
    return (gradients, shape, torch.bfloat16, True, None, "spec", ((tuple(mask), "int64"),))


def test_a_probe_decides_for_the_signatures_of_its_kind_that_it_bounds():
    """Host-bound at 1,024 tokens with the card's time 1.0x the host's: any training signature
    of no more tokens is too (the host's launching is the same, the card's work smaller),
    whatever its other tensors' shapes, and so is one of up to 1.5x the tokens (the card's work
    grows at most in proportion: 1.5 = `HOST_BOUND`). Card-bound at 8,192 tokens at 2.0x: any
    of no fewer is too, and one of fewer tokens while 2.0 x the token ratio stays above 1.5.
    Between them, in another mode or at another hidden size nothing is decided, and a
    contradiction decides nothing either."""
    assert cuda_graphs.HOST_BOUND == 1.5
    measured = {_signature(True, 1, 1024): 1.0, _signature(True, 1, 8192): 2.0}
    assert cuda_graphs.judged(measured, _signature(True, 1, 512, mask=(3, 4))) is True
    assert cuda_graphs.judged(measured, _signature(True, 2, 512)) is True  # 1,024 tokens
    assert cuda_graphs.judged(measured, _signature(True, 1, 1536)) is True  # 1.0 x 1.5
    assert cuda_graphs.judged(measured, _signature(True, 1, 1600)) is None  # 1.0 x 1.56
    assert cuda_graphs.judged(measured, _signature(True, 4, 4096)) is False
    assert cuda_graphs.judged(measured, _signature(True, 1, 6400)) is False  # 2.0 x 0.78
    assert cuda_graphs.judged(measured, _signature(True, 1, 6144)) is None  # 2.0 x 0.75
    assert cuda_graphs.judged(measured, _signature(True, 1, 2048)) is None
    assert cuda_graphs.judged(measured, _signature(False, 1, 512)) is None  # evaluation
    # a forward-only (validation) probe bounds fewer tokens only: its longer lengths are probed
    validation = {_signature(False, 1, 1024): 1.0}
    assert cuda_graphs.judged(validation, _signature(False, 1, 768)) is True
    assert cuda_graphs.judged(validation, _signature(False, 1, 1152)) is None
    assert (
        cuda_graphs.judged({_signature(False, 1, 8192): 2.0}, _signature(False, 1, 6400)) is False
    )
    assert cuda_graphs.judged(measured, _signature(True, 1, 512, hidden=128)) is None
    # a probe that found the card nearly idle bounds further: 0.5 x 3 = 1.5
    assert cuda_graphs.judged({_signature(True, 1, 1024): 0.5}, _signature(True, 1, 3072)) is True
    contradicting = {**measured, _signature(True, 1, 256): 1.6}
    assert cuda_graphs.judged(contradicting, _signature(True, 1, 512)) is None
    assert cuda_graphs.judged({}, _signature(True, 1, 512)) is None


def test_a_graph_set_asks_the_plan_only_for_new_packed_training_lengths():
    """`GraphSet.again`: the padding plan (`shapes.Plan.recurs`) decides for packed training
    lengths (one row) only; unpacked batches are captured as judged, and validation too while
    the passes to come are not known."""
    asked = []
    shared = object.__new__(cuda_graphs.GraphSet)
    shared.recurs, shared.passes_left = None, None
    training, validation = (True, (1, 1536, 8)), (False, (1, 1536, 8))
    assert shared.again(torch.zeros(1, 1536, 8), training)  # no plan: every judged length
    shared.recurs = lambda n: asked.append(n) or n == 1024
    assert shared.again(torch.zeros(1, 1024, 8), training)
    assert not shared.again(torch.zeros(1, 1536, 8), training)
    assert shared.again(torch.zeros(1, 1536, 8), validation)  # validation: not the plan's
    assert shared.again(torch.zeros(2, 768, 8), (True, (2, 768, 8)))  # unpacked: not the plan's
    assert asked == [1024, 1536]


def test_a_validation_shape_is_captured_only_where_the_validations_left_bring_it_again():
    """A forward-only signature (validation) is captured only where the passes to come are
    expected to bring it `FORWARD_RECUR` (2) more times to the same layer: in the first of two
    validations one seen twice per pass is (twice in the next), one seen once is not; in the
    last validation only one seen three times in the last pass is, at its first sight."""
    shared = cuda_graphs.GraphSet.__new__(cuda_graphs.GraphSet)
    shared.recurs, shared.passes_left, shared.layers = None, None, 2
    shared.this_pass = cuda_graphs.Counter()
    once, twice, thrice = ((False, (32, n, 8)) for n in (64, 96, 128))
    hidden = torch.zeros(32, 64, 8)

    def sight(signature) -> list[bool]:
        """Both layers see `signature` once: whether each may capture it."""
        seen = []
        for _ in range(shared.layers):
            shared.this_pass[signature] += 1  # as `GraphedLayer._graph` counts a call
            seen.append(shared.again(hidden, signature))
        return seen

    assert sight(once) == [True, True]  # not known: as judged
    shared.begin_pass(1)  # the first of two validations
    assert sight(once) == [False, False]  # one more sight to come, in the next pass
    assert sight(twice) == [False, False] and sight(twice) == [True, True]
    assert [sight(thrice) for _ in range(3)] == [[False, False], [True, True], [True, True]]
    shared.begin_pass(0)  # the last validation: the rest of this pass only
    assert sight(once) == [False, False]
    assert sight(twice) == [False, False] and sight(twice) == [False, False]
    assert [sight(thrice) for _ in range(3)] == [[True, True], [False, False], [False, False]]
    assert shared.last_pass == {once: 2, twice: 4, thrice: 6}


class _Clock:
    """Stands in for the host's clock and the card's events in `GraphSet.probed` (CPU): each
    timed call takes the next (host ms, card ms) pair."""

    def __init__(self, pairs):
        self.pairs, self.now, self.card = list(pairs), 0.0, 0.0

    def perf_counter(self):
        return self.now

    def run(self):
        host, self.card = self.pairs.pop(0)
        self.now += host / 1e3

    def event(self, **kwargs):
        clock = self

        class Event:
            def record(self):
                pass

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return clock.card

        return Event()


def _probing(monkeypatch, pairs) -> tuple[_Clock, cuda_graphs.GraphSet]:
    """A `GraphSet` without CUDA whose probes take their timings from `pairs`."""
    clock = _Clock(pairs)
    monkeypatch.setattr(cuda_graphs.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Event", clock.event)
    shared = object.__new__(cuda_graphs.GraphSet)
    shared.worth, shared.ratios, shared.inferred, shared.sights = {}, {}, {}, {}
    shared.stats = {"probes": [], "inferred": 0}
    shared.passes_left = None  # validations to come not known: probed as today
    return clock, shared


def test_a_training_signature_is_timed_by_the_second_layer_of_its_first_step(monkeypatch):
    """Training: the first layer's call (kernels set up lazily) runs untimed and the second
    layer's, in the same step, is timed and decides, so the layers after it capture in the
    signature's first step. Forward-only: other layers' sights do not count; the first
    layer's own next sights are timed (`EVAL_PROBES` of them, a pass apart)."""
    assert cuda_graphs.PROBE_AT == 2 and cuda_graphs.EVAL_PROBES == 2
    clock, shared = _probing(monkeypatch, [(7.4, 10.3), (6.0, 6.5), (5.8, 6.2)])
    first, second, third = object(), object(), object()
    hidden = torch.zeros(1, 7680, 64)
    training = _signature(True, 1, 7680)
    shared.probed(first, training, hidden, lambda: None)
    assert shared.judge(training) is None
    shared.probed(second, training, hidden, clock.run)
    assert shared.judge(training) is True and len(clock.pairs) == 2
    evaluation = _signature(False, 1, 7680)
    for sight in range(1, 2 + cuda_graphs.EVAL_PROBES):
        assert shared.judge(evaluation) is None
        shared.probed(first, evaluation, hidden, clock.run if sight > 1 else lambda: None)
        for layer in (second, third):  # the same pass: not timed, not counted
            shared.probed(layer, evaluation, hidden, lambda: None)
    assert shared.judge(evaluation) is True and not clock.pairs


@pytest.mark.parametrize(
    ("gradients", "pairs", "worth"),
    [
        (True, [(7.4, 10.3)], True),  # training: one timing decides
        (False, [(7.4, 10.3), (3.4, 7.9)], False),  # a stalled host, then the real one
        (False, [(3.4, 7.9), (7.4, 10.3)], False),
        (False, [(6.0, 6.5), (5.8, 6.2)], True),  # the card waited both times
    ],
)
def test_a_validation_signature_is_judged_by_its_least_host_time(
    monkeypatch, gradients, pairs, worth
):
    """A forward-only signature is timed at `EVAL_PROBES` sights and judged by the timing
    with the least host time: one stall of the host (7.4 ms instead of 3.4, session 22's
    7B validation probe) no longer captures graphs whose buffers raise the training peak."""
    clock, shared = _probing(monkeypatch, pairs)
    signature = _signature(gradients, 1, 7680)
    hidden, layer = torch.zeros(1, 7680, 64), object()
    sights = cuda_graphs.PROBE_AT - 1 + len(pairs)
    for sight in range(1, sights + 1):
        assert shared.judge(signature) is None  # still probing: eager
        timed = sight >= cuda_graphs.PROBE_AT
        shared.probed(layer, signature, hidden, clock.run if timed else lambda: None)
    assert shared.judge(signature) is worth and not clock.pairs
    assert len(shared.stats["probes"]) == 1 and shared.stats["probes"][0][-1] is worth
