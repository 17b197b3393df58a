"""The classifier factory: timm backbones, pooling + linear head, weights files, offline."""
from __future__ import annotations

import io
import socket

import pytest
import timm
import torch

from cxrcam.errors import CxrcamError
from cxrcam.files import load_checkpoint, save_checkpoint
from cxrcam.models import create_classifier, load_classifier


@pytest.mark.parametrize("name", ["test_resnet", "resnet10t", "test_efficientnet", "resnet50", "densenet121"])
def test_any_timm_name_gives_pooling_linear_head(name):
    model = create_classifier(name, 14).eval()
    head = model.backbone.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == 14
    assert model.backbone.global_pool.pool_type == "avg"
    logits = model(torch.rand(2, 1, 64, 64))  # a grey batch; the model replicates channels
    assert logits.shape == (2, 14)
    # the normalisation is the backbone's: grey x replicated to RGB, ImageNet statistics
    x = torch.rand(1, 1, 8, 8)
    mean = torch.tensor(model.backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.pretrained_cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), (x.expand(-1, 3, -1, -1) - mean) / std)


def test_one_channel_backbone():
    model = create_classifier("resnet10t", 14, in_chans=1)
    assert model.mean.shape == (1, 1, 1, 1)
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 14)


def test_pretrained_from_local_file(tmp_path):
    imagenet = timm.create_model("resnet10t", num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "w.pth")
    model = create_classifier("resnet10t", 14, pretrained=str(tmp_path / "w.pth"))
    ours = model.backbone.state_dict()
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc."):  # the 1000-class head is replaced by a 14-class one
            assert torch.equal(ours[key], value), key
    assert ours["fc.weight"].shape == (14, 512)


def test_missing_weights_file(tmp_path):
    with pytest.raises(CxrcamError, match="weights file not found"):
        create_classifier("resnet10t", 14, pretrained=str(tmp_path / "none.pth"))


def test_pretrained_offline_fails_clearly():
    try:
        socket.getaddrinfo("huggingface.co", 443)
        pytest.skip("the model hub resolves here; this test checks the offline message")
    except OSError:
        pass
    with pytest.raises(CxrcamError, match="cannot be reached.*local weights file"):
        create_classifier("resnet18", 14, pretrained=True)


def test_unknown_model_name():
    with pytest.raises(CxrcamError, match="unknown timm model 'resnet_9000'"):
        create_classifier("resnet_9000", 14)


def test_checkpoint_loads_with_weights_only(tmp_path):
    model = create_classifier("test_resnet", 14)
    ckpt = {"model_name": "test_resnet", "in_chans": 3, "classes": [f"c{i}" for i in range(14)],
            "model": model.state_dict()}
    torch.save(ckpt, tmp_path / "ok.pt")
    loaded, meta = load_classifier(tmp_path / "ok.pt")
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x)) and meta["classes"] == ckpt["classes"]

    class Payload:  # anything beyond tensors and plain containers must be refused
        def __reduce__(self):
            return (print, ("code ran",))

    buffer = io.BytesIO()
    torch.save({"model_name": "x", "evil": Payload()}, buffer)
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CxrcamError, match="not a readable cxrcam checkpoint") as refused:
        load_classifier(tmp_path / "evil.pt")
    # the reason (the global it would call), without torch's advice to retry with weights_only=False
    assert "print" in str(refused.value) and "weights_only" not in str(refused.value)
    assert "likely succeed" not in str(refused.value)


def test_checkpoints_say_what_they_are(tmp_path):
    """One loader checks the kind: a detector checkpoint is no classifier, a run folder means its
    best.pt, and a classifier from before `kind` existed still loads as one."""
    model = create_classifier("test_resnet", 14)
    meta = {"model_name": "test_resnet", "in_chans": 3, "classes": [f"c{i}" for i in range(14)],
            "model": model.state_dict()}
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "best.pt", {**meta, "kind": "classifier", "arch": "test_resnet"})
    save_checkpoint(tmp_path / "old.pt", meta)
    save_checkpoint(tmp_path / "det.pt", {"kind": "detector", "backbone": "resnet10t", "model": {}})
    assert load_classifier(tmp_path / "run")[1]["kind"] == "classifier"
    assert load_classifier(tmp_path / "old.pt")[1]["kind"] == "classifier"
    with pytest.raises(CxrcamError, match=r"det.pt: not a cxrcam classifier checkpoint \(it is a detector\)"):
        load_classifier(tmp_path / "det.pt")
    with pytest.raises(CxrcamError, match="not a cxrcam detector checkpoint"):
        load_checkpoint(tmp_path / "old.pt", kind="detector")
    # hand-made checkpoints: an entry missing, or weights of another shape: one line naming the file
    save_checkpoint(tmp_path / "noclasses.pt", {k: v for k, v in meta.items() if k != "classes"})
    with pytest.raises(CxrcamError, match="noclasses.pt: the checkpoint has no 'classes' entry"):
        load_classifier(tmp_path / "noclasses.pt")
    save_checkpoint(tmp_path / "shapes.pt", {**meta, "classes": ["a", "b"]})  # a 14-class head, 2 classes said
    with pytest.raises(CxrcamError, match="shapes.pt: its weights do not fit the model it describes"):
        load_classifier(tmp_path / "shapes.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CxrcamError, match="empty_run is a folder without best.pt"):
        load_checkpoint(tmp_path / "empty_run")
    # a CSV given as a checkpoint is named as what it is, not as a pickle that "calls code"
    (tmp_path / "probs.csv").write_text("image_id,Aortic enlargement\na,0.5\n")
    with pytest.raises(CxrcamError, match=r"probs.csv: not a checkpoint .*reads as text \(a CSV") as csv:
        load_checkpoint(tmp_path / "probs.csv")
    assert "calls" not in str(csv.value)


def test_lse_pooling_lies_between_the_mean_and_the_maximum():
    from cxrcam.models.factory import LSEPool

    scores = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    flat = scores.flatten(2)
    assert torch.allclose(LSEPool(1e-2)(scores), flat.mean(-1), atol=2e-2)
    assert torch.allclose(LSEPool(1e4)(scores), flat.amax(-1), atol=1e-2)
    middle = LSEPool(5.0)(scores)
    assert (middle > flat.mean(-1)).all() and (middle < flat.amax(-1)).all()


def test_pcam_and_csra_pooling_by_their_papers_definitions():
    """PCAM (Ye et al. 2020): features pooled with the class map's normalised sigmoid, then the
    class's linear layer. CSRA (Zhu & Wu 2021): the mean of the class scores plus lambda times their
    softmax-attended sum. Both written out from features here, against the pools on score maps."""
    from cxrcam.models.factory import CSRAPool, PCAMPool, ScoreMapHead, score_pool

    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 4, 5, generator=g)
    head = ScoreMapHead(6, 3, PCAMPool())
    weight, bias = head.scores.weight[:, :, 0, 0], head.scores.bias  # C x D, C
    with torch.no_grad():
        flat = features.flatten(2)  # B x D x N
        scores = torch.einsum("cd,bdn->bcn", weight, flat) + bias[None, :, None]  # B x C x N
        p = torch.sigmoid(scores)
        pooled = torch.einsum("bcn,bdn->bcd", p / p.sum(-1, keepdim=True), flat)  # each class's own feature
        expected = (pooled * weight[None]).sum(-1) + bias
        assert torch.allclose(head(features), expected, atol=1e-5)
        head.pool = CSRAPool(0.3)
        attention = torch.softmax(scores, dim=-1)
        assert torch.allclose(head(features), scores.mean(-1) + 0.3 * (attention * scores).sum(-1), atol=1e-5)
    assert score_pool("csra", csra_lambda=0.2).lam == 0.2 and isinstance(score_pool("pcam"), PCAMPool)
    model = create_classifier("resnet10t", 4, pooling="csra", csra_lambda=0.25)
    assert model.head.pool.lam == 0.25
    with pytest.raises(CxrcamError, match="model.pooling"):
        create_classifier("resnet10t", 4, pooling="max")


def test_an_lse_classifier_trains_saves_and_maps_its_own_score_maps(vinbig_model, tmp_path):
    """model.pooling=lse: trained, saved and rebuilt from its checkpoint with the same logits; its
    default Grad-CAM is each class's own score map (the head's input to the pooling), as CAM draws it."""
    from cxrcam.cam import create_cam
    from cxrcam.config import load_config
    from cxrcam.train.classifier import train_classifier

    cache, _ = vinbig_model
    config = load_config("tiny", ["model.pooling=lse", "model.lse_r=3", "train.epochs=1", "train.workers=0",
                                  "model.output_stride=32", "train.batch_size=32"])
    train_classifier(config, cache, tmp_path / "run", progress=False)
    model, ckpt = load_classifier(tmp_path / "run" / "best.pt")
    assert ckpt["pooling"] == "lse" and ckpt["lse_r"] == 3 and model.head.pool.r == 3
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    again = create_classifier("resnet10t", 14, pooling="lse", lse_r=3)
    again.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), model(x), atol=1e-5)
        model.head.scores.bias += 1 - model.head.scores(model.backbone(model.normalize(x))).amin()  # all positive
        scores = model.head.scores(model.backbone(model.normalize(x)))
    cam = create_cam(model, "gradcam")
    assert cam.target_name == "head.scores"
    out = cam(x, [2, 7])
    expected = torch.nn.functional.interpolate(scores[:, [2, 7]].clamp_min(0), size=(64, 64), mode="bilinear",
                                               align_corners=False)
    lo, hi = expected.flatten(2).amin(-1)[..., None, None], expected.flatten(2).amax(-1)[..., None, None]
    scaled = (expected - lo) / (hi - lo + 1e-7)
    assert torch.allclose(out.cams, scaled, atol=1e-4) and float(scaled.max()) > 0.99
