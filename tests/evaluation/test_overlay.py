"""overlay.png is readable: at least ~4 inches a panel at 100 dpi, titled panels, a legend of class names."""

from __future__ import annotations

import numpy as np
import pytest

from mambamim.evaluation import report


def test_overlay_size_titles_and_legend(tmp_path, monkeypatch):
    from matplotlib.image import imread

    figs = []
    save = report._save_png
    monkeypatch.setattr(report, "_save_png", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    img = np.linspace(0, 1, 24 * 20 * 6, dtype=np.float32).reshape(24, 20, 6)
    lab = np.zeros((24, 20, 6), np.int64)
    lab[2:8, 2:8, 2:4] = 1
    lab[12:20, 10:16, 3] = 3
    path = report.plot_overlay(img, {"reference": lab, "prediction": np.roll(lab, 1, 0)}, tmp_path / "overlay.png",
                               title="case x", class_names=["background", "liver", "spleen", "right kidney"])
    pixels = imread(path)
    assert pixels.shape[1] >= 2 * 400 and pixels.shape[0] >= 300  # two panels of >= 4 inches at 100 dpi
    fig = figs[0]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["reference (axial slice z=3)", "prediction (axial slice z=3)"]
    legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert legend == ["liver", "right kidney"]  # the classes on the slice, by name; spleen is absent
    # the legend colours are the overlay's: label 3's patch colour is what the colormap gives 3
    overlay = fig.axes[0].get_images()[1]
    rgba = overlay.cmap(overlay.norm(3))
    patch = fig.legends[0].get_patches()[1].get_facecolor()
    assert np.allclose(rgba[:3], patch[:3])


def test_overlay_without_names_and_bad_args(tmp_path):
    lab = np.zeros((16, 16, 4), np.int64)
    lab[4:8, 4:8, 1] = 2
    path = report.plot_overlay(np.zeros((1, 16, 16, 4)), {"reference": lab}, tmp_path / "o.png")
    assert path.is_file()
    with pytest.raises(ValueError):
        report.plot_overlay(np.zeros((16, 16)), {"reference": lab}, tmp_path / "o.png")
    with pytest.raises(ValueError):
        report.plot_overlay(np.zeros((16, 16, 4)), {"reference": lab}, tmp_path / "o.png", panel_inches=0)
