"""kdtools.figures: every plot format offered records the kdtools version and the options in the file itself."""

import gzip
import re

import pytest
from PIL import Image

from kdtools import __version__
from kdtools.errors import KdUsageError
from kdtools.figures import PLOT_FORMATS, image_format, save_figure


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


@pytest.mark.parametrize("fmt", PLOT_FORMATS)
def test_every_offered_format_records_who_made_it(fmt, tmp_path):
    path = tmp_path / f"plot.{fmt}"
    save_figure(figure(), path, {"data": "digits", "seed": 3})
    data = path.read_bytes()
    if fmt == "png":
        info = Image.open(path).info
        recorded = info["Software"] + " " + info["Description"]
    elif fmt in ("jpg", "jpeg"):
        recorded = Image.open(path).info["comment"].decode()
    elif fmt in ("tif", "tiff"):
        tags = Image.open(path).tag_v2
        recorded = tags[305] + " " + tags[270]  # Software, ImageDescription
    elif fmt == "svgz":
        recorded = gzip.decompress(data).decode()
    else:  # svg, pdf: plain text in the file
        recorded = data.decode("latin-1")
    assert f"kdtools {__version__}" in recorded and '"data": "digits"' in recorded and '"seed": 3' in recorded
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic: no temporary file left


def test_an_svgz_plot_records_its_own_name_in_the_gzip_header(tmp_path):
    # the gzip header's FNAME field (what `gunzip -N` restores): the plot's name, not the temporary file's
    path = tmp_path / "curve.svgz"
    save_figure(figure(), path)
    data = path.read_bytes()
    assert data[:2] == b"\x1f\x8b" and data[3] & 0x08  # gzip, with a stored name
    stored = data[10:data.index(b"\0", 10)].decode()
    assert stored == "curve.svg"
    assert gzip.decompress(data).startswith(b"<?xml")


def test_other_names_are_usage_errors_and_no_suffix_means_png():
    assert image_format("curve") == "png" and image_format("Curve.PDF") == "pdf"
    for name in ("errors.txt", "plot.eps", "plot.raw", "plot.pgf"):
        with pytest.raises(KdUsageError, match="cannot draw a plot as"):
            image_format(name)


def test_the_answer_grid_draws_images_only(tmp_path):
    import torch

    from kdtools.errors import KdError
    from kdtools.logplot import heading_width, plot_answer_grid, share_text, to_hwc

    # grey and colour tiles, uint8 and float, all as [0, 1] arrays for imshow
    assert to_hwc(torch.full((1, 2, 3), 255, dtype=torch.uint8)).tolist() == [[1.0] * 3] * 2
    assert to_hwc(torch.rand(3, 4, 5)).shape == (4, 5, 3)
    out = tmp_path / "g.svg"
    plot_answer_grid({0: torch.rand(2, 3, 4, 4), 2: torch.rand(1, 3, 4, 4)}, [5, 0, 1], out, options={"k": 1})
    assert "never answered: 1" in " ".join(out.read_text().split())  # the class no query reached is named
    # a class answered a few times in a large log is not shown as "0.0 %"
    assert [share_text(0, 10), share_text(1, 4), share_text(3, 10_000), share_text(5, 10_000)] == ["0 %", "25.0 %", "<0.1 %", "0.1 %"]
    # a long title on a narrow grid is wrapped, not cut off at the image's edge
    long_title = "queries of " + "a/very/long/path/" * 6 + "log.h5"
    plot_answer_grid({0: torch.rand(1, 1, 4, 4)}, [1], tmp_path / "t.svg", title=long_title)
    texts = re.findall(r"<!-- (.*?) -->", (tmp_path / "t.svg").read_text())  # matplotlib names each text line
    assert long_title.replace(" ", "") in "".join(texts).replace(" ", "")
    assert len(texts) > 3 and max(map(len, texts)) <= heading_width(1) < len(long_title)
    with pytest.raises(KdUsageError, match="draws images"):
        plot_answer_grid({0: torch.rand(2, 2)}, [2], tmp_path / "p.png")  # 2-D points
    with pytest.raises(KdError, match="no answered query"):
        plot_answer_grid({}, [0, 0], tmp_path / "e.png")
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "e.png").exists()
