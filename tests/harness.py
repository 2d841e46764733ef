"""The shared model test harness (after keras-hub's ``TestCase.run_backbone_test``).

Every tower the model can be built with goes through :func:`run_model_checks`: build, call,
output shapes and normalisation, ``get_config`` round trip (the clone, given the same weights,
gives the same outputs), and save/reload of the ``.keras`` file with equal outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def model_inputs(image_size: int, max_length: int, vocab_size: int, n: int = 3, token_ids: Any = None,
                 padding_mask: Any = None, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    lengths = np.array([max_length, max(2, max_length // 2), 2, max_length][:n])[:, None]
    return {
        "image": rng.random((n, image_size, image_size, 1)).astype("float32"),
        "token_ids": token_ids if token_ids is not None
        else rng.integers(5, max(6, vocab_size), (n, max_length)).astype("int32"),
        "padding_mask": padding_mask if padding_mask is not None else np.arange(max_length)[None, :] < lengths,
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any], atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=atol, err_msg=k)


def run_model_checks(model: Any, inputs: dict[str, Any], embed_dim: int, tmp_path: Path, atol: float = 1e-5) -> None:
    """Shapes, unit-norm embeddings, match logits, config round trip and save/reload for ``model``
    (a built :class:`mmclinic.models.DualEncoder`)."""
    import keras

    from mmclinic.models import DualEncoder

    n = len(inputs["image"])
    out = model(inputs)
    assert out["image_emb"].shape == (n, embed_dim) and out["text_emb"].shape == (n, embed_dim)
    for k in ("image_emb", "text_emb"):
        norms = np.linalg.norm(np.asarray(out[k]), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-4, err_msg=k)
    logits = model.match_logits(out["image_emb"], out["text_emb"])
    assert tuple(logits.shape) == (n,) and np.all(np.isfinite(np.asarray(logits)))

    # get_config round trip: same architecture; with the same weights, the same outputs
    clone = DualEncoder.from_config(model.get_config())
    clone.build_all()
    assert clone.count_params() == model.count_params()
    clone.set_weights(model.get_weights())
    _assert_same(out, clone(inputs), atol)

    # save and reload
    path = tmp_path / "model.keras"
    model.save(path)
    again = keras.models.load_model(path)
    assert again.get_config() == model.get_config()
    _assert_same(out, again(inputs), atol)
