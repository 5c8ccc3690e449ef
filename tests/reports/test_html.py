"""The shared HTML report blocks, and the shapes benchmark's page built from them."""

from realign_pipeline.reports.html import BarSeries, bar_chart_svg, image_grid
from realign_pipeline.shapes.evaluate import CategoryResult, ConfigurationResult, EvalConfiguration, html_report


def test_bar_chart_labels_published_series_and_scales_bars_to_the_maximum():
    svg = bar_chart_svg(
        ["color"],
        [
            BarSeries("base", {"color": 0.5}, {"color": (0.4, 0.6)}),
            BarSeries("SD 1.5", {"color": 0.375}, published=True),
        ],
    )
    assert "SD 1.5 (published)" in svg and "base</text>" in svg
    assert 'height="110.0"' in svg  # 0.5 of the 220-pixel plot
    assert 'stroke-dasharray="2,2"' in svg  # only the published bar is dashed
    assert svg.count("stroke-dasharray") == 1


def test_image_grid_quotes_paths_and_escapes_captions():
    grid = image_grid([("p <1>", [("images/a b_000000.png", "0.5 & more")])])
    assert 'src="images/a%20b_000000.png"' in grid and "p &lt;1&gt;" in grid and "0.5 &amp; more" in grid


def test_shapes_html_report_shows_each_configuration_and_every_verdict():
    record = {
        "prompt": "a red circle",
        "prompt_index": 0,
        "seed_index": 3,
        "passed": False,
        "reasons": ["red circle missing"],
    }
    category = CategoryResult("binding", 1, 0, 0, 0, 0, None, 0.1, [record])
    result = ConfigurationResult(EvalConfiguration("base", "plain"), {"binding": category})
    page = html_report([result], "| table |")
    assert 'src="contact-sheet-base.png"' in page and "red circle missing" in page and "| table |" in page
    assert "<td>3</td>" in page  # the verdict's seed
