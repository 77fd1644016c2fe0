"""Base models. Each gives `embed_logits(x)`: the embedding and the logits of one
forward pass. The suite's own models split into `embed(x)` (pooled penultimate layer)
and `head(z)`, `forward(x) == head(embed(x))`; any torchvision classifier
(model.name=torchvision), any timm one (model.name=timm) and any Hugging Face image
classifier (model.name=hf_image) embeds at the input of a named layer, caught by a hook."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from resmem_ray.schema import ModelConfig
from resmem_ray.errors import ResMemError
from resmem_ray.tasks.hf_folder import load_folder


class EmbedHead(nn.Module):
    """A feature extractor followed by a linear head."""

    def __init__(self, features: nn.Module, embedding_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def embed_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        return z, self.head(z)


class HookedClassifier(nn.Module):
    """A whole classifier network whose embedding is the (flattened) input of one of its
    modules, `layer` (a name from named_modules()); logits are the network's output (a
    Hugging Face model's `.logits`). `probe`: one batch of the inputs it will be given."""

    def __init__(self, net: nn.Module, layer: str, probe: torch.Tensor, name: str):
        super().__init__()
        self.net, self.layer = net, layer
        modules = dict(net.named_modules())
        if layer not in modules:
            names = [n for n, _ in net.named_children()] + [n for n in modules if n][-4:]
            raise ResMemError(f"model.embedding_layer={layer}: no such module in {name} "
                              f"(e.g. {', '.join(dict.fromkeys(names))})")
        self._seen: list[torch.Tensor] | None = None  # a list only inside embed_logits: plain forwards keep nothing
        modules[layer].register_forward_pre_hook(self._catch)
        was_training = net.training
        net.eval()
        try:  # one probe: the embedding's size, and whether the network takes these images at all
            with torch.no_grad():
                self.embedding_dim = self.embed_logits(probe)[0].shape[1]
        except Exception as e:  # torch's, or an architecture's own assertion (ViT: its image size)
            raise ResMemError(f"{name} does not run on {'x'.join(map(str, probe.shape[1:]))} images: "
                              f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
        finally:
            net.train(was_training)

    def _catch(self, module: nn.Module, inputs: tuple) -> None:
        if self._seen is not None:
            self._seen.append(inputs[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if isinstance(out, torch.Tensor) else out.logits

    def embed_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._seen = []
        try:
            logits = self(x)
            seen = self._seen
        finally:
            self._seen = None
        if not seen:
            raise ResMemError(f"model.embedding_layer={self.layer}: the forward pass never runs that module")
        return torch.flatten(seen[-1], 1), logits


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(in_channels: int, num_classes: int, width: int = 16) -> EmbedHead:
    """Three conv blocks and global average pooling; embedding dim = 4 * width."""
    features = nn.Sequential(
        *_conv_bn(in_channels, width), *_conv_bn(width, 2 * width, stride=2),
        *_conv_bn(2 * width, 4 * width, stride=2), nn.AdaptiveAvgPool2d(1))
    return EmbedHead(features, 4 * width, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet(depth: int, in_channels: int, num_classes: int, width: int = 1) -> EmbedHead:
    """ResNet-20/32/56 of He et al. (2016) for 32x32 inputs; `width` multiplies 16/32/64."""
    if (depth - 2) % 6:
        raise ResMemError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    widths = [16 * width, 32 * width, 64 * width]
    layers: list[nn.Module] = _conv_bn(in_channels, widths[0])
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for i in range(n):
            layers.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
            cin = cout
    layers.append(nn.AdaptiveAvgPool2d(1))
    return EmbedHead(nn.Sequential(*layers), widths[-1], num_classes)


def torchvision_net(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """A torchvision.models classifier (random init: no weights are downloaded); for images
    of other than 3 channels its first convolution takes `in_channels` instead."""
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ResMemError(f"config key model.arch: unknown torchvision architecture {arch!r} (e.g. resnet18, "
                          "mobilenet_v3_small, efficientnet_b0: torchvision.models.list_models())")
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent), leaf, nn.Conv2d(
            in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.bias is not None, conv.padding_mode))
    return net


def timm_net(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """A timm classifier (random init: no weights are downloaded) for `in_channels`-channel images."""
    try:
        import timm
    except ImportError:
        raise ResMemError("model.name=timm needs the timm package (pip install timm)") from None
    if not timm.is_model(arch):
        raise ResMemError(f"config key model.arch: unknown timm architecture {arch!r} (e.g. resnet10t, "
                          "convnext_atto: timm.list_models())")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def published_transforms(arch: str) -> dict:
    """{resize, crop, mean, std} of the transforms of `arch`'s default published torchvision
    weights (read from torchvision's tables: nothing is downloaded)."""
    import torchvision

    try:
        t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        t = None
    if not all(hasattr(t, a) for a in ("resize_size", "crop_size", "mean", "std")):
        raise ResMemError(f"config key preprocess.preset=weights: {arch} has no published torchvision image "
                          "classification weights: set preprocess.resize, crop, mean and std")
    return {"resize": t.resize_size[0], "crop": t.crop_size[0], "mean": list(t.mean), "std": list(t.std)}


def torchvision_resnet(name: str, in_channels: int, num_classes: int, net: nn.Module | None = None) -> EmbedHead:
    """torchvision resnet18/50, its fc split off as the head; `net`: such a network (in
    torchvision's own layout, weights loaded) to take the layers from instead of a new one."""
    if net is None:
        net = torchvision_net(name, in_channels, num_classes)
    model = EmbedHead(nn.Sequential(*list(net.children())[:-1]), net.fc.in_features, num_classes)
    model.head = net.fc
    return model


def hooked(net: nn.Module, cfg: ModelConfig, probe: torch.Tensor, name: str) -> HookedClassifier:
    """`net` embedding at model.embedding_layer's input (default: its last nn.Linear, the classifier)."""
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    layer = cfg.embedding_layer or (linears[-1] if linears else None)
    if not layer:
        raise ResMemError(f"{name} has no nn.Linear classifier: set model.embedding_layer "
                          "(a module name from named_modules())")
    return HookedClassifier(net, layer, probe, name)


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The network that model.name (and for torchvision, model.arch and model.embedding_layer)
    names, for images of `in_channels` x `image_size` x `image_size` (needed by torchvision's)."""
    if cfg.name in ("torchvision", "timm"):
        assert image_size, "the network's embedding size is probed on an image of the data's size"
        net = (torchvision_net if cfg.name == "torchvision" else timm_net)(cfg.arch, in_channels, num_classes)
        return hooked(net, cfg, torch.zeros(2, in_channels, image_size, image_size), f"model.arch={cfg.arch}")
    if cfg.name == "small_cnn":
        return small_cnn(in_channels, num_classes, cfg.width)
    if cfg.name in ("resnet20", "resnet32", "resnet56"):
        return cifar_resnet(int(cfg.name[6:]), in_channels, num_classes, cfg.width)
    if cfg.name in ("resnet18", "resnet50"):
        return torchvision_resnet(cfg.name, in_channels, num_classes)
    raise ResMemError(f"unknown model model.name={cfg.name!r}")


# --- weights made elsewhere ----------------------------------------------------------

def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict file (names -> tensors), read without unpickling any Python object."""
    import re
    import warnings

    how = "save one with torch.save(model.state_dict(), path)"
    try:
        with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's errors on a file that is no torch file at all vary
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = (f"holds pickled Python objects ({found[1]}), which are never loaded (torch.load weights_only=True)"
                if found else "a TorchScript archive, which is not read" if "TorchScript" in str(e)
                else "not a PyTorch weights file")
        why = (" (a TorchScript module takes no forward hooks, through which the suite reads the embedding at a "
               "module's input)" if "TorchScript" in what else "")
        raise ResMemError(f"model.path={path}: {what}: {how}{why}") from None
    if not isinstance(state, dict):
        raise ResMemError(f"model.path={path}: holds a {type(state).__name__}, not a state dict: {how}")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ResMemError(f"model.path={path}: not a state dict: its entry {bad!r} is not a tensor "
                          f"({type(state[bad]).__name__}; a checkpoint with more in it? {how})")
    return state


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def check_fits(state: dict, net: nn.Module, path: str, what: str, data: str, num_classes: int,
               in_channels: int) -> None:
    """A ResMemError naming what in `state` does not fit `net` (`what` names the network):
    the classes or channels against `data`, else missing / unexpected keys and shapes."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    weights = [k for k, shape in want.items() if k.endswith("weight") and len(shape) >= 2]
    if weights:
        first, last = weights[0], weights[-1]
        if have.get(last, want[last])[:1] != want[last][:1]:
            raise ResMemError(f"model.path={path}: its classifier {last} has {have[last][0]} outputs, "
                              f"{data} has {num_classes} classes")
        if len(want[first]) == 4 and have.get(first, want[first])[1:2] != want[first][1:2]:
            raise ResMemError(f"model.path={path}: its {first} {have[first]} takes {have[first][1]}-channel images, "
                              f"{data} has {in_channels} channel(s) (the model's {first}: {want[first]})")
    missing, unexpected = [k for k in want if k not in have], [k for k in have if k not in want]
    shapes = [f"{k} is {have[k]} in the file, {want[k]} in the model" for k in want if k in have and have[k] != want[k]]
    problems = ([f"missing keys {_few(missing)}"] if missing else []) + \
               ([f"unexpected keys {_few(unexpected)}"] if unexpected else []) + shapes[:3]
    if problems:
        raise ResMemError(f"model.path={path} does not fit {what}: {'; '.join(problems)}")


def hf_image_classifier(path: str, num_classes: int) -> tuple[nn.Module, object, str]:
    """(the network, its image processor or None, its name for messages) of a local Hugging
    Face folder holding an AutoModelForImageClassification with the data's classes."""
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as NAMES

    if not Path(path).is_dir():
        raise ResMemError(f"model.path={path}: model.name=hf_image takes a local Hugging Face model folder "
                          "(save_pretrained)")
    kind = "AutoModelForImageClassification"
    net, config = load_folder(path, AutoModelForImageClassification, NAMES, f"an {kind}", kind)
    archs = config.architectures or []
    if config.num_labels != num_classes:
        raise ResMemError(f"model.path={path}: its classifier has {config.num_labels} labels (num_labels), "
                          f"the data has {num_classes} classes")
    processor = None
    if (Path(path) / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return net, processor, f"model.path={path} ({archs[0] if archs else config.model_type})"
