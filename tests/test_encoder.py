"""The VGG encoder keeps torchvision's parameter layout, so ImageNet weights load (file or weights API)."""
from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

from captioner.config import EncoderConfig, preset
from captioner.encoder import VGGEncoder
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.usefixtures("one_thread")


TV = {"vgg11": tvm.vgg11, "vgg13": tvm.vgg13, "vgg16": tvm.vgg16, "vgg19": tvm.vgg19,
      "vgg11_bn": tvm.vgg11_bn, "vgg16_bn": tvm.vgg16_bn}


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", list(TV))
def test_layout_matches_torchvision(arch):
    # built on the meta device: full-size VGGs, no memory or init time
    with torch.device("meta"):
        ours = VGGEncoder(preset(arch).encoder)
        theirs = TV[arch](weights=None)
    want = {k: s for k, s in shapes(theirs).items() if not k.startswith("classifier.6.")}
    assert shapes(ours) == want  # same names, same shapes, nothing extra; only the 1000-way layer is not built
    assert list(ours.state_dict()) == list(want)  # and in the same order


def test_vgg16_feature_is_fc7():
    with torch.device("meta"):
        enc = VGGEncoder(preset("vgg16").encoder)
        v = enc(torch.empty(2, 3, 224, 224))
    assert enc.feature_dim == 4096 and v.shape == (2, 4096)
    # the head ends with fc7 -> ReLU -> Dropout: v is torchvision's classifier[:5] output (dropout off in eval)
    assert [type(m).__name__ for m in enc.classifier] == ["Linear", "ReLU", "Dropout"] * 2


def test_compact_config_is_small_and_global_pooled():
    cfg = preset("compact").encoder
    enc = VGGEncoder(cfg).eval()
    assert cfg.pool_size == 1 and enc.feature_dim == cfg.fc_dims[-1]
    assert sum(p.numel() for p in enc.parameters()) < 5_000_000
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 128, 128)).shape == (2, cfg.fc_dims[-1])


@pytest.fixture(scope="module")
def vgg11_reference(tmp_path_factory):
    """torchvision's vgg11 (random init), its state dict saved as a .pth, and its fc7 output on a fixed input."""
    torch.manual_seed(0)
    tv = tvm.vgg11(weights=None).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # small: adaptive pool makes 7x7
    with torch.no_grad():
        ref = tv.classifier[:5](torch.flatten(tv.avgpool(tv.features(x)), 1))  # fc7 after ReLU
    state = tv.state_dict()
    path = tmp_path_factory.mktemp("weights") / "vgg11.pth"
    torch.save(state, path)
    return path, state, x, ref


def empty_vgg11() -> VGGEncoder:
    # skip the 130M-parameter random init: every tensor is about to be overwritten by the load
    with torch.device("meta"):
        enc = VGGEncoder(preset("vgg11").encoder)
    return enc.to_empty(device="cpu")


def test_load_pth_gives_torchvision_features(vgg11_reference):
    path, state, x, ref = vgg11_reference
    enc = empty_vgg11()
    enc.load_imagenet(str(path))
    for k, t in enc.state_dict().items():
        assert torch.equal(t, state[k]), k
    with torch.no_grad():
        v = enc.eval()(x)
    assert v.shape == (2, 4096)
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-6)


def test_imagenet_goes_through_torchvision_weights_api(vgg11_reference, monkeypatch):
    _, state, x, ref = vgg11_reference
    calls = []

    class FakeWeights:
        @staticmethod
        def get_state_dict(progress: bool = True, **kwargs):
            calls.append("get_state_dict")
            return state

    class FakeEnum:
        DEFAULT = FakeWeights

    def get_model_weights(name):
        calls.append(name)
        return FakeEnum

    monkeypatch.setattr(tvm, "get_model_weights", get_model_weights)
    enc = empty_vgg11()
    enc.load_imagenet("imagenet")
    assert calls == ["vgg11", "get_state_dict"]
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(x), ref, rtol=0, atol=1e-6)


def test_imagenet_needs_a_torchvision_arch():
    enc = VGGEncoder(tiny_model_config().encoder)
    with pytest.raises(ValueError, match="no torchvision ImageNet weights"):
        enc.load_imagenet("imagenet")


def test_pth_with_a_state_dict_key_is_accepted(tmp_path):
    src = VGGEncoder(tiny_model_config().encoder)
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    enc = VGGEncoder(tiny_model_config().encoder)
    enc.load_imagenet(str(tmp_path / "w.pth"))
    assert all(torch.equal(t, src.state_dict()[k]) for k, t in enc.state_dict().items())


def test_pth_with_wrong_shapes(tmp_path):
    enc = VGGEncoder(tiny_model_config().encoder)
    state = dict(enc.state_dict())
    state["features.0.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"shape mismatch for \['features.0.weight'\]"):
        enc.load_imagenet(str(tmp_path / "w.pth"))


def test_pth_of_another_arch(tmp_path):
    # e.g. vgg11 weights for a vgg16 encoder: conv indices shift, tensors are missing
    small = VGGEncoder(EncoderConfig(arch="a", layers=[8, "M"], pool_size=1, fc_dims=[16]))
    torch.save(small.state_dict(), tmp_path / "w.pth")
    enc = VGGEncoder(EncoderConfig(arch="b", layers=[8, 8, "M"], pool_size=1, fc_dims=[16]))
    with pytest.raises(ValueError, match="lack 2 tensors"):
        enc.load_imagenet(str(tmp_path / "w.pth"))


@pytest.mark.parametrize("obj", [torch.zeros(3), [1, 2], {"features.0.weight": "not a tensor"}])
def test_pth_that_is_not_a_state_dict(tmp_path, obj):
    torch.save(obj, tmp_path / "w.pth")
    enc = VGGEncoder(tiny_model_config().encoder)
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        enc.load_imagenet(str(tmp_path / "w.pth"))


def test_missing_pth():
    enc = VGGEncoder(tiny_model_config().encoder)
    with pytest.raises(FileNotFoundError, match="no such file"):
        enc.load_imagenet("/nonexistent/vgg16.pth")


def test_pth_is_loaded_without_unpickling_code(tmp_path):
    # weights_only=True: a pickle that would run code is refused, not executed
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"features.0.weight": Evil()}, tmp_path / "evil.pth")
    enc = VGGEncoder(tiny_model_config().encoder)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        enc.load_imagenet(str(tmp_path / "evil.pth"))
