"""Self-contained HTML reports shared by the benchmarks (``realign eval``, both the shapes world and
T2I-CompBench)."""

from .html import BarSeries, bar_chart_svg, html_page, html_table, image_grid

__all__ = ["BarSeries", "bar_chart_svg", "html_page", "html_table", "image_grid"]
