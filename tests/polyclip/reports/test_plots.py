"""Grouped bar chart: one bar per (group, series) present, a real PNG."""

from PIL import Image

from polyclip.reports.plots import grouped_bar_chart


def test_grouped_bars_skip_missing_series_and_write_a_png(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    values = {"SimCLR": {"probe, all": 0.85, "finetune, all": 0.9}, "random": {"probe, all": 0.74}}
    seen = []
    original = plt.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        seen.append((kwargs.get("label"), list(height)))
        return original(self, x, height, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "bar", spy)
    path = grouped_bar_chart(values, tmp_path / "g.png", "t", "acc")
    assert seen == [("probe, all", [0.85, 0.74]), ("finetune, all", [0.9])]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400
