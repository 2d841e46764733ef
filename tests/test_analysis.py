"""Analysis helpers of the notebooks: projections, neighbours, modality gap, tags, grids, forest plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmclinic.data.images import to_png_bytes
from mmclinic.errors import UsageError
from mmclinic.eval import analysis


def test_pca_finds_the_spread_direction_and_project_shares_axes():
    rng = np.random.default_rng(0)
    x = np.outer(rng.normal(size=50), [3.0, 0, 0, 0]) + rng.normal(scale=0.01, size=(50, 4))
    xy = analysis.pca(x)
    assert xy.shape == (50, 2) and np.corrcoef(xy[:, 0], x[:, 0])[0, 1] > 0.99
    a, b = analysis.project(x[:30], x[30:] + 10)
    assert a.shape == (30, 2) and b.shape == (20, 2) and abs(a[:, 0].mean() - b[:, 0].mean()) > 5


def test_neighbours_and_modality_gap():
    pool = np.eye(4)
    idx, sims = analysis.neighbours(np.array([0.9, 0.1, 0, 0]), pool, k=2)
    assert idx.tolist() == [0, 1] and sims[0] > sims[1]
    img = np.eye(3) + np.array([0, 0, 5.0])
    txt = np.eye(3)
    gap = analysis.modality_gap(img, txt)
    assert gap.centroid_distance > 0.3 and gap.paired_cosine > gap.unpaired_cosine
    assert analysis.modality_gap(txt, txt).centroid_distance == pytest.approx(0)
    assert set(gap.as_dict()) == {"centroid_distance", "paired_cosine", "unpaired_cosine"}


def test_tags_round_trip_merge_and_validation(tmp_path):
    path = tmp_path / "tags.csv"
    book = analysis.TagBook(path)
    book.tag("img-b", "laterality")
    book.tag_many({"img-a": "label_noise", "img-c": "model_error"})
    book.tag("img-c", None)
    assert path.read_text() == "image_id,tag\nimg-a,label_noise\nimg-b,laterality\n"
    assert analysis.TagBook(path).tags == {"img-a": "label_noise", "img-b": "laterality"}
    with pytest.raises(ValueError, match="tag must be one of"):
        book.tag("img-a", "typo")
    analysis.save_tags({"img-b": "image_quality", "img-d": "model_error"}, path)  # merge: new wins
    assert analysis.read_tags(path).values.tolist() == [["img-a", "label_noise"], ["img-b", "image_quality"],
                                                        ["img-d", "model_error"]]
    (tmp_path / "bad.csv").write_text("image,label\nx,y\n")
    with pytest.raises(UsageError, match="image_id, tag"):
        analysis.read_tags(tmp_path / "bad.csv")
    with pytest.raises(UsageError, match="not found"):
        analysis.read_tags(tmp_path / "none.csv")


def test_tag_widget_saves_on_change(tmp_path):
    pytest.importorskip("ipywidgets")
    book = analysis.TagBook(tmp_path / "t.csv")
    box = book.widget(["img-a", "img-b"])
    box.children[1].value = "laterality"
    assert analysis.read_tags(tmp_path / "t.csv").values.tolist() == [["img-b", "laterality"]]


def test_with_tags_adds_a_tag_slice(tmp_path):
    from mmclinic.artifacts import SplitData
    from mmclinic.eval.evaluate import SLICE_COLUMNS, with_tags

    meta = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_key": ["p", "q", "r"]})
    data = SplitData(png=[b""] * 3, texts=["x"] * 3, meta=meta)
    analysis.save_tags({"a": "laterality", "c": "laterality", "zz": "model_error"}, tmp_path / "t.csv")
    tagged, summary = with_tags(data, tmp_path / "t.csv")
    assert "tag" in SLICE_COLUMNS and "tag" not in meta.columns
    assert tagged.meta["tag"].tolist()[0] == "laterality" and pd.isna(tagged.meta["tag"][1])
    assert summary == {"source": "t.csv", "tags": 3, "joined_images": 2, "not_in_split": 1,
                       "counts": {"laterality": 2}}


def test_image_grid_slice_figures_and_forest_plot():
    import matplotlib

    matplotlib.use("Agg")
    pngs = [to_png_bytes(np.full((16, 16), v, np.float32)) for v in (0.2, 0.8, 0.5)]
    fig = analysis.image_grid(pngs, ["a", "b", "c"], ncols=2, overlays=[None, np.ones((4, 4)), None])
    assert len(fig.axes) == 4
    shown = fig.axes[0].images[0].get_array()
    assert abs(float(shown.mean()) - 0.2) < 0.01  # 16-bit stored pixels, scaled by bit depth
    report = {"slices": {"view=PA": {"images": 20, "image_to_text_R@5": {"value": 0.5, "ci95": [0.3, 0.7]}},
                         "view=LL": {"images": 2, "not_computed": "fewer than 10 images"},
                         "sex=F": {"images": 12, "image_to_text_R@5": {"value": 0.4, "ci95": None}}}}
    table = analysis.slice_figures(report)
    assert table["slice"].tolist() == ["view=PA", "sex=F"] and np.isnan(table["lo"][1])
    fig = analysis.forest_plot(table, "R@5", reference=0.45)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["view=PA", "sex=F"]


def test_failure_cases_join_and_filter():
    cases = pd.DataFrame({"case": ["retrieval", "mismatch", "mismatch"], "image_id": ["a", "b", "a"],
                          "corruption": [None, "laterality", "negation"]})
    manifest = pd.DataFrame({"image_id": ["a", "b"], "view": ["PA", "AP"], "split": ["test", "test"]})
    joined = analysis.failure_cases_with_slices(cases, manifest)
    assert joined["view"].tolist() == ["PA", "AP", "PA"]
    assert len(analysis.filter_cases(joined, case="mismatch", view="PA")) == 1
    assert analysis.filter_cases(joined, corruption="laterality")["image_id"].tolist() == ["b"]
