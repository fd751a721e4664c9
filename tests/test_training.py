"""The training loop's own pieces: Adam and the plateau rule equal torch.optim's, clipping caps the gradient,
a non-finite loss stops training, fit's batches know their counts are whole, no torch._dynamo import (the first-step stall),
and the thread plan of a small CPU step (elementwise work on one thread, products on all)."""
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from scdgm.models import create_model
from scdgm.models.data import CountBatches
from scdgm.models.nn import ENTRIES_PER_THREAD, Linear, step_threads
from scdgm.models.training import Adam, LoopConfig, Plateau, StepContext, TrainingDiverged


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2))


def test_adam_steps_like_torch_fused_adam_bit_for_bit():
    """Same update as torch.optim.Adam(fused=True), weight decay and learning-rate changes included; a parameter
    without a gradient is left alone and keeps its own step count."""
    ours, theirs = small_net(0), small_net(0)
    mine = Adam(ours.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3)
    reference = torch.optim.Adam(theirs.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3, fused=True)
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        x = torch.randn(16, 7, generator=generator)
        for net, optimizer in ((ours, mine), (theirs, reference)):
            optimizer.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            if step % 4 == 3:
                net[3].bias.grad = None  # skipped this step
            optimizer.step()
        if step == 5:
            mine.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = 3e-3
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [int(s) for s in mine.steps] == [12] * 5 + [9]


def test_plateau_lowers_the_learning_rate_like_reduce_lr_on_plateau():
    values = [5.0, 4.0, 4.0, 3.9999, 4.1, 4.2, 3.0, 3.0, 3.0, float("nan"), 2.0, 2.5, 2.5, 2.5, -1.0, -1.0, -0.9]
    ours = Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    plateau = Plateau(ours, factor=0.5, patience=1)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(theirs, factor=0.5, patience=1)
    rates = []
    for value in values:
        plateau.step(value)
        reference.step(value)
        rates.append((ours.param_groups[0]["lr"], theirs.param_groups[0]["lr"]))
    assert [a for a, _ in rates] == [b for _, b in rates]
    assert rates[-1][0] < 1.0


def test_optimize_clips_the_gradient_norm_and_stops_on_nan():
    net = small_net(2)
    optimizer = Adam(net.parameters(), lr=1e-3)
    ctx = StepContext([optimizer], LoopConfig(grad_clip=0.5), max_epochs=1)
    ctx.optimize(1000.0 * net(torch.randn(8, 7)).square().mean())
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert norm.item() == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(TrainingDiverged, match="non-finite at epoch 1"):
        ctx.optimize(net(torch.full((2, 7), float("nan"))).sum())


def test_fit_batches_carry_that_counts_are_whole():
    """The training batches say their counts are whole (fit checks them), so the NB skips its own check;
    batches of other counts leave it open."""
    counts = sp.csr_matrix(np.array([[0, 2, 5], [1, 0, 0]], dtype=np.float32))
    assert next(iter(CountBatches(counts))).whole is None
    model = create_model("vae", {"device": "cpu"})
    assert next(iter(model._batches(counts, None, shuffle=True))).whole is True


def test_shuffled_batches_carry_the_log1p_of_their_counts():
    """Training's shuffled batches take log1p(x) from a copy made once for the data set; batches in order
    compute it; either way the encoder input is log1p(x)."""
    counts = sp.random(30, 8, density=0.4, format="csr", dtype=np.float32, random_state=0) * 9
    counts.data = np.floor(counts.data)
    for batch in CountBatches(counts, batch_size=7, shuffle=True):
        assert batch.log_x is not None
        torch.testing.assert_close(batch.encoder_input(), torch.log1p(batch.x), rtol=0, atol=0)
    batch = next(iter(CountBatches(counts, batch_size=7)))
    assert batch.log_x is None and torch.equal(batch.encoder_input(), torch.log1p(batch.x))


def test_training_never_imports_torch_dynamo():
    """torch.optim imports torch._dynamo (seconds) the first time an optimizer is built or stepped: a fit must
    not, so short runs do not stall."""
    script = """
import json, sys
import torch
from scdgm.models import create_model
from scdgm.pipelines.simulate import simulate_programs
torch.set_num_threads(1)
adata = simulate_programs(200, 200, seed=0)
create_model("vae", {"max_epochs": 2, "progress": False}).fit(adata)
print(json.dumps("torch._dynamo" in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) is False


@pytest.fixture
def two_threads():
    """Two torch threads for the test (others, e.g. in-process serving, may have left another count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_step_threads_run_small_steps_on_one_thread_and_products_on_all(monkeypatch, two_threads):
    """With sleeping threads (the CLI's and these tests' OMP_WAIT_POLICY=PASSIVE), a step of 128 x 2,000 entries runs
    on one thread while `Linear`'s products are split over helper threads: values and gradients (input and
    weights, or weights alone) equal nn.Linear's, the same on every run. Large steps, spinning threads and GPUs
    keep every thread; the count is restored and the helpers stopped, also after an error."""
    assert torch.get_num_threads() == 2
    ours = Linear(2000, 128)
    theirs = nn.Linear(2000, 128)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(128, 2000, generator=torch.Generator().manual_seed(0))
    runs = []
    for input_grad in (True, False, True):
        ours.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(input_grad)
        with step_threads(128 * 2000, torch.device("cpu")):
            assert torch.get_num_threads() == 1
            got = ours(inputs)
            got.square().sum().backward()
            assert torch.get_num_threads() == 1
            assert any(t.name.startswith("scdgm-products") for t in threading.enumerate())
        runs.append((got, ours.weight.grad, ours.bias.grad, inputs.grad))
    assert torch.get_num_threads() == 2
    assert not any(t.name.startswith("scdgm-products") for t in threading.enumerate())
    reference = x.clone().requires_grad_(True)
    expected = theirs(reference)
    expected.square().sum().backward()
    for got, weight_grad, bias_grad, _ in runs:
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(weight_grad, theirs.weight.grad)
        torch.testing.assert_close(bias_grad, theirs.bias.grad)
    torch.testing.assert_close(runs[0][3], reference.grad)
    assert runs[1][3] is None
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))  # the same on every run
    for entries, device in ((4 * ENTRIES_PER_THREAD, "cpu"), (128 * 2000, "cuda")):
        with step_threads(entries, torch.device(device)):
            assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with step_threads(128 * 2000, torch.device("cpu")):
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with pytest.raises(ValueError, match="stop"), step_threads(128 * 2000, torch.device("cpu")):
        raise ValueError("stop")
    assert torch.get_num_threads() == 2


def test_linear_in_step_threads_takes_second_derivatives_like_nn_linear(two_threads):
    """A gradient penalty (the WGAN critic's) differentiates the input gradient again: through `Linear` inside
    `step_threads` it gives nn.Linear's weight gradients."""
    ours = Linear(2000, 64)
    theirs = nn.Linear(2000, 64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(128, 2000, generator=torch.Generator().manual_seed(1))
    grads = []
    for layer, planned in ((ours, True), (theirs, False)):
        inputs = x.clone().requires_grad_(True)
        with step_threads(128 * 2000 if planned else 1 << 30, torch.device("cpu")):
            assert torch.get_num_threads() == (1 if planned else 2)
            score = torch.tanh(layer(inputs)).sum()
            (input_grad,) = torch.autograd.grad(score, inputs, create_graph=True)
            input_grad.norm(dim=1).sub(1).square().mean().backward()
        grads.append(layer.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
