"""train.box_loss: the few-boxes lever, a cell BCE fitting each class's score map to its boxes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cxrcam.config import load_config
from cxrcam.data.cache import open_cache, prepare
from cxrcam.data.dataset import CacheDataset
from cxrcam.data.tables import target_columns
from cxrcam.errors import CxrcamError
from cxrcam.models import create_classifier, load_classifier
from cxrcam.train.classifier import box_map_loss, supervised_boxes, train_classifier


def test_box_map_loss_by_its_definition():
    """Cells a box of the class overlaps are 1, the rest 0; positives and negatives weigh half each;
    undecided pairs, padding and a class whose boxes were pushed out of the image count for nothing."""
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 4, 4)
    boxes = torch.tensor([[[16., 16., 40., 30.], [0., 0., 0., 0.]],  # image 0: class 1 over cells (1-2, 1), padding
                          [[10., 10., 10., 50.], [50., 0., 64., 15.]]])  # image 1: class 2 degenerate, class 0 top right
    classes = torch.tensor([[1, -1], [2, 0]])
    decided = torch.tensor([[1., 1., 0.], [1., 1., 1.]])  # image 0: class 2 undecided (say, positive without a box)

    def pair(logits, target):
        cells = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        on, off = cells[target == 1], cells[target == 0]
        return (on.mean() + off.mean()) / 2 if len(on) else off.mean()

    t01 = torch.zeros(4, 4)
    t01[1, 1:3] = 1  # y 16-30 -> row 1; x 16-40 -> columns 1 and 2
    t10 = torch.zeros(4, 4)
    t10[0, 3] = 1  # y 0-15 -> row 0; x 50-64 -> column 3
    expected = [pair(maps[0, 0], torch.zeros(4, 4)), pair(maps[0, 1], t01),  # image 0, classes 0 and 1
                pair(maps[1, 0], t10), pair(maps[1, 1], torch.zeros(4, 4))]  # image 1, classes 0 and 1 (2: lost)
    got = box_map_loss(maps, boxes, classes, decided, 64)
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    # a perfect map (large on its boxes, very negative elsewhere) costs almost nothing
    perfect = torch.full((2, 3, 4, 4), -20.0)
    perfect[0, 1][t01 == 1] = 20
    perfect[1, 0][t10 == 1] = 20
    assert box_map_loss(perfect, boxes, classes, decided, 64).item() < 1e-6


@pytest.mark.parametrize("pooling", ["avg", "pcam"])
def test_the_maps_the_loss_fits_are_the_class_activation_maps(pooling):
    """model(x, maps=True): the logits of model(x), and maps they pool from: under average pooling +
    linear, the linear layer at each cell (whose mean is the logit); with a score head, its maps."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 5, output_stride=16, pooling=pooling).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits, maps = model(x, maps=True)
        plain = model(x)
    assert maps.shape == (2, 5, 4, 4) and torch.allclose(logits, plain, atol=1e-5)
    pooled = maps.mean((2, 3)) if pooling == "avg" else model.head.pool(maps)
    assert torch.allclose(pooled, logits, atol=1e-5)


@pytest.fixture(scope="module")
def small_cache(synth_vinbig, tmp_path_factory):
    out = tmp_path_factory.mktemp("box_loss") / "cache"
    prepare("vinbig", synth_vinbig, out, load_config("tiny", ["prepare.size=64", "prepare.workers=1"]), progress=False)
    return open_cache(out)


def test_boxes_move_with_the_image_and_are_sampled_from_the_training_fold(small_cache):
    cache = small_cache
    rows = np.arange(len(cache.images))
    boxed = sorted(set(cache.boxes["image_id"]))
    chosen = supervised_boxes(cache, rows, 5, seed=3)
    assert chosen["image_id"].nunique() == 5 and set(chosen["image_id"]) <= set(boxed)
    assert chosen.equals(supervised_boxes(cache, rows, 5, seed=3))  # seeded
    assert supervised_boxes(cache, rows, 0, seed=3)["image_id"].nunique() == len(boxed)  # 0: every boxed image
    normal = np.flatnonzero(~cache.images["image_id"].isin(boxed).to_numpy())
    with pytest.raises(CxrcamError, match="no boxes on its training fold"):
        supervised_boxes(cache, normal, 0, seed=3)
    # a shift moves the boxes as it moves the image: the box's pixels stay the box's pixels
    from torchvision.transforms import v2

    k = int(np.flatnonzero(cache.images["image_id"].to_numpy() == boxed[0])[0])
    plain = CacheDataset(cache, np.array([k]), boxes=cache.boxes)
    torch.manual_seed(1)
    moved = CacheDataset(cache, np.array([k]), transform=v2.RandomAffine(degrees=0, translate=(0.15, 0.15)),
                         boxes=cache.boxes)
    x0, _, _, (b0, c0, d0) = plain[0]
    x1, _, _, (b1, c1, d1) = moved[0]
    inner = x0[0, 12:52, 12:52]
    dy, dx = min(((dy, dx) for dy in range(-10, 11) for dx in range(-10, 11)),  # the image's own shift
                 key=lambda s: float((x1[0, 12 + s[0]:52 + s[0], 12 + s[1]:52 + s[1]] - inner).abs().mean()))
    assert (dx, dy) != (0, 0) and torch.allclose(x1[0, 12 + dy:52 + dy, 12 + dx:52 + dx], inner, atol=1.5 / 255)
    real = c0 >= 0
    expected = (b0[real] + torch.tensor([dx, dy, dx, dy], dtype=torch.float32)).clamp(0, 64)
    assert torch.allclose(b1[real], expected, atol=1e-4) and torch.equal(c0, c1) and torch.equal(d0, d1)
    labels = cache.images.iloc[k][target_columns(cache.schema)].to_numpy(np.float64)
    decided = (labels < 0.5) | np.isin(np.arange(len(labels)), c0[real].numpy())  # the boxed and the absent classes
    assert torch.equal(d0, torch.tensor(decided, dtype=torch.float32))


@pytest.mark.slow
def test_the_box_loss_puts_each_class_map_on_its_boxes(small_cache, tmp_path):
    """Trained the same way, with and without train.box_loss: with it, each boxed class's score map
    peaks on its own boxes far more often (the boxed images, 4 x 4 maps)."""
    cache = small_cache
    boxed = cache.boxes

    def pointing(ckpt) -> float:
        """Per boxed (image, class): does the map's peak cell overlap one of the class's boxes?"""
        model, _ = load_classifier(ckpt)
        rows = np.flatnonzero(cache.images["image_id"].isin(set(boxed["image_id"])).to_numpy())
        data = CacheDataset(cache, rows, boxes=boxed)
        hits = []
        for k in range(len(data)):
            x, _, _, (b, c, _) = data[k]
            with torch.no_grad():
                _, maps = model(x[None], maps=True)
            h, w = maps.shape[-2:]
            for cls in sorted(set(c[c >= 0].tolist())):
                j = int(maps[0, cls].argmax())
                y0, x0 = j // w * 64 / h, j % w * 64 / w
                mine = b[c == cls]
                hits.append(bool(((mine[:, 0] < x0 + 64 / w) & (mine[:, 2] > x0) & (mine[:, 1] < y0 + 64 / h)
                                  & (mine[:, 3] > y0)).any()))
        return float(np.mean(hits))

    scores = {}
    for weight in (0, 1):
        config = load_config("tiny", ["prepare.size=64", "train.workers=0", "train.epochs=4", "train.batch_size=16",
                                      "train.lr=3e-3", f"train.box_loss={5 * weight}"])
        metrics = train_classifier(config, cache.root, tmp_path / f"w{weight}", progress=False)
        assert ("box" in metrics) == (weight > 0)  # the term is logged beside the label BCE
        scores[weight] = pointing(tmp_path / f"w{weight}" / "best.pt")
    assert scores[1] > scores[0] + 0.15, scores
    logged = pd.read_csv(tmp_path / "w1" / "metrics.csv")
    assert logged["box"].iloc[-1] < logged["box"].iloc[0]  # and it falls as the maps learn the boxes
