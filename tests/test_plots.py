"""Every heatmap and overlay has a colour bar with units; the overlays' title never
covers the first row; VGRefine's accuracy table and plot."""
import csv

import matplotlib

matplotlib.use("Agg", force=True)
import matplotlib.figure  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sweep_fake import fake_sweep  # noqa: E402
from vgkernels.sweep.report import write_report  # noqa: E402
from vgkernels.integrations.tiny import test_image as make_image  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved, by file name, drawn as it was saved."""
    saved = {}
    orig = matplotlib.figure.Figure.savefig

    def keep(self, path, *a, **k):
        out = orig(self, path, *a, **k)
        saved[str(path).rsplit("/", 1)[-1]] = self
        return out

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved


def _heatmaps(fig):
    """Images of scalar data (not the RGB photos under the overlays)."""
    return [im for ax in fig.axes for im in ax.images if np.ndim(im.get_array()) == 2]


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("rows", [1, 3])
def test_heatmaps_have_colour_bars_and_the_title_clears_the_first_row(tmp_path, figures, rows):
    make_image(56, 56).save(tmp_path / "img.png")
    out = tmp_path / "s"
    fake_sweep(out, n=4, maps_for=range(rows), image=str(tmp_path / "img.png"))
    paths = write_report(str(out), overlays=rows)["paths"]
    assert {"heads_png", "overlays_png"} <= set(paths)
    for name in ("heads_kl.png", "overlays.png"):
        fig = figures[name]
        maps = _heatmaps(fig)
        assert maps, name
        barred = [im for im in maps if im.colorbar is not None]
        for im in barred:
            assert im.colorbar.ax.get_ylabel().strip(), f"{name}: a colour bar without units"
        for im in maps:
            # a heatmap has its own colour bar, or shares the colour scale of one that has
            same = [b for b in barred if b.get_clim() == im.get_clim() and b.get_cmap().name == im.get_cmap().name]
            assert same, f"{name}: a heatmap whose colour scale no colour bar explains"
    fig = figures["overlays.png"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # pyplot closed the figure; draw it again as saved
    canvas.draw()
    r = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(r)
    grid = [ax for ax in fig.axes if ax.images]  # the image axes (colour bars excluded)
    assert len(grid) == 4 * rows  # image; question, reference and ratio maps
    first = [ax for ax in grid if ax.get_subplotspec().rowspan.start == 0]
    for ax in first:
        assert not _overlap(title, ax.get_tightbbox(r)), "the title covers the first row"
    # a row's caption does not run into the next row's titles
    for k in range(rows - 1):
        cap = [ax for ax in grid if ax.get_subplotspec().rowspan.start == k][0].xaxis.label.get_window_extent(r)
        for ax in grid:
            if ax.get_subplotspec().rowspan.start == k + 1:
                assert not _overlap(cap, ax.title.get_window_extent(r))


def test_refine_accuracy_table_and_plot(tmp_path, figures):
    from vgkernels.refine import Setting
    from vgkernels.refine import eval as RE

    settings = [Setting(k, p, ls) for ls in ((2,), (2, 3)) for k in (1, 4) for p in (30.0, 70.0)]
    recs = []
    rng = np.random.default_rng(0)
    for i in range(6):
        res = {"baseline": {"correct": bool(i % 2)}}
        res.update({s.label(): {"correct": bool(rng.integers(2))} for s in settings})
        recs.append({"kind": "short", "answer": "yes", "results": res})
    summary = RE.summarize(recs, ["baseline"] + [s.label() for s in settings])
    paths = RE.write_accuracy(str(tmp_path), summary, settings, title="t")
    with open(paths["accuracy_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(summary)
    assert rows[0]["k"] == "" and rows[1]["k"] == "1" and rows[1]["p"] == "30.0" and rows[1]["layers"] == "2"
    assert rows[-1]["layers"] == "2+3" and rows[-1]["mode"] == "renorm"
    for r in rows:
        assert float(r["accuracy"]) == summary[r["method"]]["accuracy"] and int(r["n"]) == 6
    fig = figures["accuracy.png"]
    axes = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_xlabel() for ax in axes] == ["K (top heads)", "percentile p", "knockout layers"]
    assert all(ax.get_ylabel() == "accuracy (%)" for ax in axes)
    # one setting: the table, no plot
    (tmp_path / "one").mkdir()
    one = RE.write_accuracy(str(tmp_path / "one"), {k: summary[k] for k in list(summary)[:2]}, settings[:1])
    assert set(one) == {"accuracy_csv"}


def test_overlays_follow_the_latest_report(tmp_path):
    """``--overlays 0`` removes an earlier overlays.png; a sweep without kept maps says
    why there are no overlays instead of drawing nothing silently."""
    make_image(56, 56).save(tmp_path / "img.png")
    out = tmp_path / "s"
    fake_sweep(out, n=3, maps_for=range(2), image=str(tmp_path / "img.png"))
    png = out / "plots" / "overlays.png"
    assert "overlays_png" in write_report(str(out), overlays=2)["paths"] and png.exists()
    rep = write_report(str(out), overlays=0)
    assert "overlays_png" not in rep["paths"] and not png.exists() and "no overlays" not in rep["text"]
    bare = tmp_path / "t"
    fake_sweep(bare, n=3)
    rep = write_report(str(bare), overlays=2)
    assert "overlays_png" not in rep["paths"] and "no overlays: no sample kept its maps" in rep["text"]
