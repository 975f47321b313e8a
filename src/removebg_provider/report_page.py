"""The report's HTML page: the packaged Jinja2 template `templates/report.html.j2`, rendered autoescaped.

Every value from the manifest (ids, URIs, errors, flags) reaches the page through autoescaping, so a
product id such as `<script>` shows as text. The page holds its images (JPEG data URIs) and needs
no network; it reads at phone width too (the tiles shrink instead of overflowing).
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import jinja2

HISTOGRAM_WIDTH, HISTOGRAM_HEIGHT = 420, 140
PANEL_NAMES = ("original", "cutout", "mask")


@dataclass(frozen=True)
class PageSummary:
    """The page's header: which manifest, the headline, rows by status and by flag, the fraction histogram."""

    manifest_uri: str
    headline: str
    by_status: Sequence[tuple[int, int]]
    by_flag: Sequence[tuple[str, int]]
    histogram: Sequence[int]
    without_fraction: int


@dataclass(frozen=True)
class Figure:
    """One tile: a manifest row's three panels (JPEG bytes: original, cutout, mask) and its caption."""

    row: int
    id: str
    group: str
    status: str
    flags: tuple[str, ...]
    fraction: float | None
    error: str | None
    problems: tuple[str, ...]
    image: str | None
    panels: tuple[bytes, bytes, bytes]

    def named_panels(self) -> Iterator[tuple[str, bytes]]:
        """The panels with their names, in page order."""
        return zip(PANEL_NAMES, self.panels, strict=True)


def html_page(summary: PageSummary, figures: Sequence[Figure]) -> str:
    """The whole page, self-contained."""
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=f"removebg report: {summary.manifest_uri}",
        headline=summary.headline,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        by_status=summary.by_status,
        by_flag=summary.by_flag,
        histogram=_histogram(summary.histogram, summary.without_fraction),
        figures=figures,
    )


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("removebg_provider", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["base64"] = lambda data: base64.b64encode(data).decode("ascii")
    return environment


def _histogram(counts: Sequence[int], without: int) -> dict[str, Any]:
    """The SVG histogram's geometry: one bar per bin, scaled to the fullest, with its range and count."""
    peak = max(max(counts, default=0), 1)
    plot = HISTOGRAM_HEIGHT - 30
    step = HISTOGRAM_WIDTH / len(counts) if counts else HISTOGRAM_WIDTH
    bars = []
    for index, count in enumerate(counts):
        height = plot * count / peak
        low, high = index / len(counts), (index + 1) / len(counts)
        bars.append(
            {
                "x": f"{index * step:.1f}",
                "y": f"{20 + plot - height:.1f}",
                "width": f"{step - 2:.1f}",
                "height": f"{height:.1f}",
                "label": f"{low:.2f}-{high:.2f}: {count} rows",
            }
        )
    return {
        "width": HISTOGRAM_WIDTH,
        "height": HISTOGRAM_HEIGHT,
        "axis": 20 + plot,
        "rows": sum(counts),
        "without": without,
        "bars": bars,
    }
