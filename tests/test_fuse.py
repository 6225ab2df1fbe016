"""dlkernels.fuse / dlkernels.unfuse: fused models compute what the torch model computes (eval and
training, gradients, running statistics), keep their class, state_dict keys, hooks and call-site
behaviour (a reused activation), change nothing globally, and refuse bad input clearly."""

from __future__ import annotations

import copy
import functools
import io
import sys
import zlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_like_torch
from torch import nn

import dlkernels
from dlkernels import nn as dnn
from dlkernels._fuse import FusedActivation, RewrittenForward

fuse_impl = sys.modules["dlkernels._fuse"]


def seeded(name: str) -> None:
    torch.manual_seed(zlib.crc32(name.encode()))


def randn(name: str, *shape: int, requires_grad: bool = False) -> torch.Tensor:
    seeded(name)
    return torch.randn(*shape, requires_grad=requires_grad)


def randomize_bn(model: nn.Module, name: str) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (fresh ones are 1/0)."""
    seeded(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def resnet18(leaky: bool = False) -> nn.Module:
    """torchvision's resnet18(num_classes=10), a fresh copy of one built per session (building is slow)."""
    pytest.importorskip("torchvision")
    return copy.deepcopy(_resnet18(leaky))


@functools.cache
def _resnet18(leaky: bool) -> nn.Module:
    import torchvision

    seeded("resnet18")
    model = torchvision.models.resnet18(num_classes=10)
    if leaky:  # one shared LeakyReLU per block: applying it twice or skipping it changes the result
        model.relu = nn.LeakyReLU(0.1)
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                block.relu = nn.LeakyReLU(0.1)
    return randomize_bn(model, "resnet18 bn")


def small_net() -> nn.Module:
    """A stem chain in an nn.Sequential (its ReLU module is replaced), two torchvision BasicBlocks (self.relu
    reused: their forwards are rewritten), BatchNorms left unfused (1:1) and a Dropout."""
    resnet = pytest.importorskip("torchvision.models.resnet")
    seeded("small net")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          resnet.BasicBlock(8, 8), resnet.BasicBlock(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Dropout(0.1), nn.Linear(8, 4))
    return randomize_bn(model, "small net bn")


def types(model: nn.Module) -> dict[str, type]:
    return {path: type(m) for path, m in model.named_modules()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def assert_train_step_matches(ref: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """One training forward/backward: outputs, input gradient, every parameter gradient and the running
    statistics after it, by the project's rule (conftest.assert_close_like_torch: within 2x torch's own
    error against float64; a float32 gradient summed over a batch is not equal to torch's to 1.3e-6)."""
    exact = copy.deepcopy(ref).double()
    runs = []
    for model, dtype in ((fused, torch.float32), (ref, torch.float32), (exact, torch.float64)):
        model.train()
        xi = x.detach().to(dtype, copy=True).requires_grad_()
        y = model(xi)
        y.backward(randn("upstream grad", *y.shape).to(dtype))
        runs.append((y, xi.grad, dict(model.named_parameters()), dict(model.named_buffers())))
    (yf, gf, pf, bf), (yr, gr, pr, br), (ye, ge, pe, be) = runs
    assert list(pf) == list(pr) and list(bf) == list(br)
    assert_close_like_torch(yf, yr, ye)
    assert_close_like_torch(gf, gr, ge)
    for name, p in pr.items():
        assert_close_like_torch(pf[name].grad, p.grad, pe[name].grad)
    for name, b in br.items():
        if b.is_floating_point():
            assert_close_like_torch(bf[name], b, be[name])
        else:
            assert torch.equal(bf[name], b), name


# ---------------------------------------------------------------------------------------------- torchvision


def test_resnet18_eval_types_and_class() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = resnet18().eval()
    fused = dlkernels.fuse(model)
    assert type(fused) is torchvision.models.ResNet
    assert fused is not model
    x = randn("resnet eval", 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    before = types(model)
    bns = [p for p, t in before.items() if t is nn.BatchNorm2d]
    assert len(bns) == 20
    after = dict(fused.named_modules())
    for path in bns:
        assert type(after[path]) in (dnn.BatchNorm2d, dnn.BatchNormAct2d), path
    fused_paths = sorted(p for p in bns if type(after[p]) is dnn.BatchNormAct2d)
    assert fused_paths == ["bn1"] + [f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2)]
    assert isinstance(fused.relu, FusedActivation)  # the stem's relu: only called after bn1
    for layer in (fused.layer1, fused.layer2, fused.layer3, fused.layer4):
        for block in layer:  # self.relu is called after bn1 (fused) and after the residual add (kept)
            assert type(block.relu) is nn.ReLU
            assert isinstance(block.__dict__["forward"], RewrittenForward)
            assert type(block) is torchvision.models.resnet.BasicBlock


def test_resnet18_training_step_and_state_dict() -> None:
    model = resnet18()
    fused = dlkernels.fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    # 64x64, not 32x32: layer4 would normalize 2 values per channel, where float32 itself is ill-conditioned
    # (torch's own error against float64 is ~1e-3 there)
    assert_train_step_matches(model, fused, randn("resnet train", 2, 3, 64, 64))
    # checkpoints load both ways, strictly
    ref = resnet18()
    ref.load_state_dict(fused.state_dict())
    assert_same_state(ref, fused)
    fused2 = dlkernels.fuse(resnet18())
    fused2.load_state_dict(model.state_dict())
    assert_same_state(fused2, model)


def test_basic_block_call_sites() -> None:
    """BasicBlock calls one self.relu after bn1 and after the residual add: a skipped ReLU leaves negative
    outputs, a doubled LeakyReLU scales them by 0.01 once more."""
    for leaky in (False, True):
        model = resnet18(leaky).eval()
        fused = dlkernels.fuse(model)
        x = randn("negative heavy", 2, 64, 8, 8) - 2.0
        with torch.no_grad():
            for i in range(2):
                torch.testing.assert_close(fused.layer1[i](x), model.layer1[i](x))
            torch.testing.assert_close(fused(x[:, :3] * 4), model(x[:, :3] * 4))
        if leaky:
            block = fused.layer1[0]
            assert type(block.relu) is dnn.LeakyReLU  # also called after the add: swapped 1:1
            assert block.bn1.activation == "leaky_relu" and block.bn1.negative_slope == pytest.approx(0.1)
            # training through the rewritten forward (one block: the whole net's step is tested above)
            assert_train_step_matches(model.layer1[0], block, x)


# ---------------------------------------------------------------------------------------------- small models


def vgg(p: float) -> nn.Module:
    seeded("vgg")
    layers: list[nn.Module] = []
    c = 3
    for out in (8, 16):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True), nn.Dropout(p),
                   nn.MaxPool2d(2)]
        c = out
    head = [nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 10)]
    return randomize_bn(nn.Sequential(*layers, *head), "vgg bn")


def test_vgg_sequential(capsys: pytest.CaptureFixture[str]) -> None:
    model = vgg(0.5).eval()
    fused = dlkernels.fuse(model, verbose=True)
    out = capsys.readouterr().out
    assert "fused with 2 and 3" in out  # the Dropout after the chain goes into the BatchNormAct
    assert type(fused[1]) is dnn.BatchNormAct2d and type(fused[2]) is FusedActivation
    assert type(fused[3]) is FusedActivation and fused[1].dropout == 0.5 and type(fused[12]) is dnn.BatchNormAct1d
    assert fused[12].dropout == 0.5 and type(fused[14]) is FusedActivation
    x = randn("vgg x", 4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    model0 = vgg(0.0)
    assert_train_step_matches(model0, dlkernels.fuse(model0), x)


class SharedDropout(nn.Module):
    """One Dropout after two chains (not absorbed: a BatchNormAct would drop only its own call's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 8, 3), nn.Dropout(0.4)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.bn1(self.conv(x))))
        return self.drop(F.leaky_relu(self.bn2(y), 0.1))


@pytest.mark.parametrize("make", [lambda: vgg(0.3), SharedDropout], ids=["absorbed", "shared"])
def test_dropout_after_chain_same_mask(make: Callable[[], nn.Module]) -> None:
    """A Dropout absorbed into the BatchNormAct draws the mask dlkernels' own Dropout draws (same seed, same
    stream): the same training outputs and gradients as the fused model whose Dropouts stay modules (a hook
    keeps them out of the chains). A shared Dropout stays a module."""
    model = make().train()
    kept = copy.deepcopy(model)
    for m in kept.modules():
        if type(m) is nn.Dropout:
            m.register_forward_hook(lambda *args: None)
    fused, kept = dlkernels.fuse(model), dlkernels.fuse(kept)
    absorbed = [m for m in fused.modules() if isinstance(m, dnn.BatchNormAct2d) and m.dropout > 0]
    assert (len(absorbed) > 0) == (make is not SharedDropout)
    assert all(type(m) is dnn.Dropout for m in kept.modules() if isinstance(m, nn.Dropout))
    x = randn("dropout chain x", 3, 3, 16, 16).requires_grad_()
    outs = []
    for m in (fused, kept):
        torch.manual_seed(7)
        y = m(x)
        (gx,) = torch.autograd.grad(y, x, randn("dropout chain g", *y.shape))
        outs.append((y, gx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert list(dlkernels.unfuse(fused).state_dict()) == list(model.state_dict())
    assert not any(isinstance(m, FusedActivation) for m in dlkernels.unfuse(fused).modules())


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.bn3(self.conv3(x)).relu()


def test_functional_activations() -> None:
    seeded("functional")
    model = randomize_bn(Functional(), "functional bn").eval()
    fused = dlkernels.fuse(model)
    assert type(fused) is Functional and isinstance(fused.__dict__["forward"], RewrittenForward)
    assert [type(m) for m in (fused.bn1, fused.bn2, fused.bn3)] == [dnn.BatchNormAct2d] * 3
    assert (fused.bn1.activation, fused.bn2.activation, fused.bn3.activation) == ("relu", "leaky_relu", "relu")
    assert fused.bn2.negative_slope == pytest.approx(0.2)
    assert list(fused.state_dict()) == list(model.state_dict())
    x = randn("functional x", 2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    assert_train_step_matches(model, fused, x)


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.PReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.PReLU(8)
        with torch.no_grad():
            self.act2.weight.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


def test_prelu_single_and_per_channel() -> None:
    seeded("prelu")
    model = randomize_bn(PReLUNet(), "prelu bn")
    fused = dlkernels.fuse(model)
    assert type(fused.bn1) is dnn.BatchNormAct2d and fused.bn1.activation == "prelu"
    assert type(fused.act1) is FusedActivation and type(fused.act2) is FusedActivation
    assert list(fused.state_dict()) == list(model.state_dict())
    assert len(list(fused.parameters())) == len(list(model.parameters()))
    assert len({id(p) for p in fused.parameters()}) == len(list(fused.parameters()))
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    assert "prelu_weight" not in "".join(fused.state_dict())
    twin = copy.deepcopy(fused)  # the fused BatchNorm reads the copy's PReLU weight, not the original's
    assert twin.bn2._prelu_owner is twin.act2 and twin.bn2._prelu_weight() is twin.act2.weight
    x = randn("prelu x", 2, 3, 12, 12)
    assert_train_step_matches(model, fused, x)
    assert fused.act2.weight.grad is not None and fused.act2.weight.grad.abs().sum() > 0
    # an optimizer step on the fused model moves the PReLU weight the fused module reads
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    before = fused.act2.weight.detach().clone()
    opt.step()
    assert not torch.equal(fused.bn2._prelu_weight(), before)
    fused.eval()
    model.eval()
    model.load_state_dict(fused.state_dict())
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        assert_close_like_torch(fused(x), model(x), exact(x.double()))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x).mean((2, 3))
        if y.sum() > 0:  # data-dependent: fx cannot trace this
            y = y * 2
        return self.head(y)


def test_untraceable_falls_back(capsys: pytest.CaptureFixture[str]) -> None:
    seeded("untraceable")
    model = randomize_bn(Untraceable(), "untraceable bn")
    fused = dlkernels.fuse(model, verbose=True)
    assert "did not trace with torch.fx" in capsys.readouterr().out
    assert type(fused.features[1]) is dnn.BatchNormAct2d and type(fused.features[2]) is FusedActivation
    x = randn("untraceable x", 2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), model.eval()(x))
    assert_train_step_matches(model, fused, x)


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))  # a chain
        return self.act(y - 1.0)  # not a chain: the same module again


def test_reused_activation_two_sites() -> None:
    seeded("reused")
    model = randomize_bn(Reused(), "reused bn")
    fused = dlkernels.fuse(model)
    assert type(fused.bn) is dnn.BatchNormAct2d and type(fused.act) is dnn.LeakyReLU
    x = randn("reused x", 2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), model.eval()(x))
    assert_train_step_matches(model, fused, x)


class SharedInSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.LeakyReLU(0.1)  # registered twice: here and as seq.2
        self.seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.seq(x) - 1.0)


def test_reused_activation_inside_sequential() -> None:
    seeded("shared")
    model = randomize_bn(SharedInSequential(), "shared bn")
    fused = dlkernels.fuse(model)
    assert type(fused.seq[1]) is dnn.BatchNormAct2d and fused.seq[2] is fused.act
    assert isinstance(fused.seq.__dict__["forward"], RewrittenForward)  # this Sequential's forward only
    x = randn("shared x", 2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), model.eval()(x))
    assert_train_step_matches(model, fused, x)


class OptionalArg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(3), nn.ReLU()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.bn(x)
        if mask is None:  # fx traces `mask` as given: the path without it is traced separately
            return y * 2.0
        return self.relu(y) * mask


def test_optional_argument_paths() -> None:
    model = randomize_bn(OptionalArg(), "optional bn").eval()
    fused = dlkernels.fuse(model)
    assert type(fused.bn) is dnn.BatchNorm2d  # not fused: without mask nothing follows it but a mul
    x, mask = randn("optional x", 2, 3, 4, 4), randn("optional mask", 4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
        torch.testing.assert_close(fused(x, mask), model(x, mask))


# ---------------------------------------------------------------------------------------------- hooks, globals


def test_hooks_carry_over_and_keep_bn_out_of_chains(capsys: pytest.CaptureFixture[str]) -> None:
    model = small_net().eval()
    seen: dict[str, list[torch.Tensor]] = {"conv": [], "bn": []}
    model[0].register_forward_hook(lambda m, i, o: seen["conv"].append(o))
    model[3].bn1.register_forward_hook(lambda m, i, o: seen["bn"].append(o))
    fused = dlkernels.fuse(model, verbose=True)
    assert "3.bn1: BatchNorm2d -> dlkernels.nn.BatchNorm2d (not fused with an activation: it has hooks" \
        in capsys.readouterr().out
    assert type(fused[3].bn1) is dnn.BatchNorm2d and type(fused[4].bn1) is dnn.BatchNormAct2d
    assert "forward" not in fused[3].__dict__ and "forward" in fused[4].__dict__
    x = randn("hooks x", 2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    assert len(seen["conv"]) == 2 and len(seen["bn"]) == 2  # once for each model
    torch.testing.assert_close(seen["conv"][0], seen["conv"][1])
    torch.testing.assert_close(seen["bn"][0], seen["bn"][1])  # the hook sees the BatchNorm's output, not ReLU's


def test_nothing_global() -> None:
    classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Sequential)
    before_classes = [dict(vars(c)) for c in classes]
    other = vgg(0.0).eval()
    x = randn("global x", 2, 3, 16, 16)
    with torch.no_grad():
        before = other(x)
    other_types = types(other)
    fused_a = dlkernels.fuse(small_net())
    fused_b = dlkernels.fuse(Reused())
    assert [dict(vars(c)) for c in classes] == before_classes  # no class patched
    assert type(nn.BatchNorm2d(3)) is nn.BatchNorm2d
    assert types(other) == other_types
    with torch.no_grad():
        torch.testing.assert_close(other(x), before, rtol=0, atol=0)
    # two models fused differently in one process
    assert type(fused_a[3].relu) is nn.ReLU and type(fused_b.act) is dnn.LeakyReLU


def test_inplace_and_copy() -> None:
    model = small_net()
    before_types, before_state = types(model), state(model)
    fused = dlkernels.fuse(model)
    assert fused is not model and types(model) == before_types
    assert all("forward" not in m.__dict__ for m in model.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before_state[k], rtol=0, atol=0)
    model.eval()
    assert dlkernels.fuse(model, inplace=True) is model
    assert type(model[1]) is dnn.BatchNormAct2d and isinstance(model[2], FusedActivation)
    assert not model.training and not any(m.training for m in model.modules())  # training flags carry over


def test_deepcopy_and_pickle() -> None:
    model = small_net().eval()
    fused = dlkernels.fuse(model)
    x, negative = randn("pickle x", 2, 3, 8, 8), randn("pickle block x", 2, 8, 6, 6) - 2.0
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fused), torch.load(buf, weights_only=False)):
        block = other[3]
        assert block.forward.owner is block and block.bn1 is not fused[3].bn1
        with torch.no_grad():
            torch.testing.assert_close(other(x), model(x))
            torch.testing.assert_close(block(negative), model[3](negative))  # the relu after the add still runs


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_bad_input() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dlkernels.fuse(3)
    with pytest.raises(TypeError, match="TorchScript"):
        dlkernels.fuse(torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
    with pytest.raises(TypeError, match="before torch.compile"):
        dlkernels.fuse(torch.compile(nn.Sequential(nn.BatchNorm1d(2), nn.ReLU())))  # not compiled until called
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dlkernels.unfuse("model")
    fused = dlkernels.fuse(Reused())
    with pytest.raises(ValueError, match="already fused"):
        dlkernels.fuse(fused)
    with pytest.raises(ValueError, match="already fused"):
        dlkernels.fuse(dlkernels.fuse(nn.Sequential(nn.Linear(2, 2), nn.Dropout())))  # 1:1 swaps only


# Apply order: placeholders, chains, 1:1 swaps, forwards; each fails at its last call (small_net has 1, 3, 3, 2).
@pytest.mark.parametrize("step,calls", [("_install_placeholder", 1), ("_adopt", 3), ("_swap_class", 3),
                                        ("_install_forward", 2)])
def test_inplace_failure_leaves_model_as_it_was(monkeypatch: pytest.MonkeyPatch, step: str, calls: int) -> None:
    model = small_net().eval()
    before_types, before_state = types(model), state(model)
    x = randn("failure x", 2, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    real, seen = getattr(fuse_impl, step), []

    def fails_at_last(*args: object) -> object:
        seen.append(1)
        if len(seen) == calls:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(fuse_impl, step, fails_at_last)
    with pytest.raises(RuntimeError, match="boom"):
        dlkernels.fuse(model, inplace=True)
    assert len(seen) == calls
    assert types(model) == before_types
    assert all("forward" not in m.__dict__ and "_dlk_fused" not in m.__dict__ for m in model.modules())
    assert all("_adopted_from" not in m.__dict__ and "prelu_weight" not in m._parameters for m in model.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before_state[k], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    monkeypatch.undo()
    assert type(dlkernels.fuse(model)[1]) is dnn.BatchNormAct2d  # and it still fuses afterwards


class MyBN(nn.BatchNorm2d):
    pass


class RuntimeSlope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), MyBN(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("slope", torch.tensor(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.bn(self.seq(x)), self.slope)  # a tensor slope: read at run time


def test_verbose_says_what_was_left(capsys: pytest.CaptureFixture[str]) -> None:
    model = RuntimeSlope().eval()
    fused = dlkernels.fuse(model, verbose=True)
    out = capsys.readouterr().out
    assert "dlkernels.fuse: RuntimeSlope traced with torch.fx" in out
    assert "left     seq.1: a subclass of torch.nn.BatchNorm2d" in out
    assert "left     seq.2: ReLU has no dlkernels module of its own" in out
    assert ("replaced bn: BatchNorm2d -> dlkernels.nn.BatchNorm2d (not fused with an activation: negative_slope "
            "is computed at run time") in out
    assert "modules without a dlkernels twin: Conv2d x1, Sequential x1" in out
    assert type(fused.seq[1]) is MyBN and type(fused.bn) is dnn.BatchNorm2d
    x = randn("runtime slope x", 2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    # options dlkernels does not take, or a chain it cannot fuse
    odd = nn.Sequential(nn.BatchNorm1d(3, dtype=torch.complex64), nn.BatchNorm2d(3), nn.PReLU(2))
    fused = dlkernels.fuse(odd, verbose=True)
    out = capsys.readouterr().out
    assert "left     0: unsupported: weight is torch.complex64" in out
    assert "replaced 1: BatchNorm2d -> dlkernels.nn.BatchNorm2d (not fused with an activation: 2 has 2 slopes " \
        "for 3 channels)" in out
    assert type(fused[0]) is nn.BatchNorm1d and type(fused[2]) is dnn.PReLU


# ---------------------------------------------------------------------------------------------- unfuse, compile


@pytest.mark.parametrize("make", [small_net, PReLUNet, Functional, Untraceable, SharedInSequential],
                         ids=lambda f: f.__name__)
def test_unfuse_round_trip(make) -> None:
    model = randomize_bn(make(), "unfuse bn").eval()
    x = randn("unfuse x", 2, 3, 12, 12)
    fused = dlkernels.fuse(model)
    back = dlkernels.unfuse(fused)
    assert types(back) == types(model)
    assert all(not type(m).__module__.startswith("dlkernels") for m in back.modules())
    assert all("forward" not in m.__dict__ and "_dlk_fused" not in m.__dict__ for m in back.modules())
    assert_same_state(back, model)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    assert dlkernels.unfuse(fused, inplace=True) is fused and types(fused) == types(model)
    assert type(dlkernels.fuse(back)) is type(model)  # fusable again


def test_compile_fullgraph_prelu_and_functional() -> None:
    """The fused PReLU reads its weight through a module attribute; the functional model's forward is an
    instance attribute: both trace whole (aot_eager: no code generation, fast)."""
    x = randn("compile small x", 2, 3, 12, 12)
    for make in (PReLUNet, Functional):
        seeded(make.__name__)
        model = randomize_bn(make(), "compile small bn").eval()
        torch._dynamo.reset()
        compiled = torch.compile(dlkernels.fuse(model), fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))


def test_compile_fullgraph() -> None:
    model = resnet18().eval()
    fused = dlkernels.fuse(model)
    x = randn("compile x", 2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
