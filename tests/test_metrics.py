"""Per-task streaming metrics against hand-computed values, and Δm."""

from __future__ import annotations

import math

import pytest
import torch

from mmdata.batch import Batch
from mmdata.errors import ConfigError
from mmdata.tasks import Task
from mtml_models.metrics import MetricSet, average_precision, delta_m, flatten, selection_score

DIGIT = Task("digit", "classification", ("0", "1", "2"))
SIZE = Task("size", "regression", dims=2)
TAGS = Task("tags", "multilabel", ("a", "b"))


def one_hot_logits(pred: list[int], classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), classes).float()


def batch(labels: dict, masks: dict) -> Batch:
    n = len(next(iter(labels.values())))
    return Batch(keys=[str(i) for i in range(n)], labels=labels,
                 label_mask={k: torch.tensor(v, dtype=torch.bool) for k, v in masks.items()})


def test_accuracy_and_macro_f1_by_hand_with_masked_samples():
    # labelled: targets [0, 0, 1, 2, 2], predictions [0, 1, 1, 2, 0]; the masked sample is garbage
    target = torch.tensor([0, 0, 1, 2, 2, -7])
    pred = [0, 1, 1, 2, 0, 1]
    m = MetricSet([DIGIT])
    m.update({"digit": one_hot_logits(pred)}, batch({"digit": target}, {"digit": [1, 1, 1, 1, 1, 0]}))
    got = m.compute()["digit"]
    # per class F1 = 2TP / (2TP + FP + FN): c0 2/(2+1+1)=0.5, c1 2/(2+1+0)=2/3, c2 2/(2+0+1)=2/3
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)


def test_streaming_equals_one_pass_and_soft_targets_use_argmax():
    target = torch.tensor([0, 2, 1, 1, 2, 0])
    pred = one_hot_logits([0, 2, 2, 1, 0, 0])
    whole, parts = MetricSet([DIGIT]), MetricSet([DIGIT])
    whole.update({"digit": pred}, batch({"digit": target}, {"digit": [1] * 6}))
    soft = torch.nn.functional.one_hot(target, 3).float() * 0.8 + 0.2 / 3  # mixup-style soft labels
    for sl in (slice(0, 2), slice(2, 6)):
        parts.update({"digit": pred[sl]}, batch({"digit": soft[sl]}, {"digit": [1] * (sl.stop - sl.start)}))
    assert parts.compute() == whole.compute()
    assert whole.compute()["digit"]["accuracy"] == pytest.approx(4 / 6)


def test_mae_rmse_in_original_units_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0], [100.0, 100.0]])
    target = torch.tensor([[2.0, 2.0], [0.0, 1.0], [float("nan"), 0.0]])
    m = MetricSet([SIZE])
    m.update({"size": pred}, batch({"size": target}, {"size": [1, 1, 0]}))
    got = m.compute()["size"]
    errors = [1.0, 0.0, 3.0, 4.0]
    assert got["mae"] == pytest.approx(sum(errors) / 4)
    assert got["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 4))


def test_average_precision_by_hand_with_ties():
    # ranks 1..4 with positives at 1 and 3: AP = (1/1 + 2/3) / 2
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
    assert ap == pytest.approx((1 + 2 / 3) / 2)
    # a tie between a positive and a negative counts as one threshold: precision 1/3 at recall 1
    assert average_precision(torch.tensor([0.9, 0.5, 0.5]), torch.tensor([0, 1, 0])) == pytest.approx(1 / 3)
    assert math.isnan(average_precision(torch.tensor([0.3, 0.1]), torch.tensor([0, 0])))


def test_map_skips_classes_without_positives_and_masked_samples():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.7, 0.2], [0.6, 0.3], [5.0, 5.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    m = MetricSet([TAGS])
    m.update({"tags": scores}, batch({"tags": target}, {"tags": [1, 1, 1, 1, 0]}))
    # class b has no labelled positive (the only one is masked): mAP is class a's AP alone
    assert m.compute()["tags"]["map"] == pytest.approx((1 + 2 / 3) / 2)


def test_tasks_without_labels_give_nan_and_reset_clears():
    m = MetricSet([DIGIT, SIZE])
    m.update({"digit": one_hot_logits([1, 2]), "size": torch.zeros(2, 2)},
             batch({"digit": torch.tensor([1, 2]), "size": torch.zeros(2, 2)}, {"digit": [1, 1], "size": [0, 0]}))
    got = m.compute()
    assert got["digit"]["accuracy"] == 1.0 and math.isnan(got["size"]["mae"])
    m.reset()
    assert math.isnan(m.compute()["digit"]["accuracy"])
    assert set(flatten(got)) == {"digit/accuracy", "digit/macro_f1", "size/mae", "size/rmse"}


def test_delta_m_is_sign_aware_and_averaged_within_then_across_tasks():
    base = {"digit": {"accuracy": 0.8, "macro_f1": 0.5}, "size": {"mae": 2.0, "rmse": 4.0}}
    run = {"digit": {"accuracy": 0.9, "macro_f1": 0.5}, "size": {"mae": 1.0, "rmse": 5.0}}
    # digit: (+0.125 + 0) / 2 = 0.0625; size: (+0.5 - 0.25) / 2 = 0.125; mean 0.09375 -> 9.375 %
    assert delta_m(run, base) == pytest.approx(9.375)
    assert delta_m(base, base) == 0.0
    worse = {"digit": {"accuracy": 0.4, "macro_f1": 0.25}, "size": {"mae": 4.0, "rmse": 8.0}}
    assert delta_m(worse, base) == pytest.approx(-75.0)
    with pytest.raises(ConfigError, match="no metric"):
        delta_m({"other": {"accuracy": 1.0}}, base)


def test_selection_score_prefers_better_checkpoints():
    a = {"size": {"mae": 1.0, "rmse": 2.0}, "digit": {"accuracy": 0.7, "macro_f1": 0.6}}
    b = {"size": {"mae": 2.0, "rmse": 3.0}, "digit": {"accuracy": 0.9, "macro_f1": 0.8}}
    assert selection_score(a, "size/mae") > selection_score(b, "size/mae")
    assert selection_score(b, "digit/accuracy") > selection_score(a, "digit/accuracy")
    assert selection_score(a, "delta_m", baseline=b) != 0
    with pytest.raises(ConfigError, match="baseline"):
        selection_score(a, "delta_m")
    with pytest.raises(ConfigError, match="digit/f1"):
        selection_score(a, "digit/f1")


def _sync_worker(rank: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    m = MetricSet([DIGIT, SIZE, TAGS])
    for labels, masks, outputs in _shards()[rank]:
        m.update(outputs, batch(labels, masks))
    m.sync()
    torch.save({f"{t}/{k}": torch.tensor(v) for t, d in m.compute().items() for k, v in d.items()},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _shards():
    """Two ranks' batches of unequal sizes: rank 0 has 3 samples, rank 1 has 2."""
    g = torch.Generator().manual_seed(0)

    def part(n):
        labels = {"digit": torch.randint(0, 3, (n,), generator=g), "size": torch.randn(n, 2, generator=g),
                  "tags": (torch.rand(n, 2, generator=g) > 0.5).float()}
        outputs = {"digit": torch.randn(n, 3, generator=g), "size": torch.randn(n, 2, generator=g),
                   "tags": torch.randn(n, 2, generator=g)}
        return labels, {"digit": [1] * n, "size": [1] * n, "tags": [1] * n}, outputs

    return [[part(3)], [part(2)]]


@pytest.mark.timeout(120)
def test_sync_over_ranks_equals_one_process_over_all_samples(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    single = MetricSet([DIGIT, SIZE, TAGS])
    for shard in _shards():
        for labels, masks, outputs in shard:
            single.update(outputs, batch(labels, masks))
    want = flatten(single.compute())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert {k: pytest.approx(float(v)) for k, v in got.items()} == want
