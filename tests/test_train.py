import math

import pytest
import torch

from kdtools.errors import KdUsageError
from kdtools.models import ImageClassifier
from kdtools.train import (TrainConfig, distillation_loss, epoch_order, load_checkpoint, lr_factor, mixup_loss, targets_from,
                           train, train_online)


def test_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    # -log(e^2 / (e^2 + 2))
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    got = distillation_loss(logits, torch.tensor([0]), None, None, "ce", 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kl_with_temperature_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.2]])
    T = 2.0
    # teacher at T: p^(1/T) renormalised; student: softmax(s/T); loss = T^2 * sum q log(q/r)
    q = torch.tensor([0.8 ** 0.5, 0.2 ** 0.5])
    q = q / q.sum()
    r = torch.softmax(s[0] / T, 0)
    expected = T * T * float((q * (q / r).log()).sum())
    got = distillation_loss(s, p.argmax(1), p, None, "kl", T)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # from logits directly: same value as from the probabilities they give
    tl = torch.tensor([[0.3, -1.1]])
    a = distillation_loss(s, tl.argmax(1), torch.softmax(tl, 1), tl, "kl", T)
    b = distillation_loss(s, tl.argmax(1), torch.softmax(tl, 1), None, "kl", T)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_l1_on_probabilities():
    s = torch.tensor([[0.0, 0.0]])  # softmax = [0.5, 0.5]
    p = torch.tensor([[0.9, 0.1]])
    assert distillation_loss(s, None, p, None, "l1", 1.0).item() == pytest.approx(0.8)


def test_topk_answers_are_completed_evenly():
    t = targets_from({"topk_index": torch.tensor([[2, 0]]), "topk_value": torch.tensor([[0.6, 0.2]])}, 5)
    assert torch.allclose(t.probs, torch.tensor([[0.2, 0.2 / 3, 0.6, 0.2 / 3, 0.2 / 3]]))
    assert t.labels.tolist() == [2]


def test_soft_losses_need_soft_targets():
    m = ImageClassifier("mlp", (1, 2, 2), 2)
    with pytest.raises(KdUsageError, match="soft targets"):
        train(m, torch.rand(4, 1, 2, 2), targets_from({"label": torch.tensor([0, 1, 0, 1])}, 2),
              TrainConfig(loss="kl", epochs=1), torch.device("cpu"))


def test_schedules():
    cfg = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(cfg, 0) == 1.0 and lr_factor(cfg, 5) == pytest.approx(0.5)
    assert lr_factor(TrainConfig(schedule="step", step_size=3), 7) == pytest.approx(0.01)


def blobs(n=400, seed=0):
    """Two classes of 4x4 images: bright top half vs bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.5
    x[y == 0, :, :2] += 0.5
    x[y == 1, :, 2:] += 0.5
    return x, y


def test_training_learns_a_simple_task():
    x, y = blobs()
    m = ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [16]})
    res = train(m, x, targets_from({"label": y}, 2), TrainConfig(epochs=5, lr=0.1, batch_size=32), torch.device("cpu"),
                eval_set=blobs(200, 1))
    assert res.last.eval_accuracy > 0.95


def skewed_blobs():
    x, y = blobs()
    keep = torch.cat([torch.nonzero(y == 0)[:, 0], torch.nonzero(y == 1)[:20, 0]])  # ~200 vs 20
    return x[keep], y[keep]


@pytest.mark.parametrize("data, cfg, killed_after", [
    # augmentation draws from its own per-epoch generator: a resumed run repeats it
    (blobs, TrainConfig(epochs=4, lr=0.05, batch_size=32, augment=True), 2),
    # the balanced draw of an epoch depends on the seed and the epoch only: a resumed run draws the same rows
    (skewed_blobs, TrainConfig(epochs=3, lr=0.05, batch_size=32, class_balance=1.0), 1),
    # mixup's weights and partners come from per-epoch seeds as well
    (blobs, TrainConfig(epochs=3, lr=0.05, batch_size=32, mixup=0.4), 1),
], ids=["augment", "class-balance", "mixup"])
def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path, data, cfg, killed_after):
    x, y = data()
    t = targets_from({"label": y}, 2)
    torch.manual_seed(1)
    a = ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [8]})
    b = ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [8]})
    b.load_state_dict(a.state_dict())
    train(a, x, t, cfg, torch.device("cpu"))
    ck = tmp_path / "b.ckpt"

    class Killed(Exception):
        pass

    def kill(model, record):
        # on_epoch_end runs before that epoch's checkpoint is written: dying in epoch k + 1's leaves epoch k's
        if record.epoch == killed_after + 1:
            raise Killed

    with pytest.raises(Killed):  # the run dies after writing its checkpoint of epoch killed_after
        train(b, x, t, cfg, torch.device("cpu"), checkpoint=ck, on_epoch_end=kill)
    state = load_checkpoint(ck)
    assert state["epoch"] == killed_after
    c = ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [8]})
    res = train(c, x, t, cfg, torch.device("cpu"), resume=state)
    assert [h.epoch for h in res.history] == list(range(1, cfg.epochs + 1))
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.allclose(pa, pc, atol=1e-6)


def test_online_training_on_refused_rows_only_is_an_error_not_an_untrained_model():
    from kdtools.errors import KdError
    from kdtools.models import ImageClassifier
    from kdtools.train import TrainConfig, train_online

    model = ImageClassifier("mlp", (1, 4, 4), 3)
    refused = [{"x": torch.rand(8, 1, 4, 4), "label": torch.full((8,), -1)} for _ in range(3)]
    saved = []
    with pytest.raises(KdError, match="all 24 rows .* refused"):
        train_online(model, iter(refused), 3, TrainConfig(), torch.device("cpu"), lambda m, info: saved.append(info))
    assert saved == []
    # mixed with answered rows, the refused ones are skipped and counted
    mixed = [{"x": torch.rand(8, 1, 4, 4), "label": torch.tensor([0, 1, 2, -1, 0, 1, -1, 2])}]
    result = train_online(model, iter(mixed), 3, TrainConfig(), torch.device("cpu"), lambda m, info: saved.append(info))
    assert result.samples == 6 and result.rejected == 2 and saved[-1]["samples_seen"] == 6


def test_class_balance_draws_classes_at_the_stated_rates():
    labels = torch.tensor([0] * 900 + [1] * 100)
    # 0: a permutation of every row, as without the option
    assert sorted(epoch_order(labels, TrainConfig(), 0).tolist()) == list(range(1000))
    # weights count^-P: P = 1 gives each class 1/2; P = 0.5 gives class 1 100 / sqrt(100) / (900 / sqrt(900)
    # + 100 / sqrt(100)) = 10 / 40 = 1/4 of the draws
    for power, share in ((1.0, 0.5), (0.5, 0.25)):
        cfg = TrainConfig(class_balance=power)
        drawn = torch.cat([epoch_order(labels, cfg, e) for e in range(40)])  # 40 000 draws
        assert drawn.numel() == 40000 and drawn.min() >= 0 and drawn.max() < 1000
        assert abs((labels[drawn] == 1).float().mean().item() - share) < 0.01
    with pytest.raises(KdUsageError, match="class-balance"):
        TrainConfig(class_balance=1.5).validate()


@pytest.mark.parametrize("labels, power, expected", [
    ([0, 1, 1, 1], 1.0, [1 / 2, 1 / 6, 1 / 6, 1 / 6]),  # each class 1/2, split evenly over its rows
    ([0, 1, 1, 1], 0.5, [1 / (1 + 3 ** 0.5)] + [3 ** -0.5 / (1 + 3 ** 0.5)] * 3),  # weights 1 and 3^-0.5 per row
    ([2, 2, 2, 7], 1.0, [1 / 6, 1 / 6, 1 / 6, 1 / 2]),  # class ids with gaps, classes absent
    ([4, 4, 4, 4], 1.0, [1 / 4] * 4),  # one class: a uniform draw
])
def test_class_balance_draws_each_row_at_its_hand_computed_rate(labels, power, expected):
    labels = torch.tensor(labels)
    cfg = TrainConfig(class_balance=power)
    drawn = torch.cat([epoch_order(labels, cfg, e) for e in range(15000)])  # 60 000 draws
    freq = torch.bincount(drawn, minlength=len(labels)).double() / drawn.numel()
    assert torch.allclose(freq, torch.tensor(expected, dtype=torch.float64), atol=0.008), freq


def test_class_balance_lifts_a_rare_class():
    """A rare class the plain run underfits is learned when the epoch draws classes evenly."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n_common, n_rare = 1900, 20
    x = torch.rand(n_common + n_rare, 1, 4, 4, generator=g) * 0.2
    x[n_common:, 0, 0, :] += 0.8 * torch.rand(n_rare, 4, generator=g)  # the rare class: a faint top row
    y = torch.tensor([0] * n_common + [1] * n_rare)
    recall = {}
    for power in (0.0, 1.0):
        m = ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [8]})
        train(m, x, targets_from({"label": y}, 2), TrainConfig(epochs=3, lr=0.05, batch_size=64, class_balance=power),
              torch.device("cpu"))
        with torch.no_grad():
            recall[power] = (m(x[n_common:]).argmax(1) == 1).float().mean().item()
    assert recall[1.0] > recall[0.0] + 0.3, recall


def test_mixup_loss_matches_hand_computation():
    # student softmaxes [1/4, 3/4], [1/2, 1/2], [3/4, 1/4]; partners cycle (0 <- 1, 1 <- 2, 2 <- 0), so no pair
    # cancels and swapping lam and 1 - lam changes every figure below
    logits = torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0], [3.0, 1.0]]))
    labels, partner, lam = torch.tensor([0, 1, 1]), torch.tensor([1, 2, 0]), 0.3
    # CE: row 0 0.3 ln 4 + 0.7 ln(4/3) (labels 0 and 1), row 1 ln 2 (1 and 1), row 2 0.3 ln 4 + 0.7 ln(4/3) (1 and 0)
    expected = (2 * (0.3 * math.log(4) + 0.7 * math.log(4 / 3)) + math.log(2)) / 3
    assert mixup_loss(logits, labels, None, partner, lam, "ce", 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert mixup_loss(logits, labels, None, partner, 0.7, "ce", 1.0).item() != pytest.approx(expected, rel=1e-3)
    # soft answers mix as distributions: targets 0.3 p_i + 0.7 p_partner = [0.41, 0.59], [0.41, 0.59], [0.78, 0.22];
    # L1 to the student: 0.32, 0.18, 0.06
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    assert mixup_loss(logits, labels, probs, partner, lam, "l1", 1.0).item() == pytest.approx(0.56 / 3, rel=1e-5)
    # lam = 1 is no mixing at all, from probabilities and from teacher logits, at any temperature: confident
    # logits (probabilities far below the 1e-12 clamp of the probability path) give the unmixed loss exactly
    teacher = torch.tensor([[40.0, 0.0], [0.0, 3.0], [-35.0, 2.0]])
    for t in (1.0, 4.0, 10.0):
        plain = distillation_loss(logits, labels, torch.softmax(teacher, 1), teacher, "kl", t).item()
        assert mixup_loss(logits, labels, torch.softmax(teacher, 1), partner, 1.0, "kl", t, teacher).item() == pytest.approx(plain, rel=1e-6)
    # and lam = 0.3 from logits is KL to the mixed distribution (computed here in float64)
    p64 = torch.softmax(teacher.double(), 1)
    mixed = 0.3 * p64 + 0.7 * p64[partner]
    want = distillation_loss(logits.double(), labels, mixed, None, "kl", 4.0).item()
    got = mixup_loss(logits, labels, torch.softmax(teacher, 1), partner, lam, "kl", 4.0, teacher).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_mixup_trains_learns_and_is_refused_where_it_cannot_apply():
    x, y = blobs()
    m = ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [16]})
    res = train(m, x, targets_from({"label": y}, 2), TrainConfig(epochs=5, lr=0.1, batch_size=32, mixup=0.4),
                torch.device("cpu"), eval_set=blobs(200, 1))
    assert res.last.eval_accuracy > 0.95
    # not the plain run: the batches it learned from were mixed
    p = ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [16]})
    torch.manual_seed(0)
    train(p, x, targets_from({"label": y}, 2), TrainConfig(epochs=1, lr=0.1, batch_size=32), torch.device("cpu"))
    q = ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [16]})
    q.load_state_dict(p.state_dict())
    for mixup, model in ((0.0, p), (0.4, q)):
        train(model, x, targets_from({"label": y}, 2), TrainConfig(epochs=1, lr=0.1, batch_size=32, mixup=mixup, seed=3),
              torch.device("cpu"))
    assert not torch.allclose(next(p.parameters()), next(q.parameters()))
    # a negative --seed works as without mixup (numpy's generator refuses negative seeds)
    train(ImageClassifier("mlp", (1, 4, 4), 2, {"hidden": [4]}), x[:64], targets_from({"label": y[:64]}, 2),
          TrainConfig(epochs=1, batch_size=32, mixup=0.4, seed=-1), torch.device("cpu"))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(KdUsageError, match="--mixup"):
            TrainConfig(mixup=bad).validate()
    with pytest.raises(KdUsageError, match="--mixup"):
        train_online(m, iter(()), 2, TrainConfig(mixup=0.4), torch.device("cpu"), save=lambda model, info: None)


def test_auto_loss_is_kl_on_soft_answers_and_cross_entropy_on_labels():
    assert TrainConfig().loss_for(soft=True) == "kl" and TrainConfig().loss_for(soft=False) == "ce"
    assert TrainConfig(loss="l1").loss_for(soft=True) == "l1"


def test_non_finite_answers_and_bad_labels_are_refused_naming_the_source():
    from kdtools.errors import KdError

    probs = torch.full((4, 3), 1 / 3)
    probs[2, 1] = float("nan")
    with pytest.raises(KdError, match=r"snan.kds: NaN or infinite probs in 1 answer \(first at row 2\)"):
        targets_from({"probs": probs}, 3, "snan.kds")
    logits = torch.zeros(3, 3)
    logits[0, 0] = float("inf")
    with pytest.raises(KdError, match=r"row 0"):
        targets_from({"logits": logits}, 3, "x")
    with pytest.raises(KdError, match=r"q.h5: labels outside 0..2"):
        targets_from({"label": torch.tensor([0, 3])}, 3, "q.h5")
    assert targets_from({"probs": torch.full((2, 3), 1 / 3)}, 3).soft
    assert targets_from({"probs": torch.zeros(0, 3)}, 3).labels.shape == (0,)  # no rows: the caller says so


def test_nan_images_and_a_zero_std_are_named_not_blamed_on_the_learning_rate(tmp_path):
    # a NaN pixel trained on gave "training diverged ... lower --lr"; --normalize 0.5,0 divided by zero
    from conftest import kd
    from kdtools.errors import KdError
    from kdtools.train import TrainConfig, targets_from, train

    x = torch.rand(8, 1, 4, 4)
    x[3, 0, 0, 0] = float("nan")
    model = ImageClassifier("mlp", (1, 4, 4), 2)
    with pytest.raises(KdError, match=r"the training images: NaN or infinite values in 1 row \(first at row 3\)"):
        train(model, x, targets_from({"label": torch.zeros(8, dtype=torch.long)}, 2), TrainConfig(epochs=1), torch.device("cpu"))
    r = kd("kd-distill", "--data", "digits", "--epochs", 1, "--normalize", "0.5,0", "-o", tmp_path / "w.safetensors")
    assert r.returncode == 2 and b"STD a positive number" in r.stderr and not (tmp_path / "w.safetensors").exists()
