"""Fast checks of the training library without Ray: metrics, targets, comm hooks, config validation."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from livelens.errors import ConfigError
from livelens.taxonomy import load_taxonomy
from livelens.train import LoopConfig
from livelens.train.ddp import ByteCounter, autocast, check_precision, grad_scaler, register_comm_hook
from livelens.train.metrics import confusion_png, head_metrics, multihead_metrics
from livelens.train.targets import covered_groups, target_key, targets_from_labels

SOFT = SimpleNamespace(kind="softmax", classes=("none", "a", "b"))
SIG = SimpleNamespace(kind="sigmoid", classes=("ok", "x", "y"))


def test_softmax_metrics_match_hand_counts():
    target = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 2, 2, 2, 0])
    probs = np.eye(3)[pred] * 0.8 + 0.1
    m = head_metrics(probs, target, SOFT)
    assert m["accuracy"] == pytest.approx(4 / 6)
    b = m["labels"]["b"]  # true b: rows 3,4,5; predicted b: rows 2,3,4
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == pytest.approx(2 / 3)
    assert b["support"] == 3 and b["accuracy"] == pytest.approx(4 / 6)
    a = m["labels"]["a"]
    assert a["precision"] == 1.0 and a["recall"] == 0.5 and a["f1"] == pytest.approx(2 / 3)


def test_auc_is_one_for_separating_scores_and_nan_without_positives():
    target = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=np.float32)
    probs = np.array([[0.9, 0.2, 0.1], [0.1, 0.7, 0.3], [0.2, 0.95, 0.6], [0.8, 0.4, 0.2]])
    m = head_metrics(probs, target, SIG)
    assert m["labels"]["x"]["auc"] == 1.0
    assert m["accuracy"] == 1.0  # every row's thresholded vector matches exactly
    none_y = head_metrics(probs, np.zeros_like(target), SIG)
    assert math.isnan(none_y["labels"]["y"]["auc"])


def test_multihead_scalars_and_confusion_png():
    probs = {"s": np.eye(3)[[0, 1, 2, 1]], "m": np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0.0]])}
    targets = {"s": np.array([0, 1, 2, 2]), "m": np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0.0]])}
    heads = {"s": SOFT, "m": SIG}
    out = multihead_metrics(probs, targets, heads)
    assert out["scalars"]["acc/s"] == 0.75 and out["scalars"]["acc/m"] == 1.0
    assert out["scalars"]["val_accuracy"] == pytest.approx(0.875)
    png = confusion_png(probs, targets, heads, title="t")
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 300 and img.height > 200


def test_metrics_at_served_thresholds_show_what_accuracy_hides():
    from livelens.models import heads_from_taxonomy
    from livelens.train.metrics import served_thresholds

    tax = load_taxonomy()
    head = heads_from_taxonomy(tax, ["ads"])["ads"]
    thr = served_thresholds(tax, head)
    j = head.classes.index("ads_phone")
    assert thr[j] == tax.labels["ads_phone"].review  # a block-action group acts from its review threshold
    game = heads_from_taxonomy(tax, ["game"])["game"]
    k = game.classes.index("game_honor_of_kings")
    assert served_thresholds(tax, game)[k] == tax.labels["game_honor_of_kings"].threshold  # tags: the tag threshold
    # 20 frames, 2 with a phone the model scores 0.45: argmax/0.5 says "never", which is 90% accurate.
    n = 20
    probs = np.full((n, len(head.classes)), 0.01)
    probs[:, 0] = 0.9
    target = np.zeros_like(probs)
    target[:, 0] = 1
    for i in (0, 1):
        probs[i, j], target[i, j], target[i, 0] = 0.45, 1, 0
    plain = head_metrics(probs, target, head)["labels"]["ads_phone"]
    served = head_metrics(probs, target, head, thresholds=thr)["labels"]["ads_phone"]
    assert plain["accuracy"] == 0.9 and plain["recall"] == 0.0
    assert served["recall"] == 1.0 and served["precision"] == 1.0  # 0.45 >= review 0.40: the service reviews it
    assert head_metrics(probs, target, head, thresholds=thr)["labels"]["ads_none"]["recall"] == 1.0


def test_targets_from_labels_exclusive_and_multilabel():
    tax = load_taxonomy()
    rows = [["ads_qrcode", "ads_phone", "game_honor_of_kings"], [], ["quality_black"]]
    t = targets_from_labels(rows, tax, ["ads", "game", "quality"])
    ads = tax.groups["ads"]
    assert t[target_key("ads")].shape == (3, len(ads.classes))
    assert t[target_key("ads")][0, ads.classes.index("ads_qrcode")] == 1
    assert t[target_key("ads")][0, 0] == 0 and t[target_key("ads")][1, 0] == 1  # negative iff no positive
    assert t[target_key("game")].tolist() == [tax.groups["game"].classes.index("game_honor_of_kings"), 0, 0]
    assert t[target_key("quality")][2, tax.groups["quality"].classes.index("quality_black")] == 1


def test_covered_groups_and_foreign_labels():
    tax = load_taxonomy()
    assert covered_groups(tax, {"ads_url": 3, "game_dota2": 0, "quality_black": 1}) == ["ads", "quality"]
    with pytest.raises(ConfigError, match="not in taxonomy"):
        covered_groups(tax, {"ads_fax_number": 2})


def test_precision_and_hook_validation():
    check_precision("bf16", use_gpu=False)
    with pytest.raises(ConfigError, match="fp16"):
        check_precision("fp16", use_gpu=False)
    with pytest.raises(ConfigError, match="unknown precision"):
        check_precision("int8", use_gpu=False)
    with pytest.raises(ConfigError, match="comm hook"):
        LoopConfig(comm_hook="topk").validate()
    with pytest.raises(ConfigError, match="unknown loop config keys"):
        LoopConfig.from_dict({"epochz": 3})
    with pytest.raises(ConfigError, match="fail_once_marker"):
        LoopConfig(fail_at_epoch=1).validate()


def test_bf16_autocast_on_cpu_and_scaler_off():
    dev = torch.device("cpu")
    with autocast("bf16", dev):
        y = nn.Linear(8, 4)(torch.randn(2, 8))
    assert y.dtype == torch.bfloat16
    assert not grad_scaler("bf16", dev).is_enabled()


@pytest.fixture
def gloo_world(tmp_path):
    """A one-process gloo group: enough for DDP to run its comm hook on every bucket."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _bytes_per_step(hook: str, rank: int = 2) -> tuple[float, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    counter = ByteCounter()
    register_comm_hook(ddp, hook, powersgd_rank=rank, start_powersgd_iter=2, counter=counter)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = torch.randn(32, 256), torch.randint(0, 10, (32,))
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        counter.end_step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # still trains through the hook
    return counter.per_step(skip=2), sum(p.numel() for p in model.parameters())


def test_grad_bytes_powersgd_vs_allreduce(gloo_world):
    plain, numel = _bytes_per_step("none")
    fp16, _ = _bytes_per_step("fp16")
    psgd, _ = _bytes_per_step("powersgd", rank=2)
    assert plain == numel * 4  # fp32 allreduce sends every gradient element
    assert fp16 == numel * 2
    # rank-2 factors of the 256x256 and 10x256 matrices, plus the uncompressed biases
    assert psgd == ((256 + 256) * 2 + (10 + 256) * 2 + 256 + 10) * 4
    assert psgd < plain / 10


def _frame_batch(n: int = 6) -> dict:
    """``n`` generated frames as a numpy batch of the manifest's columns, one of them showing text."""
    from livelens.data.frames import FrameConfig, generate_slot

    rows = [generate_slot(3, s, FrameConfig(p_black=0, p_frozen=0))[0] for s in range(n)]
    rows[0]["texts"] = [{"text": "CALL 138 0000 1234", "box": [10, 10, 200, 40]}]
    col = lambda k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1]  # noqa: E731 (ragged columns)
    return {"id": np.array([r["id"] for r in rows]), "image_bytes": col("image_bytes"), "labels": col("labels"),
            "boxes": col("boxes"), "texts": col("texts")}


def test_training_rows_keep_their_crop_and_say_which_may_be_mirrored():
    from livelens.train.classification import preprocess_batch

    batch = _frame_batch()
    kw = dict(size=64, groups=["ads"], taxonomy=None, train=True)
    a, b = preprocess_batch(batch, **kw), preprocess_batch(batch, **kw)
    # Seeded by the row: the task gives the same crop each time, and mirrors nothing itself.
    np.testing.assert_array_equal(a["x"], b["x"])
    assert a["flip_ok"].tolist() == [not (t is not None and len(t)) for t in batch["texts"]]
    assert not a["flip_ok"][0] and a["flip_ok"].any()
    assert "flip_ok" not in preprocess_batch(batch, **{**kw, "train": False})


def test_flips_differ_between_epochs_repeat_within_one_and_spare_text():
    from livelens.train.classification import flip_per_epoch

    x = torch.arange(64 * 3 * 2 * 4, dtype=torch.float32).reshape(64, 3, 2, 4)
    ok = torch.ones(64, dtype=torch.bool)
    ok[:8] = False

    def flipped(seed: int, epoch: int, rank: int = 0) -> torch.Tensor:
        (out,) = flip_per_epoch([{"x": x, "flip_ok": ok, "t_ads": torch.zeros(64)}], seed, epoch, rank)
        rows = (out["x"] != x).flatten(1).any(1)
        # A changed row is exactly the mirror image; the input batch is not changed in place.
        assert torch.equal(out["x"][rows], x[rows].flip(-1)) and torch.equal(out["t_ads"], torch.zeros(64))
        return rows

    e0, e1 = flipped(0, 0), flipped(0, 1)
    assert not e0[:8].any() and not e1[:8].any()  # rows with text are never mirrored
    assert 10 < int(e0.sum()) < 46 and not torch.equal(e0, e1)  # about half, and another half next epoch
    assert torch.equal(e0, flipped(0, 0))  # a rerun (or a resume at this epoch) draws the same flips
    assert not torch.equal(e0, flipped(0, 0, rank=1)) and not torch.equal(e0, flipped(1, 0))
    # Batches without the column (evaluation) pass through untouched.
    (plain,) = flip_per_epoch([{"x": x}], 0, 0)
    assert plain["x"] is x
