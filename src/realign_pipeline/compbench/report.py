"""The T2I-CompBench report: ``scores.json``, a Markdown table with 95% intervals, and ``report.html``.

A category's score is the mean over its images (as the official scripts report it). Its 95% interval treats
prompts as the sampled unit, since a prompt's images share its difficulty: the mean of the per-prompt means
(equal to the image mean when every prompt has the same number of images) plus or minus 1.96 standard errors
of those per-prompt means (normal approximation; no interval with fewer than two prompts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..reports.html import BarSeries, bar_chart_svg, escape, html_page, html_table, image_grid

SCORES_FILE = "scores.json"
TABLE_FILE = "table.md"
HTML_FILE = "report.html"
CHART_TITLE = "mean score per category; grey dashed bars: published, not measured here"
# Published T2I-CompBench scores (BLIP-VQA colour / shape / texture; spatial) quoted by the issue, per model.
PUBLISHED: dict[str, dict[str, float]] = {
    "SD 1.5": {"color": 0.375, "shape": 0.372, "texture": 0.416, "spatial": 0.120},
    "Attend-and-Excite (SD 2)": {"color": 0.640, "shape": 0.452, "texture": 0.596},
    "GORS": {"color": 0.660, "shape": 0.479, "texture": 0.629},
    "ELLA (SD 1.5)": {"color": 0.691, "shape": 0.494, "texture": 0.631},
    "CoMat (SD 1.5, approx.)": {"color": 0.673, "shape": 0.506, "texture": 0.624},
}


def mean_interval(prompt_means: Sequence[float], z: float = 1.96) -> tuple[float, tuple[float, float] | None]:
    """The mean of per-prompt means and its normal 95% interval (``None`` with fewer than two prompts)."""
    if not prompt_means:
        raise ValueError("no prompt means")
    n = len(prompt_means)
    mean = sum(prompt_means) / n
    if n < 2:
        return mean, None
    variance = sum((m - mean) ** 2 for m in prompt_means) / (n - 1)
    half = z * math.sqrt(variance / n)
    return mean, (mean - half, mean + half)


def aggregate(records: Sequence[dict], configurations: Sequence[str], categories: Sequence[str]) -> dict:
    """``{configuration: {category: summary}}`` from work-item score records, prompts in index order."""
    results: dict = {}
    for configuration in configurations:
        results[configuration] = {}
        for category in categories:
            mine = sorted(
                (r for r in records if r["configuration"] == configuration and r["category"] == category),
                key=lambda r: r["prompt_index"],
            )
            if not mine:
                continue
            prompt_means = [sum(i["score"] for i in r["images"]) / len(r["images"]) for r in mine]
            image_scores = [i["score"] for r in mine for i in r["images"]]
            mean, interval = mean_interval(prompt_means)
            results[configuration][category] = {
                "score": sum(image_scores) / len(image_scores),
                "mean_of_prompt_means": mean,
                "ci95": None if interval is None else list(interval),
                "n_prompts": len(mine),
                "n_images": len(image_scores),
                "prompts": [
                    {"index": r["prompt_index"], "prompt": r["prompt"], "mean": m, "images": r["images"]}
                    for r, m in zip(mine, prompt_means)
                ],
            }
    return results


def _cell(summary: dict | None) -> str:
    if summary is None:
        return "–"
    interval = summary["ci95"]
    if interval is None:
        return f"{summary['score']:.3f}"
    return f"{summary['score']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def format_table(results: dict, categories: Sequence[str]) -> str:
    """Markdown: one row per configuration, the mean score per category with its 95% interval."""
    first = next(iter(results.values()))
    header = ["configuration"] + [
        f"{c} (n={first[c]['n_prompts']}×{first[c]['n_images'] // first[c]['n_prompts']})" if c in first else c
        for c in categories
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for configuration, summaries in results.items():
        lines.append("| " + " | ".join([configuration] + [_cell(summaries.get(c)) for c in categories]) + " |")
    return "\n".join(lines)


def html_report(results: dict, categories: Sequence[str], manifest: dict, grid_prompts: int = 4) -> str:
    """The page: table, bar chart beside the published figures, per category an image grid per configuration
    (the first ``grid_prompts`` prompts, all their images, with scores) and every prompt's score."""
    configurations = list(results)
    series = [
        BarSeries(
            c,
            {k: v["score"] for k, v in results[c].items()},
            {k: (tuple(v["ci95"]) if v["ci95"] else None) for k, v in results[c].items()},
        )
        for c in configurations
    ]
    series += [BarSeries(name, dict(values), published=True) for name, values in PUBLISHED.items()]
    sections = [
        ("Scores", "<pre>" + escape(format_table(results, categories)) + "</pre>"),
        (
            "Configurations beside published figures",
            bar_chart_svg(categories, series, CHART_TITLE)
            + "<p>Published figures are quoted from their papers (T2I-CompBench's own detector, UniDet, for spatial; "
            "BLIP-VQA for colour, shape, texture); they were not measured by this run.</p>",
        ),
    ]
    for category in categories:
        parts = []
        for configuration in configurations:
            summary = results[configuration].get(category)
            if summary is None:
                continue
            rows = [
                (
                    f"{p['index']}: {p['prompt']} (mean {p['mean']:.3f})",
                    [
                        (f"images/{configuration}/{category}/samples/{image['file']}", f"{image['score']:.3f}")
                        for image in p["images"]
                    ],
                )
                for p in summary["prompts"][:grid_prompts]
            ]
            parts.append(f"<h3>{escape(configuration)}</h3>" + image_grid(rows))
        table_rows = []
        prompts = next(results[c][category]["prompts"] for c in configurations if category in results[c])
        for position, prompt in enumerate(prompts):
            table_rows.append(
                [prompt["index"], prompt["prompt"]]
                + [
                    f"{results[c][category]['prompts'][position]['mean']:.3f}" if category in results[c] else "–"
                    for c in configurations
                ]
            )
        parts.append(
            "<details><summary>per-prompt scores</summary>"
            + html_table(["#", "prompt", *configurations], table_rows)
            + "</details>"
        )
        sections.append((category, "\n".join(parts)))
    sections.append(("Manifest", "<pre>" + escape(json.dumps(manifest, indent=1)) + "</pre>"))
    return html_page("T2I-CompBench", sections)


def write_report(
    output: Path, records: Sequence[dict], manifest: dict, categories: Sequence[str], grid_prompts: int = 4
) -> dict[str, Path]:
    """Write ``scores.json``, ``table.md`` and ``report.html`` into ``output``; returns their paths."""
    configurations = manifest["settings"]["configurations"]
    results = aggregate(records, configurations, categories)
    table = format_table(results, categories)
    paths = {"json": output / SCORES_FILE, "table": output / TABLE_FILE, "html": output / HTML_FILE}
    report = {
        "benchmark": "t2i-compbench",
        "score": "mean over images; ci95: mean of per-prompt means ± 1.96 standard errors over prompts",
        "manifest": manifest,
        "results": results,
        "table": table,
    }
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["table"].write_text(table + "\n")
    paths["html"].write_text(html_report(results, categories, manifest, grid_prompts))
    return paths
