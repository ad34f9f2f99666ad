"""Every registered model builds, runs forward and backward, and has the parameter counts of the papers."""

import pytest
import torch

from reslab import ReslabError, create_model, list_models
from reslab.models import get_spec

ALL_MODELS = list_models()


def _input_for(name: str, batch: int = 2, in_chans: int = 3) -> torch.Tensor:
    # ImageNet models at 64x64 (2x2 before pooling) keep the sweep fast on a 2-core CPU.
    size = 32 if get_spec(name).family == "cifar" else 64
    return torch.randn(batch, in_chans, size, size)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_every_model(name):
    model = create_model(name, num_classes=7)
    x = _input_for(name)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        # plain1202 is the exception that makes the paper's point: backward through 1,200 BN-ReLU-conv layers
        # without shortcuts multiplies the gradient past float32's range (plain110's stem gradient is already
        # ~3e6 at this seed, resnet1202's ~85). Only its last stage and head keep finite gradients.
        if name != "plain1202" or pname.startswith(("layer3.", "fc.")):
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    if name == "plain1202":
        assert not torch.isfinite(model.conv1.weight.grad).all()  # README: "it overflows float32"
    assert model.config["num_classes"] == 7 and model.name == name


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "preact_resnet164", "plain20"])
def test_grayscale_input(name):
    model = create_model(name, in_chans=1, num_classes=10).eval()
    assert model(_input_for(name, in_chans=1)).shape == (2, 10)


# torchvision's published counts (its model docs) for the ImageNet models.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet152": 60_192_808}
# He et al. 2015, Table 6 (CIFAR-10, option A), to the precision the paper states; He et al. 2016 for
# pre-activation 164. (The paper's 10.2M for ResNet-1001 counts weights without BN's affine parameters.)
# Zagoruyko and Komodakis 2016, Tables 1 and 4, for the Wide ResNets.
PAPER_PARAMS_M = {
    "wrn16_4": (2.7, 1),
    "wrn16_8": (11.0, 1),
    "wrn28_10": (36.5, 1),
    "wrn40_4": (8.9, 1),
    "resnet20": (0.27, 2),
    "resnet32": (0.46, 2),
    "resnet44": (0.66, 2),
    "resnet56": (0.85, 2),
    "resnet110": (1.7, 1),
    "resnet1202": (19.4, 1),
    "preact_resnet164": (1.7, 1),
}


def _count(name: str, **kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, **kw).parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_count_torchvision(name):
    assert _count(name) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_param_count_paper(name):
    millions, digits = PAPER_PARAMS_M[name]
    assert round(_count(name) / 1e6, digits) == millions


def test_resnet1001_without_bn_matches_paper():
    with torch.device("meta"):
        model = create_model("preact_resnet1001")
    weights = sum(p.numel() for n, p in model.named_parameters() if "bn" not in n)
    assert round(weights / 1e6, 1) == 10.2


def test_depth_follows_the_papers():
    depths = {
        "resnet20": 20,
        "resnet1202": 1202,
        "preact_resnet164": 164,
        "preact_resnet1001": 1001,
        "resnet18": 18,
        "resnet50": 50,
        "resnet200": 200,
        "plain56": 56,
    }
    for name, depth in depths.items():
        with torch.device("meta"):
            assert create_model(name).depth == depth
    # Wide ResNets are named by the paper's 6n+4: WRN-28-10 has n = 4 blocks per stage.
    assert get_spec("wrn28_10").depth == 28 and get_spec("wrn28_10").kwargs["layers"] == (4, 4, 4)


def test_wide_resnet_is_pre_activation_with_dropout_between_its_convolutions():
    model = create_model("wrn16_4", dropout=0.3, in_chans=1)
    block = model.layer2[0]
    assert model.config["version"] == "v2" and model.stage_channels == [64, 128, 256]
    assert isinstance(block.dropout, torch.nn.Dropout) and block.dropout.p == 0.3
    assert isinstance(model.layer1[0].downsample[0], torch.nn.Conv2d)  # 16 -> 64 channels: a projection
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))  # no dropout in inference
    model.train()
    calls = []
    block.conv2.register_forward_pre_hook(lambda m, args: calls.append(args[0]))
    torch.manual_seed(0)
    model(x)
    dropped = calls[0] == 0
    # The input of the second convolution is ReLU(BN(.)) dropped at rate 0.3: about 30% more zeros than
    # the ReLU alone gives, and the kept values scaled by 1 / 0.7.
    assert 0.55 < dropped.float().mean() < 0.8
    with pytest.raises(ReslabError, match="pre-activation basic blocks"):
        create_model("resnet50", dropout=0.3)


def test_plain_twin_has_no_shortcuts():
    with torch.device("meta"):
        plain, res = create_model("plain_resnet50"), create_model("resnet50")
    assert all(b.downsample is None for s in plain.stages() for b in s)
    # The same layers otherwise: the only parameter difference is the projection shortcuts.
    proj = sum(p.numel() for n, p in res.named_parameters() if "downsample" in n)
    assert _count("plain_resnet50") == _count("resnet50") - proj
    # Option A adds no parameters, so a CIFAR ResNet and its plain twin are the same size.
    assert _count("plain56") == _count("resnet56")


def test_unknown_name_lists_close_names():
    with pytest.raises(ReslabError, match=r"unknown model 'resnet5'.*resnet50"):
        create_model("resnet5")


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ReslabError, match=r"unknown model option.*num_clases"):
        create_model("resnet18", num_clases=10)
    with pytest.raises(ReslabError, match="BasicBlock supports only groups=1"):
        create_model("resnet18", groups=32)
    with pytest.raises(ReslabError, match="plain network"):
        create_model("plain20", drop_path_rate=0.1)


def test_config_rebuilds_the_same_model():
    from reslab import ResNet

    model = create_model("resnext50_32x4d", num_classes=5, drop_path_rate=0.1)
    clone = ResNet(**model.config)
    clone.load_state_dict(model.state_dict())  # same keys and shapes
    assert clone.config == model.config


def test_cifar_option_b_adds_projections():
    a, b = create_model("resnet56"), create_model("resnet56", shortcut="B")
    assert all(isinstance(m, torch.nn.Sequential) for m in (b.layer2[0].downsample, b.layer3[0].downsample))
    # Two 1x1 projections with their BN: 16*32 + 2*32 and 32*64 + 2*64 parameters.
    assert _count("resnet56", shortcut="B") - _count("resnet56") == 16 * 32 + 64 + 32 * 64 + 128
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == b(x).shape == (2, 10)
