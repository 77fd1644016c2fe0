import pytest
import torch

from resmem_ray.config import ModelConfig
from resmem_ray.tasks.vision_models import build_model


@pytest.mark.parametrize("name,width,channels,size,dim", [
    ("small_cnn", 8, 1, 8, 32), ("resnet20", 1, 3, 32, 64), ("resnet32", 2, 3, 32, 128),
    ("resnet56", 1, 1, 28, 64), ("resnet18", 1, 3, 64, 512), ("resnet50", 1, 3, 64, 2048)])
def test_embed_then_head_equals_forward(name, width, channels, size, dim):
    model = build_model(ModelConfig(name=name, width=width), channels, num_classes=7).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        z = model.embed(x)
        assert z.shape == (2, dim) and model.embedding_dim == dim
        torch.testing.assert_close(model.head(z), model(x))
        assert model(x).shape == (2, 7)


def test_cifar_resnet_depths_have_expected_blocks():
    blocks = lambda m: sum(type(x).__name__ == "BasicBlock" for x in m.modules())  # noqa: E731
    assert [blocks(build_model(ModelConfig(name=f"resnet{d}"), 3, 10)) for d in (20, 32, 56)] == [9, 15, 27]
