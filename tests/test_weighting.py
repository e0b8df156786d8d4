"""Task-loss weighting: each method on two-task toy problems, behaving as published."""

from __future__ import annotations

import math

import pytest
import torch

from mmdata.errors import ConfigError
from mmdata.tasks import Task
from mtml_models.weighting import WEIGHTINGS, make_weighting


def two_task_regression(noise: tuple[float, float], n: int = 256, seed: int = 0):
    """x (n, 4); y_k = x @ a + noise_k * eps: one shared linear map, two targets with different noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    a = torch.randn(4, generator=g)
    ys = [x @ a + s * torch.randn(n, generator=g) for s in noise]
    return x, ys


def test_equal_and_static_weights():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    assert make_weighting("equal", ["a", "b"]).combine(losses).item() == 5.0
    static = make_weighting("static", ["a", "b"], weights={"a": 0.5, "b": 2.0})
    assert static.combine(losses).item() == 7.0
    assert static.combine({"b": torch.tensor(1.0)}).item() == 2.0  # a batch without task a
    with pytest.raises(ConfigError, match="'c'"):
        make_weighting("static", ["a", "b"], weights={"c": 1.0})
    with pytest.raises(ConfigError, match="unknown task"):
        static.combine({"zzz": torch.tensor(1.0)})


def test_uncertainty_params_get_gradients_and_noisier_task_weighs_less():
    torch.manual_seed(0)
    x, (y_clean, y_noisy) = two_task_regression(noise=(0.1, 1.0))
    tasks = [Task("clean", "regression"), Task("noisy", "regression")]
    w = make_weighting("uncertainty", tasks)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam([*net.parameters(), *w.parameters()], lr=0.05)
    for step in range(300):
        out = net(x)
        losses = {"clean": (out[:, 0] - y_clean).square().mean(), "noisy": (out[:, 1] - y_noisy).square().mean()}
        opt.zero_grad()
        w.backward(losses)
        if step == 0:
            assert w.log_vars.grad is not None and (w.log_vars.grad != 0).all()
        opt.step()
    weights = w.weights()
    assert weights["noisy"] < weights["clean"] / 10
    # at the optimum exp(-s) = 1 / L (regression: c = 1/2): the weight tracks the inverse noise variance
    assert weights["noisy"] == pytest.approx(0.5 / losses["noisy"].item(), rel=0.3)


def test_pcgrad_removes_conflicting_components():
    shared = torch.nn.Parameter(torch.zeros(2))
    head_a, head_b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    g_a, g_b = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.5])  # g_a . g_b = -0.5 < 0
    losses = {"a": shared @ g_a + 2 * head_a.sum(), "b": shared @ g_b + 3 * head_b.sum()}
    pc = make_weighting("pcgrad", ["a", "b"])
    pc.backward(losses, [shared])
    pa = g_a - (g_a @ g_b) / (g_b @ g_b) * g_b
    pb = g_b - (g_b @ g_a) / (g_a @ g_a) * g_a
    assert torch.allclose(shared.grad, pa + pb)
    assert pa @ g_b == pytest.approx(0.0, abs=1e-6) and pb @ g_a == pytest.approx(0.0, abs=1e-6)
    assert head_a.grad.item() == 2.0 and head_b.grad.item() == 3.0  # task-specific grads untouched


def test_pcgrad_cancels_exactly_opposite_and_keeps_agreeing_gradients():
    shared = torch.nn.Parameter(torch.zeros(3))
    g = torch.tensor([1.0, -2.0, 0.5])
    make_weighting("pcgrad", ["a", "b"]).backward({"a": shared @ g, "b": -(shared @ g)}, [shared])
    assert torch.allclose(shared.grad, torch.zeros(3))
    shared.grad = None
    h = torch.tensor([0.5, 0.0, 1.0])  # g . h > 0: no conflict, plain sum
    make_weighting("pcgrad", ["a", "b"]).backward({"a": shared @ g, "b": shared @ h}, [shared])
    assert torch.allclose(shared.grad, g + h)


def test_gradnorm_weights_stay_positive_sum_to_task_count_and_balance_gradient_norms():
    torch.manual_seed(0)
    x, (y_a, y_b) = two_task_regression(noise=(0.1, 0.1))
    trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    gn = make_weighting("gradnorm", ["big", "small"], alpha=0.0, lr=0.05)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    for _ in range(60):
        out = heads(torch.relu(trunk(x)))
        # task "big" has 10x the loss scale, so 10x the gradient norm at equal weights
        losses = {"big": 10 * (out[:, 0] - y_a).square().mean(), "small": (out[:, 1] - y_b).square().mean()}
        opt.zero_grad()
        gn.backward(losses, list(trunk.parameters()))
        opt.step()
        w = gn.weights()
        assert all(v > 0 for v in w.values())
        assert sum(w.values()) == pytest.approx(2.0, abs=1e-5)
    assert w["big"] < 0.5 < 1.5 < w["small"]
    with pytest.raises(ConfigError, match="shared_params"):
        gn.backward(losses)


def test_dwa_follows_the_loss_ratio_formula():
    dwa = make_weighting("dwa", ["a", "b"], temperature=2.0)
    for epoch_losses in ({"a": 4.0, "b": 2.0}, {"a": 2.0, "b": 1.8}):
        assert dwa.weights() == {"a": 1.0, "b": 1.0}  # epochs 1 and 2: equal weights
        dwa.end_epoch(epoch_losses)
    r = torch.tensor([2.0 / 4.0, 1.8 / 2.0])
    want = 2 * torch.softmax(r / 2.0, 0)
    got = dwa.weights()
    assert got["a"] == pytest.approx(want[0].item()) and got["b"] == pytest.approx(want[1].item())
    assert got["b"] > got["a"]  # the task whose loss fell less weighs more
    total = dwa.combine({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    assert total.item() == pytest.approx(2.0)


def test_dwa_accumulates_epoch_means_from_combine_and_round_trips_state():
    dwa = make_weighting("dwa", ["a", "b"])
    for a_losses in ([3.0, 5.0], [2.0, 2.0]):  # epoch means: a 4 then 2; b 1 then 1
        for la in a_losses:
            dwa.combine({"a": torch.tensor(la, requires_grad=True), "b": torch.tensor(1.0, requires_grad=True)})
        dwa.end_epoch()
    want = 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2.0, 0)
    assert dwa.weights()["a"] == pytest.approx(want[0].item())
    other = make_weighting("dwa", ["a", "b"])
    other.load_state_dict(dwa.state_dict())
    assert other.weights() == dwa.weights()
    dwa.eval()  # evaluation batches do not count
    dwa.combine({"a": torch.tensor(100.0), "b": torch.tensor(1.0)})
    assert dwa.counts.sum().item() == 0


def test_every_method_trains_a_two_task_model_and_round_trips_state():
    x, (y_a, y_b) = two_task_regression(noise=(0.1, 0.5))
    tasks = [Task("a", "regression"), Task("b", "classification", ("neg", "pos"))]
    for name in WEIGHTINGS:
        torch.manual_seed(0)
        trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
        w = make_weighting(name, tasks)
        opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters(), *w.parameters()], lr=0.02)
        first = None
        for _ in range(40):
            out = heads(torch.tanh(trunk(x)))
            losses = {"a": (out[:, 0] - y_a).square().mean(),
                      "b": torch.nn.functional.cross_entropy(out[:, 1:], (y_b > 0).long())}
            opt.zero_grad()
            total = w.backward(losses, list(trunk.parameters()))
            assert math.isfinite(total.item()) and not total.requires_grad
            opt.step()
            first = first if first is not None else {k: v.item() for k, v in losses.items()}
        w.end_epoch()
        assert all(losses[k].item() < first[k] for k in first), name
        clone = make_weighting(name, tasks)
        clone.load_state_dict(w.state_dict())
        assert clone.weights() == pytest.approx(w.weights()), name


def test_make_weighting_rejects_unknown_names_and_options():
    with pytest.raises(ConfigError, match="'magic'"):
        make_weighting("magic", ["a"])
    with pytest.raises(ConfigError, match="gradnorm"):
        make_weighting("gradnorm", ["a", "b"], temprature=1.0)
    with pytest.raises(ConfigError, match="distinct"):
        make_weighting("equal", ["a", "a"])


def _ddp_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial parameters on every rank, as DDP guarantees
    x, (y_a, y_b) = two_task_regression(noise=(0.1, 1.0), n=32, seed=rank)  # different data per rank
    trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    result = {}
    for name in ("uncertainty", "gradnorm", "pcgrad", "dwa"):
        w = make_weighting(name, [Task("a", "regression"), Task("b", "regression")])
        for p in [*trunk.parameters(), *heads.parameters()]:
            p.grad = None
        out = heads(torch.relu(trunk(x)))
        # task b pulls the same output towards the opposite target: conflicting gradients for PCGrad
        losses = {"a": (out[:, 0] - y_a).square().mean(), "b": (out[:, 0] + y_b).square().mean()}
        plain = torch.autograd.grad(sum(losses.values()), list(trunk.parameters()), retain_graph=True)
        w.backward(losses, list(trunk.parameters()))
        w.end_epoch()
        # DWA: a second epoch whose loss ratio differs per rank -> weights from the global means
        w.combine({"a": losses["a"] * (1 + rank), "b": losses["b"]})
        w.end_epoch()
        if name == "pcgrad":  # the projection correction on top of this rank's plain gradient
            result[name] = torch.cat([(p.grad - g).flatten() for p, g in zip(trunk.parameters(), plain)])
        elif name == "uncertainty":
            result[name] = w.log_vars.grad.clone()
        else:
            result[name] = torch.tensor(list(w.weights().values()))
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_weighting_state_stays_identical_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert [name for name in r0 if not torch.allclose(r0[name], r1[name], atol=1e-6)] == []
    assert not torch.allclose(r0["dwa"], torch.ones(2))  # the check is not vacuous
    assert r0["pcgrad"].abs().sum() > 0
