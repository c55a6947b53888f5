"""Embedding cache: reuse by content, atomic shards, clear errors for bad images."""

import numpy as np
import pytest
from PIL import Image

from prodclass.features.backbones import create_backbone
from prodclass.features.embeddings import EmbeddingCache, embed_images
from prodclass.preprocess import ImageError


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite0")


def _images(tmp_path, n=5):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_cache_reuses_by_content_and_survives_reload(tmp_path, backbone):
    paths = _images(tmp_path)
    cache = EmbeddingCache.for_backbone(tmp_path / "cache", backbone)
    e1, s1 = embed_images(paths, backbone, cache, batch_size=2, progress=False)
    assert s1["computed"] == 5 and s1["cached"] == 0 and e1.shape == (5, 1280)
    # a new cache object (a new process) reads the shards; a copied file hits by content
    (tmp_path / "copy.jpg").write_bytes((tmp_path / "img0.jpg").read_bytes())
    cache2 = EmbeddingCache.for_backbone(tmp_path / "cache", backbone)
    e2, s2 = embed_images(paths + [str(tmp_path / "copy.jpg")], backbone, cache2, progress=False)
    assert s2["computed"] == 0 and s2["cached"] == 6
    np.testing.assert_allclose(e2[:5], e1, atol=1e-6)
    np.testing.assert_array_equal(e2[5], e2[0])
    assert not list(cache.dir.glob("*.tmp"))


def test_key_depends_on_preprocessing(tmp_path, backbone):
    from dataclasses import replace

    a = EmbeddingCache(tmp_path, "efficientnet_lite0", "w", backbone.preprocessing.key())
    b = EmbeddingCache(tmp_path, "efficientnet_lite0", "w", replace(backbone.preprocessing, input_size=192).key())
    assert a.dir != b.dir


def test_partial_progress_is_kept_when_a_bad_image_stops_the_pass(tmp_path, backbone):
    paths = _images(tmp_path, 4)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(Image.open(paths[0]).tobytes()[:100])  # raw bytes, not a JPEG
    cache = EmbeddingCache.for_backbone(tmp_path / "cache", backbone)
    with pytest.raises(ImageError, match=r"bad\.jpg: not a readable image"):
        embed_images(paths + [str(bad)], backbone, cache, batch_size=2, flush_every=2, progress=False)
    assert len(EmbeddingCache.for_backbone(tmp_path / "cache", backbone)) == 4  # flushed before the failure


def test_embedding_leaves_the_backbone_as_it_was(tmp_path):
    bb = create_backbone("efficientnet_lite0", pretrained=False).train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    embed_images(_images(tmp_path, 2), bb, None, progress=False)
    w = bb.model.conv_stem.weight
    assert bb.training and w.requires_grad and w.is_contiguous() and not w.is_inference()
    assert all(v.dtype.is_floating_point is False or v.is_contiguous() for v in bb.state_dict().values())
    after = bb.state_dict()
    assert all(after[k].equal(v) for k, v in before.items())
