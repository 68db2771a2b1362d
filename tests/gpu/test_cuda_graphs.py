"""On the GPU machine: decoder layers replayed as CUDA graphs (src/cuda_graphs.py).

pytest -m gpu tests/gpu   (needs SWEEP_GPU_MODEL=<folder from python -m src.random_qwen>)
"""

from __future__ import annotations

import os

import pytest
import torch

from src import bench, cuda_graphs, shapes, speed, train_qlora
from tests.src.test_speed import _train_cfg

pytestmark = pytest.mark.gpu


class Toy(torch.nn.Module):
    """out = dropout(x) * w: with the forward's mask m, dL/dw = L / w and dL/dx = m w / (1-p),
    so sum(dL/dx * x) = L; a backward that drew other masks breaks both."""

    gradient_checkpointing = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.5, device="cuda"))
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x) * self.w


@pytest.fixture
def first_sight(monkeypatch):
    """Graphs captured at a signature's first sight, unprobed: what the tests compare."""
    monkeypatch.setattr(cuda_graphs, "PROBE_AT", 0)


def test_graphed_backward_draws_the_forward_masks(first_sight):
    toy = Toy().train()
    assert cuda_graphs.install([toy], graphs=True) == 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, device="cuda", generator=gen).requires_grad_()
    # fp32 sums of 4,096 terms in other orders: a tolerance of their scale, not of the loss
    # (a sum near zero failed a relative one); other masks would be off by ~sqrt(4096) terms
    scale = 1e-5 * float(x.detach().abs().sum())
    outputs = []
    for _ in range(3):
        loss = toy(x).sum()
        loss.backward()
        assert float(toy.w.grad * toy.w) == pytest.approx(float(loss), abs=scale)
        assert float((x.grad * x).sum()) == pytest.approx(float(loss), abs=scale)
        outputs.append(float(loss))
        toy.w.grad = x.grad = None
    assert len(toy._compiled_call_impl.graphs) == 1  # captured once, replayed after
    assert len(set(outputs)) == 3  # new masks every step


def test_graphed_trial_path_gives_the_eager_loss_and_gradients(tmp_path, first_sight):
    """The real 0.5B-shape trial path, layers as graphs vs eager, on one batch (no dropout:
    eager and graphs draw from different offsets): bf16 agreement."""
    folder = os.environ["SWEEP_GPU_MODEL"]
    spec = bench.model_spec(folder)
    params = {"method": "qlora", "r": 16, "lora_alpha": 32, "dropout": 0.05}
    batch = torch.randint(100, 30000, (2, 256), generator=torch.Generator().manual_seed(0))
    results = []
    for graphs in (False, True):
        cfg = _train_cfg(cuda_graphs=graphs)
        model, _ = train_qlora.setup(spec, params, cfg, tmp_path)
        layers = speed.decoder_layers(model)
        assert sum(layer._compiled_call_impl is not None for layer in layers) == (
            len(layers) if graphs else 0
        )
        results.append(bench.loss_and_grads(model, batch.cuda()))
        del model
    check = bench.compare(*results)
    assert check["loss_rel_diff"] < 1e-3
    assert check["grad_rel_err"] < 1e-2


def test_validation_replays_forward_graphs(tmp_path, first_sight):
    """Eval mode without gradients (the Trainer's validation loss) replays one forward-only
    graph per shape: the eager loss, the same on a replay, and training graphs unchanged."""
    spec = bench.model_spec(os.environ["SWEEP_GPU_MODEL"])
    params = {"method": "qlora", "r": 16, "lora_alpha": 32, "dropout": 0.05}
    model, _ = train_qlora.setup(spec, params, _train_cfg(cuda_graphs=True), tmp_path)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(100, 30000, (1, n), generator=gen).cuda() for n in (256, 384)]
    before = bench.loss_and_grads(model, batches[0])  # training graphs captured

    def validation() -> list[float]:
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return [float(model(input_ids=b, labels=b).loss) for b in batches]

    graphed = [validation(), validation()]
    layers = speed.decoder_layers(model)
    assert all(len(layer._compiled_call_impl.forward_graphs) == 2 for layer in layers)
    after = bench.loss_and_grads(model, batches[0])  # training again, after validation
    assert bench.compare(before, after)["grad_rel_err"] < 1e-3  # replays: atomics at most
    speed.decompile_layers(model)
    eager = validation()
    assert graphed[1] == pytest.approx(graphed[0], rel=1e-6)
    assert graphed[0] == pytest.approx(eager, rel=1e-3)


class Matmul(torch.nn.Module):
    """x @ w: launch-bound when small, bound by the card when large."""

    gradient_checkpointing = True

    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n, n, device="cuda") / n**0.5)

    def forward(self, x):
        return x @ self.w


@pytest.mark.parametrize(("n", "tokens", "captured"), [(64, 64, True), (8192, 16384, False)])
def test_a_signature_is_captured_only_where_the_card_waits_for_the_host(n, tokens, captured):
    """Each new signature runs eagerly, is timed at its `PROBE_AT`-th sight (forward-only:
    and the next, `EVAL_PROBES`) and captured at the next only where the card waited for the
    launches: a tiny matmul (the host launches slower than the card multiplies) is captured,
    a 16k x 8k x 8k one (~4 ms of card time per call against microseconds of launching)
    never is, in training and in evaluation."""
    layer = Matmul(n).train()
    cuda_graphs.install([layer], graphs=True)
    x = torch.randn(tokens, n, device="cuda", requires_grad=True)
    for _ in range(cuda_graphs.PROBE_AT + 2):
        layer(x).sum().backward()
    graphed = layer._compiled_call_impl
    assert len(graphed.graphs) == int(captured)
    layer.eval()
    with torch.no_grad():
        for _ in range(cuda_graphs.PROBE_AT + 2):
            layer(x)
    assert len(graphed.forward_graphs) == int(captured)
    probes = graphed.shared.stats["probes"]
    assert [p[0] for p in probes] == [True, False] and all(p[-1] == captured for p in probes)
    # what the probes bound is decided without a probe: fewer tokens than a host-bound
    # signature, captured at the first sight; more than a card-bound one, never captured
    y = torch.randn(tokens // 2 if captured else tokens * 2, n, device="cuda", requires_grad=True)
    layer.train()
    layer(y).sum().backward()
    assert len(graphed.graphs) == 2 * int(captured)
    layer.eval()
    with torch.no_grad():
        layer(y)
    assert len(graphed.forward_graphs) == 2 * int(captured)
    assert len(graphed.shared.stats["probes"]) == 2 and graphed.shared.stats["inferred"] == 2


def test_a_validation_captures_only_what_the_validations_left_bring_again():
    """In the last validation (`begin_pass(0)`) a host-bound forward-only signature seen once
    per pass is neither probed nor captured; with one more validation to come it is."""
    layer = Matmul(64).eval()
    cuda_graphs.install([layer], graphs=True)
    graphed = layer._compiled_call_impl
    x = torch.randn(64, 64, device="cuda")
    for passes_left, captured in ((0, 0), (1, 1)):
        graphed.shared.begin_pass(passes_left)
        with torch.no_grad():
            for _ in range(cuda_graphs.PROBE_AT + 2):
                layer(x)
        assert len(graphed.forward_graphs) == captured
        assert len(graphed.shared.stats["probes"]) == captured


def test_captured_lengths_are_priced_for_the_padding_plan(tmp_path, first_sight):
    """Each packed training length that every layer captured gets its host seconds of
    capturing and its graphed layers' card seconds per step (one layer's replays timed, read
    once the card passed them): what `shapes.Plan` weighs. A plan over those pads a batch up
    to a captured length where the measured step is no dearer for it."""
    spec = bench.model_spec(os.environ["SWEEP_GPU_MODEL"])
    params = {"method": "qlora", "r": 16, "lora_alpha": 32, "dropout": 0.05}
    model, _ = train_qlora.setup(spec, params, _train_cfg(cuda_graphs=True), tmp_path)
    gen = torch.Generator().manual_seed(2)
    for n in (256, 512):
        batch = torch.randint(100, 30000, (1, n), generator=gen).cuda()
        for _ in range(cuda_graphs.TIMED + 1):
            bench.loss_and_grads(model, batch)
    torch.cuda.synchronize()
    shared = cuda_graphs.graph_set(model)
    costs = shared.shape_costs()
    assert set(costs) == {256, 512}
    layers = len(speed.decoder_layers(model))
    assert shared.layers == layers
    assert all(capture > 0 and step > 0 for capture, step in costs.values())
    assert all(len(shared.timed[n].samples) == cuda_graphs.TIMED for n in costs)
    assert 0 < shared.stats["warm_up_s"] < shared.stats["capture_s"]  # one warm-up a length
    print({n: (round(c, 3), round(s * 1e3, 2)) for n, (c, s) in costs.items()})
    plan = shapes.Plan([100] * 40, 3, 100, shared.shape_costs)  # batches of 300 tokens
    slope = shapes.fitted_slope({n: s for n, (_, s) in costs.items()})
    length = plan.length(300)
    assert length in (speed.bucket_length(300), 512)
    if slope * (512 - speed.bucket_length(300)) * 100 < min(c for c, _ in costs.values()):
        assert length == 512
