"""Analysis helpers the notebooks call: embedding projections, nearest neighbours, the modality
gap, reviewer tags, image grids, forest plots of slice figures and failure-case tables.

Everything shown comes from de-identified outputs (pseudonymous keys, scrubbed report text);
images go through the one display conversion (:mod:`mmclinic.display`). Plots are matplotlib
figures, returned to the caller (a notebook shows them inline).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.errors import UsageError

TAGS = ("label_noise", "laterality", "model_error", "image_quality")
TAG_COLUMNS = ("image_id", "tag")


# --------------------------------------------------------------------------- projections


def pca(x: np.ndarray, n: int = 2) -> np.ndarray:
    """Rows of ``x`` (N, D) projected on their first ``n`` principal components (N, n); signs fixed
    so that each component's largest loading is positive (the same input gives the same picture)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"pca takes a non-empty (N, D) array, got shape {x.shape}")
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:n]
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    out = centred @ vt.T
    if out.shape[1] < n:
        out = np.pad(out, ((0, 0), (0, n - out.shape[1])))
    return out


def project(image_emb: np.ndarray, text_emb: np.ndarray, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings projected together (one PCA over both), so that distances in the
    picture compare the two modalities."""
    both = pca(np.concatenate([image_emb, text_emb], 0), n)
    return both[: len(image_emb)], both[len(image_emb):]


def neighbours(query: np.ndarray, pool: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities of the ``k`` rows of ``pool`` nearest to ``query`` (D,),
    most similar first."""
    q = np.asarray(query, np.float64).reshape(-1)
    p = np.asarray(pool, np.float64)
    sims = (p @ q) / np.maximum(np.linalg.norm(p, axis=1) * np.linalg.norm(q), 1e-12)
    order = np.argsort(-sims, kind="stable")[:k]
    return order, sims[order]


@dataclass
class ModalityGap:
    """How far apart the image and text embeddings sit (Liang et al., "Mind the Gap", NeurIPS 2022).

    ``centroid_distance``: distance between the two modalities' mean embeddings (unit vectors);
    ``paired_cosine`` / ``unpaired_cosine``: mean cosine of true pairs and of all other pairs.
    """

    centroid_distance: float
    paired_cosine: float
    unpaired_cosine: float
    gap_vector: np.ndarray

    def as_dict(self) -> dict[str, float]:
        return {"centroid_distance": self.centroid_distance, "paired_cosine": self.paired_cosine,
                "unpaired_cosine": self.unpaired_cosine}


def modality_gap(image_emb: np.ndarray, text_emb: np.ndarray, image_report: Sequence[int] | None = None) -> ModalityGap:
    """The modality gap of image embeddings and text embeddings. ``image_report``: the index of each
    image's report in ``text_emb`` (default: row i pairs with row i)."""
    img = _unit(image_emb)
    txt = _unit(text_emb)
    pair = np.arange(len(img)) if image_report is None else np.asarray(image_report)
    gap = img.mean(0) - txt.mean(0)
    sims = img @ txt.T
    paired = np.zeros_like(sims, dtype=bool)
    paired[np.arange(len(img)), pair] = True
    other = sims[~paired]
    return ModalityGap(float(np.linalg.norm(gap)), float(sims[paired].mean()),
                       float(other.mean()) if other.size else float("nan"), gap)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def scatter(ax: Any, xy: np.ndarray, labels: Sequence[Any], marker: str = "o", title: str | None = None,
            **kwargs: Any) -> None:
    """Points coloured by a categorical ``labels`` column, with a legend."""
    labels = np.asarray([("missing" if v is None or v != v else str(v)) for v in labels])
    kwargs = {"s": 24, "alpha": 0.8} | kwargs
    for value in sorted(set(labels)):
        m = labels == value
        ax.scatter(xy[m, 0], xy[m, 1], marker=marker, label=value, **kwargs)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="best")


# --------------------------------------------------------------------------- tags


def read_tags(source: str | Path | Any) -> Any:
    """A reviewer tag table (``image_id, tag``) from a CSV path or a DataFrame; UsageError naming the
    file when it is missing or lacks the columns. Empty tags are dropped."""
    import pandas as pd

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"--tags {path}: not found")
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise UsageError(f"--tags {path}: not a readable CSV ({type(exc).__name__})") from None
        where = f"--tags {path}"
    else:
        df = pd.DataFrame(source).astype(str)
        where = "tags"
    missing = [c for c in TAG_COLUMNS if c not in df.columns]
    if missing:
        raise UsageError(f"{where}: needs the columns image_id, tag (missing {', '.join(missing)})")
    df = df[list(TAG_COLUMNS)]
    df = df[(df["tag"].str.strip() != "") & (df["image_id"].str.strip() != "")]
    return df.reset_index(drop=True)


def save_tags(tags: Mapping[str, str] | Any, path: str | Path, merge: bool = True) -> Path:
    """Write tags as ``image_id, tag`` CSV (sorted by image id; what ``mmclinic evaluate --tags``
    reads). ``merge``: keep the file's other images (a new tag of an image replaces its old one)."""
    path = Path(path)
    if isinstance(tags, Mapping):
        new = dict(tags)
    else:
        table = read_tags(tags)
        new = dict(zip(table["image_id"], table["tag"]))
    rows: dict[str, str] = {}
    if merge and path.is_file():
        old = read_tags(path)
        rows.update(zip(old["image_id"], old["tag"]))
    rows.update({str(k): str(v) for k, v in new.items() if v})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(TAG_COLUMNS)
        w.writerows(sorted(rows.items()))
    return path


class TagBook:
    """Reviewer tags for failure cases, saved to a CSV as they are given.

    Headless: ``book.tag("img-123", "laterality")``. In JupyterLab: ``book.widget(image_ids)``
    shows one dropdown per case (ipywidgets); every change is saved at once.
    """

    def __init__(self, path: str | Path, choices: Sequence[str] = TAGS) -> None:
        self.path = Path(path)
        self.choices = tuple(choices)
        self.tags: dict[str, str] = {}
        if self.path.is_file():
            old = read_tags(self.path)
            self.tags = dict(zip(old["image_id"], old["tag"]))

    def tag(self, image_id: str, tag: str | None) -> None:
        """Tag one image (``None`` or "" removes its tag) and save."""
        if tag and tag not in self.choices:
            raise ValueError(f"tag must be one of {', '.join(self.choices)}, got {tag!r}")
        if tag:
            self.tags[str(image_id)] = tag
        else:
            self.tags.pop(str(image_id), None)
        self.save()

    def tag_many(self, tags: Mapping[str, str]) -> None:
        for image_id, tag in tags.items():
            self.tag(image_id, tag)

    def save(self) -> Path:
        return save_tags(self.tags, self.path, merge=False)

    def table(self) -> Any:
        import pandas as pd

        return pd.DataFrame(sorted(self.tags.items()), columns=list(TAG_COLUMNS))

    def widget(self, image_ids: Iterable[str]) -> Any:
        """One labelled dropdown per image id (ipywidgets), saving on every change."""
        import ipywidgets as widgets

        rows = []
        for iid in dict.fromkeys(str(i) for i in image_ids):
            dd = widgets.Dropdown(options=[("", "")] + [(c.replace("_", " "), c) for c in self.choices],
                                  value=self.tags.get(iid, ""), description=iid[:16],
                                  layout=widgets.Layout(width="360px"))
            dd.observe(lambda change, iid=iid: self.tag(iid, change["new"]), names="value")
            rows.append(dd)
        return widgets.VBox(rows)


# --------------------------------------------------------------------------- figures


def image_grid(images: Sequence[bytes | np.ndarray], titles: Sequence[str] | None = None, ncols: int = 6,
               side: float = 1.8, window: Any = None, overlays: Sequence[np.ndarray | None] | None = None):
    """A matplotlib figure of images in a grid (display conversion of :mod:`mmclinic.display`);
    ``overlays``: optional heat maps drawn over each image (same shape or resized)."""
    import matplotlib.pyplot as plt

    from mmclinic.display import display_pixels

    n = max(len(images), 1)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows + 0.3 * nrows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= len(images):
            continue
        px = display_pixels(images[k], window)
        ax.imshow(px, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if overlays is not None and overlays[k] is not None:
            ax.imshow(overlays[k], cmap="jet", alpha=0.4, extent=(-0.5, px.shape[1] - 0.5, px.shape[0] - 0.5, -0.5))
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=7)
    fig.tight_layout()
    return fig


def slice_figures(report: Mapping[str, Any], metric: str = "image_to_text_R@5") -> Any:
    """One row per computed slice of a REPORT.json: ``slice, dimension, images, value, lo, hi``."""
    import pandas as pd

    rows = []
    for key, block in report.get("slices", {}).items():
        fig = block.get(metric) if isinstance(block, Mapping) else None
        if not isinstance(fig, Mapping) or fig.get("value") is None:
            continue
        lo, hi = fig.get("ci95") or (np.nan, np.nan)
        rows.append({"slice": key, "dimension": key.split("=", 1)[0], "images": block.get("images"),
                     "value": fig["value"], "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["slice", "dimension", "images", "value", "lo", "hi"])


def forest_plot(table: Any, title: str = "", reference: float | None = None, ax: Any = None):
    """A forest plot: one row per line of ``table`` (``slice``/``label``, ``value``, ``lo``, ``hi``),
    the point and its interval; ``reference`` draws a vertical line (the overall figure, chance)."""
    import matplotlib.pyplot as plt

    labels = list(table["slice"] if "slice" in table else table["label"])
    v, lo, hi = (np.asarray(table[c], float) for c in ("value", "lo", "hi"))
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(labels) + 1.2))
    else:
        fig = ax.figure
    y = np.arange(len(labels))[::-1]
    has = np.isfinite(lo) & np.isfinite(hi)
    ax.hlines(y[has], lo[has], hi[has], color="tab:blue")
    ax.plot(v, y, "o", color="tab:blue")
    if reference is not None:
        ax.axvline(reference, ls=":", c="grey")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- failure cases


def failure_cases_with_slices(cases: Any, manifest: Any, columns: Sequence[str] = (
        "split", "modality", "view", "laterality", "sex", "age_band", "source_format")) -> Any:
    """``failure_cases.parquet`` joined with the manifest's slice columns (by ``image_id``)."""
    keep = ["image_id"] + [c for c in columns if c in manifest.columns and c not in cases.columns]
    return cases.merge(manifest[keep], on="image_id", how="left")


def filter_cases(cases: Any, case: str | None = None, corruption: str | None = None,
                 **slices: Any) -> Any:
    """Failure cases of one ``case`` kind (``retrieval``/``mismatch``), ``corruption`` kind and
    slice values (``view="PA"``)."""
    m = np.ones(len(cases), bool)
    if case is not None:
        m &= (cases["case"] == case).to_numpy()
    if corruption is not None:
        m &= (cases["corruption"] == corruption).to_numpy()
    for column, value in slices.items():
        if value is not None:
            m &= (cases[column].astype(str) == str(value)).to_numpy()
    return cases[m].reset_index(drop=True)
