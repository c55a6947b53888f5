"""Contract tests over every registered backbone (in the manner of timm's model tests)."""

import pytest
import torch
from PIL import Image

from prodclass.features.backbones import (
    WeightsError,
    create_backbone,
    get_spec,
    list_backbones,
    load_weights,
    preprocessing_for,
)
from prodclass.preprocess import Preprocessing

# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = set(range(281, 286))


def _chelsea() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())  # a real photo of a cat (scikit-image sample data)


def _top5(backbone, img) -> set[int]:
    x = torch.from_numpy(backbone.preprocessing(img))[None]
    with torch.no_grad():
        return set(backbone.imagenet_logits(x).topk(5).indices[0].tolist())


def test_registry_lists_efficientnet_lite():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(list_backbones())
    with pytest.raises(KeyError, match="registered"):
        get_spec("resnet9000")


# The preprocessing every run, cached embedding and published figure uses: timm's input size, mean,
# std and interpolation, resized straight to the input size (the whole square photo is kept).
PINNED = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_facts_come_from_timm_and_preprocessing_is_unchanged(name):
    import timm
    from timm.data import resolve_model_data_config

    spec = get_spec(name)
    size = PINNED[name]
    assert spec.preprocessing == Preprocessing(input_size=size, resize_size=size, mean=(0.5, 0.5, 0.5),
                                               std=(0.5, 0.5, 0.5), interpolation="bicubic")
    assert spec.preprocessing.key() == f"exif-{size}-{size}-bicubic-(0.5, 0.5, 0.5)-(0.5, 0.5, 0.5)"  # cache keys
    m = timm.create_model(spec.timm_name, pretrained=False)
    cfg = resolve_model_data_config(m)
    assert cfg["input_size"][-1] == size and cfg["crop_pct"] < 1  # timm would crop; prodclass keeps the photo
    assert (tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"]) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
    b = create_backbone(name, pretrained=False)
    assert spec.embed_dim == b.embed_dim == m.num_features == 1280 and b.preprocessing == spec.preprocessing
    small = preprocessing_for(name, 96)
    assert (small.input_size, small.resize_size) == (96, 96) and preprocessing_for(name) == spec.preprocessing
    assert create_backbone(name, pretrained=False, preprocessing=small).preprocessing == small


@pytest.mark.parametrize("name", list_backbones())
def test_pretrained_weights_are_real(name):
    """The packaged ImageNet weights recognise a cat; the same network untrained does not."""
    img = _chelsea()
    assert _top5(create_backbone(name), img) & CAT_CLASSES
    torch.manual_seed(0)
    assert not _top5(create_backbone(name, pretrained=False), img) & CAT_CLASSES


@pytest.mark.parametrize("name", list_backbones())
def test_embedding_contract(name):
    b = create_backbone(name, pretrained=False)
    s = b.preprocessing.input_size
    x = torch.from_numpy(b.preprocessing(Image.new("RGB", (300, 200), (10, 200, 30))))
    assert x.shape == (3, s, s) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0  # RGB scaled to [-1, 1]
    with torch.no_grad():
        e = b(torch.stack([x, x]))
    assert e.shape == (2, b.embed_dim) and torch.isfinite(e).all()
    assert len(b.blocks) >= 3 and sum(p.numel() for blk in b.blocks for p in blk.parameters()) == sum(
        p.numel() for n, p in b.model.named_parameters() if not n.startswith("classifier"))


def test_user_weights_file_by_name_and_shape_errors(tmp_path):
    src = create_backbone("efficientnet_lite0")
    torch.save({"state_dict": src.model.state_dict()}, tmp_path / "mine.pth")  # timm names, wrapped
    mine = create_backbone("efficientnet_lite0", weights=tmp_path / "mine.pth")
    for a, b in zip(src.model.state_dict().values(), mine.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the packaged file (EfficientNet-PyTorch names) with a 10-class classifier: paired by order,
    # refused at the tensor that does not fit
    packaged = torch.load(get_spec("efficientnet_lite0").weights(), weights_only=True)
    packaged["_fc.weight"] = torch.zeros(10, 1280)
    torch.save(packaged, tmp_path / "ten.pth")
    with pytest.raises(WeightsError, match=r"ten\.pth: tensor _fc\.weight \(10, 1280\) does not fit classifier"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "ten.pth")
    torch.save(create_backbone("efficientnet_lite2", pretrained=False).model.state_dict(), tmp_path / "l2.pth")
    with pytest.raises(WeightsError, match=r"l2\.pth: has \d+ tensors, the architecture has 296"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "l2.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(src.model, tmp_path / "junk.pth")
