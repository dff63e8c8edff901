"""eval with brightness matching encodes only the test images a shots' range changes, and gets
exactly the features a full re-encode gives."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")


def test_only_images_outside_the_range_are_encoded_again(shared_data) -> None:
    from dataclasses import replace

    from o2n_edge.data import load_dataset
    from o2n_edge.data.photometric import brightness, brightness_gains
    from o2n_edge.encoders import build_encoder
    from o2n_edge.evaluation import _encode, _FixedFeatures
    from o2n_edge.profiles import get_profile

    ds = load_dataset(shared_data / "hazelnut_toy", "mvtec", "hazelnut")
    ds = replace(ds, test=ds.test[:6])
    enc = build_encoder(replace(get_profile("lite").encoder, image_size=64))
    source = _FixedFeatures(enc, ds, draft=False, progress=False)
    levels = sorted(brightness(im) for im in source.images)
    level_range = (levels[1], levels[-2])  # the darkest and the brightest image fall outside
    gains = brightness_gains(np.stack(source.images), level_range)
    assert 0 < int((gains != 1.0).sum()) < len(gains)
    got = source.test(level_range)
    full = _encode(enc, source.images, None, level_range)
    for k in full:
        np.testing.assert_allclose(got[k], full[k], rtol=1e-5, atol=1e-5)
        same = gains == 1.0
        np.testing.assert_array_equal(got[k][same], source.test()[k][same])
