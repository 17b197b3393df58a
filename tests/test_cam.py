"""The CAM engine: the closed-form fast path against pytorch-grad-cam itself, the automatic
target layer, and the batched general path."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxrcam.cam import (ClosedFormCAM, GradientCAM, LibraryCAM, compute_cams, create_cam, probe, scale_cams,
                        target_weights)
from cxrcam.errors import CxrcamError
from cxrcam.models import create_classifier
from cxrcam.models.factory import Classifier

LIBRARY = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM, "xgradcam": XGradCAM}


def library_maps(model, layer, images, classes, method):
    """pytorch-grad-cam as its README uses it: one call per target class (B images at once);
    ``layer``: a module or a list of them (fused)."""
    engine = LIBRARY[method](model=model, target_layers=layer if isinstance(layer, list) else [layer])
    return np.stack([engine(input_tensor=images, targets=[ClassifierOutputTarget(c)] * len(images))
                     for c in classes], axis=1)


@pytest.fixture(scope="module", params=["resnet50", "densenet121"])
def net(request):
    torch.manual_seed(0)
    model = create_classifier(request.param, 14).eval()
    layer = model.backbone.layer4 if request.param == "resnet50" else model.backbone.features.norm5
    return request.param, model, layer


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_fast_path_matches_pytorch_grad_cam(net, method):
    name, model, layer = net
    torch.manual_seed(1)
    images = torch.rand(3, 1, 128, 128)
    classes = [0, 3, 7, 13]
    cam = create_cam(model, method)
    assert isinstance(cam, ClosedFormCAM)
    ours = cam(images, classes)
    theirs = library_maps(model, layer, images, classes, method)
    assert ours.cams.shape == (3, 4, 128, 128) and ours.cams.dtype == torch.float32
    assert np.abs(ours.cams.numpy() - theirs).max() < 1e-4
    assert theirs.max() > 0.99  # non-degenerate maps were compared
    with torch.no_grad():
        assert torch.allclose(ours.logits, model(images), atol=1e-5)


def test_target_layer_is_the_tensor_entering_the_pooling(net):
    name, model, layer = net
    info = probe(model)
    assert info.linear_head
    # ResNet: layer4's output; DenseNet-121: norm5's output (its ReLU inside) = features' output
    assert info.target_name == {"resnet50": "backbone.layer4", "densenet121": "backbone.features"}[name]
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.update(named=out)),
             model.get_submodule(info.target_name).register_forward_hook(lambda m, a, out: seen.update(found=out))]
    with torch.no_grad():
        model(torch.rand(1, 1, 96, 96))
    for h in hooks:
        h.remove()
    assert seen["found"] is seen["named"]


def test_other_heads_use_the_gradients_and_match_the_library():
    """Max pooling breaks the closed form: the factory falls back to the gradient engine."""
    torch.manual_seed(0)
    backbone = timm.create_model("resnet10t", num_classes=5, global_pool="max")
    model = Classifier(backbone, (0.5,) * 3, (0.25,) * 3).eval()
    assert not probe(model).linear_head
    cam = create_cam(model, "gradcam++")
    assert isinstance(cam, GradientCAM) and cam.target_name == "backbone.layer4"
    images = torch.rand(2, 1, 96, 96)
    ours = compute_cams(model, images, "gradcam++", classes=[1, 4])
    theirs = library_maps(model, backbone.layer4, images, [1, 4], "gradcam++")
    assert np.abs(ours.numpy() - theirs).max() < 1e-5


@pytest.mark.parametrize("method", ["xgradcam", "eigencam", "layercam", "scorecam"])
def test_general_methods_batched(method):
    torch.manual_seed(0)
    model = create_classifier("test_resnet", 4).eval()
    images = torch.rand(3, 1, 64, 64)
    cams = compute_cams(model, images, method, classes=[0, 2])
    assert cams.shape == (3, 2, 64, 64)
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1
    single = compute_cams(model, images[1:2], method, classes=[0, 2])  # a batch = its images one by one
    assert torch.allclose(cams[1:2], single, atol=1e-4)


def test_scale_cams_is_the_library_scaling():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(2, 7, 9)).astype(np.float32)
    theirs = scale_cam_image(scale_cam_image(np.maximum(raw, 0), (40, 30)))  # per layer, then aggregated
    ours = scale_cams(torch.from_numpy(raw)[:, None], (30, 40))[:, 0].numpy()
    assert np.abs(ours - theirs).max() < 1e-5
    assert float(scale_cams(torch.zeros(1, 1, 4, 4), (8, 8)).abs().max()) == 0  # constant map: no NaN


def test_fast_path_any_device_and_all_classes_default():
    model = create_classifier("test_resnet", 6).eval()
    cams = compute_cams(model, torch.rand(2, 1, 64, 64))
    assert cams.shape == (2, 6, 64, 64) and cams.device == next(model.parameters()).device


@pytest.mark.parametrize("method", ["gradcam++", "xgradcam"])
def test_any_timm_model_with_its_own_input(method):
    """A plain timm model on its own 3-channel batch, as pytorch-grad-cam takes it: the probe
    pass uses the batch's shape, and the maps equal the library's (closed form or not)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=14).eval()
    images = torch.rand(2, 3, 96, 96)
    cams = compute_cams(model, images, method, classes=[2, 5])
    theirs = library_maps(model, model.layer4, images, [2, 5], method)
    assert cams.shape == (2, 2, 96, 96)
    assert np.abs(cams.numpy() - theirs).max() < 1e-4
    assert isinstance(create_cam(model, method), ClosedFormCAM if method == "gradcam++" else LibraryCAM)  # probe from the model


@pytest.mark.parametrize("fast", [True, False])
def test_classes_chosen_from_the_logits(fast):
    """A rule on the batch's logits picks the maps: only those are returned, equal to the same
    columns of the all-class maps, with the logits the rule saw."""
    torch.manual_seed(0)
    model = create_classifier("test_resnet", 6).eval()
    cam = create_cam(model, "gradcam++", fast=fast)
    images = torch.rand(3, 1, 64, 64)
    seen = {}

    def top_two(logits):
        seen["logits"] = logits
        return sorted(set(logits.topk(2, dim=1).indices.flatten().tolist()))

    chosen = cam(images, top_two)
    assert seen["logits"] is chosen.logits
    everything = cam(images)
    assert chosen.classes == top_two(everything.logits) and 2 <= len(chosen.classes) <= 6
    assert torch.allclose(chosen.logits, everything.logits, atol=1e-5)
    assert torch.allclose(chosen.cams, everything.cams[:, chosen.classes], atol=1e-5)


@pytest.mark.parametrize("method,layer,engine", [("gradcam++", "", ClosedFormCAM), ("layercam", "layer3", GradientCAM),
                                                 ("xgradcam", "", LibraryCAM)])
def test_no_class_asked_is_a_normal_case(method, layer, engine):
    """A batch of normal images needs no map: B x 0 x H x W maps and the logits, from a list or
    from a rule on the logits, on every engine."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 14).eval()
    images = torch.rand(2, 1, 64, 64)
    cam = create_cam(model, method, layer)
    assert isinstance(cam, engine)
    for classes in ([], lambda logits: []):
        out = cam(images, classes)
        assert out.cams.shape == (2, 0, 64, 64) and out.cams.dtype == torch.float32 and out.classes == []
        with torch.no_grad():
            assert torch.allclose(out.logits, model(images), atol=1e-5)
    assert compute_cams(model, images, method, classes=[], target_layer=layer).shape == (2, 0, 64, 64)


def test_the_probe_pass_is_small_and_falls_back_to_the_batch():
    """compute_cams probes the head on one 64 px image, not on the batch; a model that refuses that
    size is probed on one image of the batch."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=14).eval()
    seen = []
    hook = model.conv1.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    images = torch.rand(3, 3, 96, 96)
    maps = compute_cams(model, images, classes=[2])
    hook.remove()
    assert seen == [(1, 3, 64, 64), (3, 3, 96, 96)] and maps.shape == (3, 1, 96, 96)
    fixed = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 94 * 94, 14))
    with pytest.raises(RuntimeError):
        fixed(torch.rand(1, 3, 64, 64))  # a head sized for 96 px inputs
    info = probe(fixed.eval(), torch.rand(2, 3, 96, 96))
    assert info.head is fixed[2] and not info.linear_head


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
@pytest.mark.parametrize("layers", ["layer2", "layer3", "layer4", "layer3,layer4"])
def test_gradient_engine_matches_pytorch_grad_cam_at_any_layer(method, layers):
    """One forward and one (batched, or per-class) backward down to the target layer(s): the maps
    of pytorch-grad-cam's one-backward-per-class, fused layers included, within 1e-4."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 14).eval()
    images = torch.rand(2, 1, 96, 96)
    classes = [1, 5, 9]
    modules = [model.backbone.get_submodule(n) for n in layers.split(",")]
    theirs = library_maps(model, modules, images, classes, method)
    assert theirs.max() > 0.99
    for batched in (True, False):
        cam = GradientCAM(model, method, layers, batched=batched)
        assert cam.target_name == ",".join(f"backbone.{n}" for n in layers.split(","))
        ours = cam(images, classes)
        assert ours.cams.shape == (2, 3, 96, 96)
        assert np.abs(ours.cams.numpy() - theirs).max() < 1e-4, batched
        with torch.no_grad():
            assert torch.allclose(ours.logits, model(images), atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after the pass


def test_gradient_engine_on_densenet_blocks_and_the_graph_starts_at_the_layer():
    """A concatenating network, at a dense block; the forward records no parameter and nothing
    below the target layer: its one leaf is that layer's output."""
    from timm.models.densenet import DenseNet

    torch.manual_seed(0)
    small = DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_classes=14)  # DenseNet-121 in layout, thin
    model = Classifier(small, (0.5,) * 3, (0.25,) * 3).eval()
    images = torch.rand(1, 1, 64, 64)
    layer = "features.denseblock3"
    theirs = library_maps(model, model.backbone.get_submodule(layer), images, [0, 7], "layercam")
    cam = create_cam(model, "layercam", layer)
    assert isinstance(cam, GradientCAM)
    cam.forward(images)
    leaves, todo, seen = [], [cam._logits.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            leaves.append(node.variable)
        todo += [n for n, _ in node.next_functions]
    shape = {}
    hook = small.features.denseblock3.register_forward_hook(lambda m, a, out: shape.update(out=out.shape))
    with torch.no_grad():
        model(images)
    hook.remove()
    assert len(leaves) == 1 and leaves[0] is cam._inputs[0] and leaves[0].shape == shape["out"]  # denseblock3's output
    ours = cam(images, [0, 7])
    assert np.abs(ours.cams.numpy() - theirs).max() < 1e-4


def test_unknown_layer_is_one_line():
    model = create_classifier("resnet10t", 3).eval()

    with pytest.raises(CxrcamError, match="no module 'layer9'.*layer3"):
        create_cam(model, "layercam", "layer9")


def test_maps_are_fp32_under_a_callers_autocast():
    """CAMs are always computed in fp32: under a bf16 autocast the maps and logits are the fp32 ones."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 14).eval()
    images = torch.rand(2, 1, 64, 64)
    for layer in ("", "layer3"):
        cam = create_cam(model, "layercam", layer)
        plain = cam(images, [2, 6])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                assert model(images).dtype == torch.bfloat16  # the caller's context is bf16
            under = cam(images, [2, 6])
        assert under.cams.dtype == torch.float32 and torch.equal(under.cams, plain.cams)
        assert torch.equal(under.logits, plain.logits)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gradient_engine_under_a_callers_no_grad(context):
    """Callers wrap inference in no_grad or inference_mode (the detector's CAM pass does): the
    gradient engine still records its own pass, both backward ways, and gives the same maps."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 14).eval()
    images = torch.rand(2, 1, 64, 64)
    expected = create_cam(model, "layercam", "layer3,layer4")(images, [1, 2]).cams
    for batched in (True, False):
        cam = GradientCAM(model, "layercam", "layer3,layer4", batched=batched)
        with context():
            assert torch.allclose(cam(images, [1, 2]).cams, expected, atol=1e-6)


@pytest.mark.parametrize("method,layer,engine,batched", [
    ("gradcam++", "", ClosedFormCAM, None), ("layercam", "layer3", GradientCAM, False),
    ("layercam", "layer3,layer4", GradientCAM, True), ("gradcam++", "layer4", LibraryCAM, None)])
def test_each_image_gets_only_its_own_maps(method, layer, engine, batched):
    """``pairs``: each image's own classes (none for a normal image), equal to the same maps of the
    all-class call, image by image, with the logits the plan saw."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 6).eval()
    images = torch.rand(3, 1, 64, 64)
    cam = create_cam(model, method, layer, fast=engine is not LibraryCAM)
    assert isinstance(cam, engine)
    if batched is not None:
        cam.batched = batched
    need = [[4, 1], [], [2]]
    out = cam.pairs(images, lambda logits: [target_weights(n, logits.shape[1]) for n in need])
    everything = cam(images)
    assert out.images == [0, 0, 2] and out.maps.shape == (3, 64, 64)
    expected = torch.stack([everything.cams[b, c] for b, n in enumerate(need) for c in n])
    assert torch.allclose(out.maps, expected, atol=1e-5) and float(expected.max()) > 0.99
    assert torch.allclose(out.logits, everything.logits, atol=1e-5)
    assert cam.pairs(images, lambda logits: [target_weights([], 6)] * 3).maps.shape == (0, 64, 64)


def test_each_class_fuses_its_own_layers():
    """``use_class_layers``: from one layer2,layer3 pass, a class set to layer3 gets the layer3
    engine's map, the others the fused engine's, in the all-class call and in per-image pairs."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 6).eval()
    images = torch.rand(2, 1, 64, 64)
    fine, coarse = (create_cam(model, "layercam", layer) for layer in ("layer2,layer3", "layer3"))
    mixed = create_cam(model, "layercam", "layer2,layer3")
    mixed.use_class_layers({1: "layer3", 4: "backbone.layer3"}, 6)
    expected = fine(images).cams.clone()
    expected[:, [1, 4]] = coarse(images).cams[:, [1, 4]]
    assert torch.allclose(mixed(images).cams, expected, atol=1e-5)
    assert not torch.allclose(fine(images).cams[:, 1], coarse(images).cams[:, 1], atol=1e-3)  # the choice matters
    need = [[4, 0], [1]]
    out = mixed.pairs(images, lambda logits: [target_weights(n, 6) for n in need])
    assert torch.allclose(out.maps, torch.stack([expected[0, 4], expected[0, 0], expected[1, 1]]), atol=1e-5)
    mixed.use_class_layers({}, 6)
    assert mixed.class_layers is None and torch.allclose(mixed(images).cams, fine(images).cams, atol=1e-6)
    with pytest.raises(CxrcamError, match="not all among"):
        mixed.use_class_layers({2: "layer4"}, 6)


def test_a_batch_costs_its_busiest_images_pairs_not_the_union():
    """Three images needing three different classes: one backward pass (one round), where the
    all-class call runs one per class."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 6).eval()
    cam = create_cam(model, "layercam", "layer3")
    cam.batched = False
    passes = []
    hook = model.backbone.layer4.register_full_backward_hook(lambda *args: passes.append(1))
    try:
        cam.pairs(torch.rand(3, 1, 64, 64), lambda logits: [target_weights([c], 6) for c in (0, 3, 5)])
        assert len(passes) == 1
        cam(torch.rand(3, 1, 64, 64), [0, 3, 5])
        assert len(passes) == 1 + 3
    finally:
        hook.remove()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_contrastive_maps_are_the_library_maps_of_the_contrast(method):
    """A class against the image's other findings: pytorch-grad-cam's map of the target
    logit_c - mean(logit_others), from the closed form and from the gradient engine at layer3."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", 6).eval()
    images = torch.rand(2, 1, 64, 64)
    weights = target_weights([1, 4], 6, [[1, 2, 5], [0, 4]])
    assert torch.allclose(weights[0], torch.tensor([0, 1, -0.5, 0, 0, -0.5])) and weights[1, 0] == -1

    def library(layer):
        engine = LIBRARY[method](model=model, target_layers=[layer])
        return np.stack([engine(input_tensor=images, targets=[lambda out, w=w: (out * w).sum(-1)] * 2)
                         for w in weights], 1)

    for cam, layer in ((create_cam(model, method), model.backbone.layer4),
                       (create_cam(model, method, "layer3"), model.backbone.layer3)):
        out = cam.pairs(images, lambda logits: [weights, weights])
        theirs = library(layer)
        assert np.abs(out.maps.numpy().reshape(2, 2, 64, 64) - theirs).max() < 1e-4
        assert theirs.max() > 0.99
