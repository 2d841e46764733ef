"""Model harness: build, call, shapes, get_config round trip, save and reload with equal outputs."""

import numpy as np
import pytest

from mmclinic.models import DualEncoder


@pytest.fixture(scope="module")
def model():
    m = DualEncoder(image_size=32, vocab_size=50, max_length=12, image_widths=(4, 8), text_layers=1,
                    text_hidden=16, text_heads=2, text_intermediate=32, embed_dim=8)
    m.build_all()
    return m


def _inputs(n=3):
    rng = np.random.default_rng(0)
    return {"image": rng.random((n, 32, 32, 1)).astype("float32"),
            "token_ids": rng.integers(5, 50, (n, 12)).astype("int32"),
            "padding_mask": np.arange(12)[None, :] < np.array([[12], [6], [3]])[:n]}


def test_shapes_and_normalisation(model):
    out = model(_inputs())
    assert out["image_emb"].shape == (3, 8) and out["text_emb"].shape == (3, 8)
    assert np.allclose(np.linalg.norm(np.asarray(out["image_emb"]), axis=1), 1, atol=1e-5)
    logits = model.match_logits(out["image_emb"], out["text_emb"])
    assert tuple(logits.shape) == (3,)


def test_config_round_trip(model):
    clone = DualEncoder.from_config(model.get_config())
    clone.build_all()
    assert clone.count_params() == model.count_params()


def test_save_and_reload_equal_outputs(model, tmp_path):
    import keras

    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.models.load_model(path)
    a, b = model(_inputs()), again(_inputs())
    for k in a:
        assert np.allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-6)


def test_missing_image_weights_is_an_error_naming_the_path():
    from mmclinic.errors import UsageError

    with pytest.raises(UsageError, match="/no/such/weights.h5"):
        DualEncoder(image_size=32, vocab_size=50, max_length=12, image_weights="/no/such/weights.h5")


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["efficientnetb0", "resnet50", "densenet121"])
def test_applications_towers_build_from_scratch_on_grayscale(tower):
    from mmclinic.models.towers import build_image_tower

    m = build_image_tower(tower, 32, (), None)
    out = m(np.zeros((2, 32, 32, 1), "float32"))
    assert out.shape[0] == 2 and out.shape[1] > 0
