"""A vision model trained elsewhere (model.source=checkpoint): a torchvision ResNet-18
state dict through the whole pipeline, any torchvision classifier embedded at a named
layer's input, and every bad checkpoint refused in one line before the run changes."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from torch import nn

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.schema import ModelConfig
from resmem_ray.store.artifacts import read_split
from resmem_ray.store.files import sha256
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.image import ImageClassification, load_model
from resmem_ray.tasks.image_data import load_splits, normalize
from resmem_ray.tasks.vision_models import build_model

CONFIG = load_config("jobs/configs/digits.yaml")
GIVEN = ["--config", "jobs/configs/digits.yaml", "model.source=checkpoint", "neighbour_transformer.enabled=false"]


def digits_resnet18(num_classes=10, in_channels=1) -> nn.Module:
    """What a torchvision user has: resnet18 with a first convolution for gray images."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net


@pytest.fixture(scope="module")
def trained_resnet(tmp_path_factory):
    """A ResNet-18 trained here with plain torch on digits' train split, its state dict saved."""
    splits, _ = load_splits(CONFIG.data, CONFIG.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared machine, more threads are slower
    try:
        torch.manual_seed(0)
        net = digits_resnet18()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        x, y = normalize(splits["train"].images, "digits"), torch.as_tensor(splits["train"].labels)
        for _ in range(60):  # a short run: the test is that the suite reproduces it, not its accuracy
            i = torch.randint(0, len(y), (32,))
            loss = nn.functional.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("given") / "resnet18.pt"
    torch.save(net.state_dict(), path)
    return path, net.eval(), splits


def test_torchvision_resnet18_checkpoint_end_to_end(ray_session, trained_resnet, tmp_path, capsys):
    path, net, splits = trained_resnet
    run_dir = tmp_path / "run"
    args = [*GIVEN, "model.name=resnet18", f"model.path={path}", "embed.num_actors=1", "embed.cpus_per_actor=1",
            "index.num_shards=1", f"run_dir={run_dir}"]
    assert main(["run", *args]) == 0
    run = RunDir(run_dir)
    test = splits["test"]
    with torch.no_grad():
        x = normalize(test.images, "digits")
        logits = net(x)
        fc_input = torch.flatten(net.avgpool(nn.Sequential(*list(net.children())[:-2])(x)), 1)
    preds = pq.read_table(run.report / "predictions.parquet").to_pydict()
    assert preds["id"] == test.ids.tolist()
    assert preds["base"] == logits.argmax(1).tolist()  # the given network's own predictions
    rows = read_split(run, "test", "test")
    np.testing.assert_allclose(rows["embedding"], fc_input.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
    report = (run.report / "report.md").read_text()
    assert f"resnet18 from {path}" in report and "| ResMem |" in report and "| 1-NN |" in report
    entry = run.manifest()["stages"]["train"]
    assert entry["sources"] == {str(path): sha256(path)}
    assert json.loads((run.model / "meta.json").read_text())["embedding_dim"] == 512

    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    assert "| train | done |" in capsys.readouterr().out
    torch.save(digits_resnet18().state_dict(), path)  # other weights in the same file
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for stage in ("train", "embed", "index", "evaluate"):  # the stages that read it, transitively
        assert f"| {stage} | stale | {path} changed since the stage read it |" in out, stage


def test_suite_models_embed_as_before(digits_run):
    """The suite's own trained model: embed_logits(x) gives what the embed stage wrote."""
    run = RunDir(digits_run)
    model, meta = load_model(run)
    splits, _ = load_splits(CONFIG.data, CONFIG.seed)
    rows = read_split(run, "val", "test")
    with torch.no_grad():
        x = normalize(splits["val"].images, meta["dataset"])
        z, logits = model.embed_logits(x)
        assert torch.equal(z, model.embed(x)) and torch.equal(logits, model.head(model.embed(x)))
    np.testing.assert_allclose(rows["embedding"], z.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["logits"], logits.numpy(), rtol=1e-5, atol=1e-6)


def test_torchvision_arch_embeds_at_the_named_layer_input(tmp_path):
    x = torch.randn(3, 1, 8, 8)
    for layer in (None, "classifier.0"):
        model = build_model(ModelConfig(name="torchvision", arch="mobilenet_v3_small", embedding_layer=layer),
                            1, 10, 8).eval()
        net = model.net
        assert net.features[0][0].in_channels == 1  # the first convolution takes the data's channels
        with torch.no_grad():
            z, logits = model.embed_logits(x)
            pooled = torch.flatten(net.avgpool(net.features(x)), 1)
            want = pooled if layer else net.classifier[:3](pooled)  # the input of classifier.3, the last Linear
            torch.testing.assert_close(z, want, rtol=0, atol=0)
            torch.testing.assert_close(logits, net(x), rtol=0, atol=0)
        assert model.embedding_dim == want.shape[1] == (576 if layer else 1024)

    # load_given / save_model write what load_model's build reads back, same outputs
    cfg = load_config("jobs/configs/digits.yaml", ("model.source=checkpoint", "model.name=torchvision",
                                                  "model.arch=mobilenet_v3_small", f"model.path={tmp_path / 'm.pt'}"))
    torch.manual_seed(1)
    theirs = torchvision.models.mobilenet_v3_small(num_classes=10)
    theirs.features[0][0] = nn.Conv2d(1, 16, 3, 2, 1, bias=False)
    torch.save(theirs.state_dict(), cfg.model.path)
    task = ImageClassification()
    splits, info = task.load_splits(cfg)
    meta = task.save_given(cfg, None, tmp_path, task.load_given(cfg, splits, info), splits, info)
    again = build_model(ModelConfig(**meta["model"]), meta["in_channels"], meta["num_classes"], meta["image_size"])
    again.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(again.eval().embed_logits(x)[1], theirs.eval()(x), rtol=0, atol=0)
    assert meta["embedding_dim"] == 1024 and meta["model"]["arch"] == "mobilenet_v3_small"


def test_a_suite_resnet18_state_dict_is_read_in_its_own_layout(tmp_path):
    """model.name=resnet18 reads a run's RUN/model/model.pt as well as torchvision's layout."""
    cfg = load_config("jobs/configs/digits.yaml", ("model.source=checkpoint", "model.name=resnet18",
                                                  f"model.path={tmp_path / 'model.pt'}"))
    task = ImageClassification()
    splits, info = task.load_splits(cfg)
    ours = build_model(cfg.model, 1, 10).state_dict()
    torch.save(ours, cfg.model.path)
    given = task.load_given(cfg, splits, info)["model"]
    assert given.keys() == ours.keys() and all(torch.equal(given[k], ours[k]) for k in ours)


def listing(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_checkpoints_exit_2_with_one_line_and_change_nothing(run_copy, tmp_path, capsys):
    f = tmp_path / "weights.pt"
    small_cnn = build_model(ModelConfig(name="small_cnn", width=4), 1, 10).state_dict()
    net = digits_resnet18()
    cases = [  # (file content or None, overrides, the line's text)
        (None, ["model.name=resnet18", f"model.path={tmp_path}/nothing.pt"],
         f"model.path={tmp_path}/nothing.pt: no such file or folder"),
        (b"not weights", ["model.name=resnet18"], f"model.path={f}: not a PyTorch weights file: save one with "
                                                  "torch.save(model.state_dict(), path)"),
        (net, ["model.name=resnet18"], f"model.path={f}: holds pickled Python objects (torchvision.models.resnet."
                                       "ResNet), which are never loaded (torch.load weights_only=True): save one with "
                                       "torch.save(model.state_dict(), path)"),
        ({"state_dict": net.state_dict(), "epoch": 3}, ["model.name=resnet18"],
         f"model.path={f}: not a state dict: its entry 'state_dict' is not a tensor (OrderedDict; a "
         "checkpoint with more in it?"),
        (torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), ["model.name=resnet18"],
         f"model.path={f} does not fit torchvision's resnet18: missing keys conv1.weight, bn1.weight, bn1.bias (+119 "
         "more); unexpected keys features.0.0.weight, features.0.1.weight, features.0.1.bias (+"),
        (small_cnn, ["model.name=resnet18"], f"model.path={f} does not fit model.name=resnet18: missing keys "
                                             "features.4.0.conv1.weight, "),
        (digits_resnet18(num_classes=1000).state_dict(), ["model.name=resnet18"],
         f"model.path={f}: its classifier fc.weight has 1000 outputs, data.name=digits has 10 classes"),
        (torchvision.models.resnet18(num_classes=10).state_dict(), ["model.name=resnet18"],
         f"model.path={f}: its conv1.weight (64, 3, 7, 7) takes 3-channel images, data.name=digits has 1 "
         "channel(s) (the model's conv1.weight: (64, 1, 7, 7))"),
        ({**small_cnn, "features.3.weight": torch.zeros(8, 4, 5, 5)}, ["model.name=small_cnn", "model.width=4"],
         f"model.path={f} does not fit model.name=small_cnn (width 4): features.3.weight is (8, 4, 5, 5) in the "
         "file, (8, 4, 3, 3) in the model"),
        (torch.jit.script(nn.Linear(2, 2)), ["model.name=resnet18"],
         f"model.path={f}: a TorchScript archive, which is not read: save one with torch.save(model.state_dict(), "
         "path)"),
        (net.state_dict(), ["model.name=torchvision", "model.arch=resnet18", "model.embedding_layer=layer9"],
         "model.embedding_layer=layer9: no such module in model.arch=resnet18 (e.g. conv1, bn1, relu, maxpool, "
         "layer1"),
        (net.state_dict(), ["model.name=torchvision", "model.arch=squeezenet1_1"],
         "model.arch=squeezenet1_1 has no nn.Linear classifier: set model.embedding_layer"),
        (net.state_dict(), ["model.name=torchvision", "model.arch=squeezenet1_1", "model.embedding_layer=classifier.1"],
         "model.arch=squeezenet1_1 does not run on 1x8x8 images: Given input size: (128x1x1)"),
        (net.state_dict(), ["model.name=torchvision", "model.arch=resnet19"],
         "config key model.arch: unknown torchvision architecture 'resnet19'"),
        (net.state_dict(), ["model.name=torchvision", "model.arch=resnet18", "model.source=trained"],
         "config key model.name=torchvision takes a model trained elsewhere: set model.source=checkpoint"),
        (net.state_dict(), ["model.name=resnet18", "model.embedding_layer=layer4"],
         "config key model.embedding_layer applies to model.name=torchvision only"),
    ]
    run = RunDir(run_copy)
    before = listing(run.root)
    for content, overrides, line in cases:
        if isinstance(content, bytes):
            f.write_bytes(content)
        elif isinstance(content, torch.jit.ScriptModule):
            torch.jit.save(content, f)
        elif content is not None:
            torch.save(content, f)
        capsys.readouterr()
        assert main(["run", *GIVEN, f"model.path={f}", *overrides, f"run_dir={run_copy}"]) == 2, line
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"resmem: error: {line}"), (err, line)
        assert listing(run.root) == before, line


@pytest.mark.parametrize("source", ["checkpoint", "precomputed"])
def test_a_sweep_of_a_given_model_is_refused_before_ray_starts(source, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["sweep", *GIVEN, f"model.source={source}", f"model.path={tmp_path}", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"resmem: error: config key model.source={source}: `resmem sweep` trains the base model per width "
                   "and rung, and a given model is not trained: run `resmem run` (or `resmem tune`) on it instead"]
    assert not run_dir.exists()


def tiny_hf_image_classifier(folder, num_labels=10, processor=True):
    """A randomly initialised Hugging Face ResNet for gray images, saved as a user saves one."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    net = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                                    depths=[1, 1], layer_type="basic", num_labels=num_labels)).eval()
    net.save_pretrained(folder)
    if processor:  # its own preprocessing: 8x8 digits resized to 16x16, its own mean and std
        ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.25]).save_pretrained(folder)
    return net


def test_hugging_face_image_classifier_end_to_end(ray_session, tmp_path):
    from transformers import AutoImageProcessor

    folder = tmp_path / "hf"
    net = tiny_hf_image_classifier(folder)
    run_dir = tmp_path / "run"
    assert main(["run", *GIVEN, "model.name=hf_image", f"model.path={folder}", "embed.num_actors=1",
                 "embed.cpus_per_actor=1", "index.num_shards=1", f"run_dir={run_dir}"]) == 0
    run = RunDir(run_dir)
    splits, _ = load_splits(CONFIG.data, CONFIG.seed)
    test = splits["test"]
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        x = processor(images=list(test.images), return_tensors="pt", input_data_format="channels_first").pixel_values
        assert x.shape[1:] == (1, 16, 16)
        out = net(x)
        pooled = torch.flatten(net.resnet(x).pooler_output, 1)  # the input of its head, classifier.1
    preds = pq.read_table(run.report / "predictions.parquet").to_pydict()
    assert preds["base"] == out.logits.argmax(1).tolist()  # the folder's model, run directly
    rows = read_split(run, "test", "test")
    np.testing.assert_allclose(rows["embedding"], pooled.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["logits"], out.logits.numpy(), rtol=1e-4, atol=1e-5)
    assert json.loads((run.model / "meta.json").read_text())["embedding_dim"] == 16
    assert (run.model / "preprocessor_config.json").is_file()


def test_a_hugging_face_image_classifier_of_other_classes_is_one_line(run_copy, tmp_path, capsys):
    folder = tmp_path / "hf"
    tiny_hf_image_classifier(folder, num_labels=7, processor=False)
    before = listing(RunDir(run_copy).root)
    assert main(["run", *GIVEN, "model.name=hf_image", f"model.path={folder}", f"run_dir={run_copy}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"resmem: error: model.path={folder}: its classifier has 7 labels (num_labels), the data has 10 "
                   "classes"]
    assert listing(RunDir(run_copy).root) == before


def test_a_torchscript_archive_is_refused_with_why_and_what_to_do(tmp_path):
    from resmem_ray.errors import ResMemError
    from resmem_ray.tasks.vision_models import read_state_dict

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(build_model(ModelConfig(name="small_cnn", width=4), 1, 10)), path)
    with pytest.raises(ResMemError) as e:
        read_state_dict(str(path))
    assert str(e.value) == (f"model.path={path}: a TorchScript archive, which is not read: save one with "
                            "torch.save(model.state_dict(), path) (a TorchScript module takes no forward hooks, "
                            "through which the suite reads the embedding at a module's input)")


def test_preset_weights_is_the_published_weights_transforms():
    from resmem_ray.tasks.image_data import prepare
    from resmem_ray.tasks.vision_models import published_transforms

    images = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)
    pre = published_transforms("resnet18")
    assert (pre["resize"], pre["crop"]) == (256, 224)
    want = torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()(images)
    torch.testing.assert_close(prepare(images.numpy(), **pre), want, rtol=0, atol=1e-5)


def test_preprocessing_from_the_config_changes_the_embeddings_not_the_model(digits_run, tmp_path, capsys):
    """The digits run's own small_cnn, given: a changed mean and std make embed stale, not train."""
    from resmem_ray.tasks.image_data import prepare

    run_dir = tmp_path / "run"
    args = [*GIVEN, "model.name=small_cnn", f"model.path={digits_run}/model/model.pt", "embed.num_actors=1",
            "embed.cpus_per_actor=1", f"run_dir={run_dir}"]
    changed = ["preprocess.mean=[0.5]", "preprocess.std=[0.25]"]
    assert main(["train", *args]) == 0 and main(["embed", *args, *changed]) == 0
    capsys.readouterr()
    assert main(["status", str(run_dir), *changed]) == 0  # train ran with the dataset's: still current
    out = capsys.readouterr().out
    assert "| train | done |" in out and "| embed | done |" in out
    assert main(["status", str(run_dir), "preprocess.mean=[]", "preprocess.std=[]"]) == 0  # back to the dataset's
    out = capsys.readouterr().out
    assert "| train | done |" in out and "| embed | stale | config changed: preprocess.mean, preprocess.std |" in out
    run = RunDir(run_dir)
    model, _ = load_model(run)
    test = load_splits(CONFIG.data, CONFIG.seed)[0]["test"]
    with torch.no_grad():
        want = model.embed(prepare(test.images, [0.5], [0.25]))
        before = model.embed(normalize(test.images, "digits"))
    got = read_split(run, "test", "test")["embedding"]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, before.numpy(), atol=1e-3)

    for overrides, line in [  # one line each, nothing written
        (["preprocess.preset=weights", "model.name=resnet18"],
         "config key preprocess.mean: 3 values, data.name=digits has 1 channel(s) (the preset's; set preprocess.mean)"),
        (["preprocess.preset=weights"], "config key preprocess.preset=weights applies to torchvision, resnet18, "
                                        "resnet50 (torchvision's published weights), not model.name=small_cnn"),
        (["preprocess.mean=[0.1, 0.2]"], "config key preprocess.mean: 2 values, data.name=digits has 1 channel(s)"),
        (["preprocess.preset=weights", "model.source=trained"], "config key preprocess.preset applies to a given "
                                                                "model (model.source=checkpoint)"),
    ]:
        before_files = listing(run.root)
        assert main(["train", *args, *overrides]) == 2, line
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"resmem: error: {line}"), (err, line)
        assert listing(run.root) == before_files


def test_a_timm_state_dict_is_a_given_model(ray_session, tmp_path, capsys):
    """model.name=timm, model.arch: the file a timm user saves, written to the run as the
    suite's own; its embedding is the input of its classifier (pre-logits features)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1).eval()
    path = tmp_path / "timm.pt"
    torch.save(net.state_dict(), path)
    args = [*GIVEN, "model.name=timm", "model.arch=test_resnet", f"model.path={path}", f"run_dir={tmp_path / 'run'}"]
    assert main(["train", *args]) == 0
    model, meta = load_model(RunDir(tmp_path / "run"))
    x = normalize(load_splits(CONFIG.data, CONFIG.seed)[0]["test"].images[:16], "digits")
    with torch.no_grad():
        z, logits = model.embed_logits(x)
        torch.testing.assert_close(z, net.forward_head(net.forward_features(x), pre_logits=True), rtol=0, atol=0)
        torch.testing.assert_close(logits, net(x), rtol=0, atol=0)
    assert meta["embedding_dim"] == net.num_features
    capsys.readouterr()
    assert main(["train", *args, "model.arch=test_resnet9"]) == 2
    torch.save(timm.create_model("test_resnet", num_classes=7, in_chans=1).state_dict(), path)
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "resmem: error: config key model.arch: unknown timm architecture 'test_resnet9' (e.g. resnet10t, "
        "convnext_atto: timm.list_models())",
        f"resmem: error: model.path={path}: its classifier fc.weight has 7 outputs, data.name=digits has 10 classes"]
