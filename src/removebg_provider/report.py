"""Build a run's visual QA report: an HTML page and a PNG contact sheet of the rows worth a look."""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from removebg_provider.errors import FetchRefused, ManifestError, StorageError
from removebg_provider.guarded_fetch import (
    IMAGE_FETCH_LIMITS,
    NOT_PUBLIC,
    AddressPolicy,
    allow_any_address,
    fetch_url,
    is_public_address,
)
from removebg_provider.manifest import derive_id, iter_batches, read_schema, require_columns
from removebg_provider.progress import Progress
from removebg_provider.report_page import Figure, PageSummary, html_page
from removebg_provider.storage import Storage, scheme_of
from removebg_provider.vocabulary import (
    CUTOUT,
    ERROR_COLUMN,
    FLAG_SEPARATOR,
    FLAGS_COLUMN,
    FRACTION_COLUMN,
    MASK,
    STATUS_COLUMN,
    STATUS_TEXT_COLUMN,
)

log = logging.getLogger(__name__)

CUTOUT_COLUMN = CUTOUT.column
MASK_COLUMN = MASK.column

THUMB = 160
PAD = 8
CAPTION_HEIGHT = 64
TILE_WIDTH = 3 * THUMB + 4 * PAD
TILE_HEIGHT = PAD + THUMB + CAPTION_HEIGHT + PAD
SHEET_COLUMNS = 4
HEADER_HEIGHT = 200
HISTOGRAM_BINS = 20
# Per image, all redirects included: a host that drips bytes cannot hold the report (or `run`) up.
FETCH_TIMEOUT_SECONDS = IMAGE_FETCH_LIMITS.timeout_seconds
MAX_IMAGE_BYTES = IMAGE_FETCH_LIMITS.max_bytes
FETCH_WORKERS = 8

FLAGGED, FAILED, SAMPLED = "flagged", "failed", "sample"
GROUPS: tuple[str, ...] = (FLAGGED, FAILED, SAMPLED)


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it covers: `tiles` shown out of `rows` in the manifest."""

    html_uri: str
    png_uri: str
    tiles: int
    rows: int
    by_status: Mapping[int, int] = field(default_factory=dict)
    by_flag: Mapping[str, int] = field(default_factory=dict)


def build_report(
    enriched_manifest_uri: str,
    storage: Storage,
    *,
    out_prefix: str | None = None,
    sample: int = 48,
    seed: int = 0,
    image_column: str = "image_url",
    id_column: str | None = None,
    manifest_format: str | None = None,
    allow_private_urls: bool = False,
) -> ReportResult:
    """Write `<out_prefix>.html` and `<out_prefix>.png` for an enriched manifest.

    `out_prefix` defaults to the manifest's URI without its extension plus `.report`. At most
    `sample` tiles are shown: flagged rows, then failed rows (sharing the space evenly when both
    are many), then a random sample of the rest, fixed by `seed`. The manifest is streamed once
    over the columns the report needs, keeping only counts and at most `sample` candidate rows
    per group, so memory and time do not grow with the manifest beyond that one pass; images
    are fetched for the shown tiles only. Manifests without quality columns work too.
    """
    if sample < 1:
        raise ValueError(f"sample must be at least 1, not {sample}")
    scan = _scan(enriched_manifest_uri, storage, manifest_format, image_column, id_column, sample, seed)
    chosen = scan.choose(sample)
    log.info(
        "report for %s: %d rows scanned, %d tiles to draw",
        enriched_manifest_uri,
        scan.counts.rows,
        len(chosen),
    )
    tiles = _render_tiles(chosen, storage, allow_any_address if allow_private_urls else is_public_address)
    prefix = _out_prefix(enriched_manifest_uri, out_prefix)
    html_uri, png_uri = f"{prefix}.html", f"{prefix}.png"
    storage.write_bytes(html_uri, _html_page(enriched_manifest_uri, scan.counts, tiles).encode())
    storage.write_bytes(png_uri, _encode(_contact_sheet(enriched_manifest_uri, scan.counts, tiles), "PNG"))
    log.info("report written: %s and %s", html_uri, png_uri)
    return ReportResult(
        html_uri=html_uri,
        png_uri=png_uri,
        tiles=len(tiles),
        rows=scan.counts.rows,
        by_status=dict(sorted(scan.counts.by_status.items())),
        by_flag=dict(scan.counts.by_flag.most_common()),
    )


def sheet_size(tiles: int) -> tuple[int, int]:
    """Width and height in pixels of the PNG contact sheet for `tiles` tiles."""
    return SHEET_COLUMNS * TILE_WIDTH, HEADER_HEIGHT + math.ceil(tiles / SHEET_COLUMNS) * TILE_HEIGHT


@dataclass(frozen=True)
class _Row:
    row: int
    id: str
    group: str
    image: str | None
    status_code: int | None
    status_text: str | None
    error: str | None
    cutout_uri: str | None
    mask_uri: str | None
    fraction: float | None
    flags: tuple[str, ...]


@dataclass
class _Counts:
    rows: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_flag: Counter[str] = field(default_factory=Counter)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, np.int64))
    without_fraction: int = 0
    groups: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Tile:
    row: _Row
    panels: tuple[Image.Image, Image.Image, Image.Image]
    problems: tuple[str, ...]


class _Reservoir:
    """A uniform random sample of at most `capacity` rows: those with the smallest random keys."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: list[tuple[float, _Row]] = []

    def offer(self, keys: np.ndarray, indices: np.ndarray, make: Callable[[np.ndarray], list[_Row]]) -> None:
        if len(self.items) >= self.capacity:
            below = keys < self.items[-1][0]
            keys, indices = keys[below], indices[below]
        if keys.size > self.capacity:
            best = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            keys, indices = keys[best], indices[best]
        if not keys.size:
            return
        self.items.extend(zip(keys.tolist(), make(indices), strict=True))
        self.items.sort(key=lambda item: item[0])
        del self.items[self.capacity :]

    def rows(self, count: int) -> list[_Row]:
        return sorted((row for _, row in self.items[:count]), key=lambda row: row.row)


class _Scan:
    def __init__(self, sample: int) -> None:
        self.counts = _Counts()
        self.reservoirs = {group: _Reservoir(sample) for group in GROUPS}

    def choose(self, sample: int) -> list[_Row]:
        available = [len(self.reservoirs[group].items) for group in (FLAGGED, FAILED)]
        flagged, failed = _share(sample, available)
        rest = sample - flagged - failed
        return (
            self.reservoirs[FLAGGED].rows(flagged)
            + self.reservoirs[FAILED].rows(failed)
            + self.reservoirs[SAMPLED].rows(rest)
        )


def _scan(
    uri: str,
    storage: Storage,
    fmt: str | None,
    image_column: str,
    id_column: str | None,
    sample: int,
    seed: int,
) -> _Scan:
    schema = read_schema(uri, storage, fmt)
    require_columns(uri, schema, [image_column, STATUS_COLUMN] + ([id_column] if id_column else []))
    optional = (STATUS_TEXT_COLUMN, ERROR_COLUMN, CUTOUT_COLUMN, MASK_COLUMN, FRACTION_COLUMN, FLAGS_COLUMN)
    columns = list(
        dict.fromkeys(
            [image_column, STATUS_COLUMN, *([id_column] if id_column else [])]
            + [name for name in optional if name in schema.names]
        )
    )
    scan = _Scan(sample)
    rng = np.random.default_rng(seed)
    first_row = 0
    for batch in iter_batches(uri, storage, fmt=fmt, columns=columns):
        n = batch.num_rows
        status = _status_codes(uri, batch.column(STATUS_COLUMN))
        names = batch.schema.names
        flags = _flag_lists(batch.column(FLAGS_COLUMN)) if FLAGS_COLUMN in names else None
        fractions = _fractions(batch.column(FRACTION_COLUMN)) if FRACTION_COLUMN in names else None
        ok = (status >= 200) & (status < 300)
        flag_counts = (
            pc.list_value_length(flags).fill_null(0).to_numpy(zero_copy_only=False)
            if flags is not None
            else np.zeros(n, np.int64)
        )
        groups = {FLAGGED: ok & (flag_counts > 0), FAILED: ~ok, SAMPLED: ok & (flag_counts == 0)}
        _count(scan.counts, status, flags, fractions, groups)
        keys = rng.random(n)
        for group, selected in groups.items():
            indices = np.flatnonzero(selected)

            def make(
                chosen: np.ndarray, batch: pa.RecordBatch = batch, group: str = group, start: int = first_row
            ) -> list[_Row]:
                return _rows(batch.take(pa.array(chosen)), chosen + start, group, image_column, id_column)

            scan.reservoirs[group].offer(keys[indices], indices, make)
        first_row += n
    return scan


def _count(
    counts: _Counts,
    status: np.ndarray,
    flags: pa.Array | None,
    fractions: np.ndarray | None,
    groups: Mapping[str, np.ndarray],
) -> None:
    counts.rows += status.size
    codes, tallies = np.unique(status, return_counts=True)
    counts.by_status.update(dict(zip(codes.tolist(), tallies.tolist(), strict=True)))
    if flags is not None:
        for entry in pc.value_counts(pc.list_flatten(flags)).to_pylist():
            counts.by_flag[str(entry["values"])] += int(entry["counts"])
    if fractions is None:
        counts.without_fraction += status.size
    else:
        known = fractions[~np.isnan(fractions)]
        counts.histogram += np.histogram(np.clip(known, 0.0, 1.0), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]
        counts.without_fraction += status.size - known.size
    for group, selected in groups.items():
        counts.groups[group] += int(np.count_nonzero(selected))


def _status_codes(uri: str, column: pa.Array) -> np.ndarray:
    try:
        codes = pc.cast(column, pa.int64())
    except pa.ArrowInvalid as exc:
        raise ManifestError(
            f"manifest {uri} has a {STATUS_COLUMN} value that is not a status code: {exc}; "
            "is it an enriched manifest written by removebg?"
        ) from exc
    return np.asarray(codes.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _flag_lists(column: pa.Array) -> pa.Array:
    """The flags as a list<string> array, whether stored as lists or as ';'-joined text (CSV)."""
    if pa.types.is_null(column.type):
        return pa.array([[]] * len(column), pa.list_(pa.string()))
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = pc.if_else(pc.equal(pc.utf8_trim_whitespace(column), ""), None, column)
        column = pc.split_pattern(text, FLAG_SEPARATOR)
    return pc.cast(column, pa.list_(pa.string()))


def _fractions(column: pa.Array) -> np.ndarray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.if_else(pc.equal(pc.utf8_trim_whitespace(column), ""), None, column)
    values = pc.cast(column, pa.float64()).fill_null(float("nan"))
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


def _rows(
    batch: pa.RecordBatch, row_numbers: np.ndarray, group: str, image_column: str, id_column: str | None
) -> list[_Row]:
    rows = []
    for number, values in zip(row_numbers.tolist(), batch.to_pylist(), strict=True):
        image = _text(values.get(image_column))
        record_id = _text(values.get(id_column)) if id_column else None
        flags = values.get(FLAGS_COLUMN)
        if isinstance(flags, str):
            flags = flags.split(FLAG_SEPARATOR)
        fraction = values.get(FRACTION_COLUMN)
        status = values.get(STATUS_COLUMN)
        rows.append(
            _Row(
                row=number,
                id=record_id or derive_id(image, number),
                group=group,
                image=image,
                status_code=int(status) if status not in (None, "") else None,
                status_text=_text(values.get(STATUS_TEXT_COLUMN)),
                error=_text(values.get(ERROR_COLUMN)),
                cutout_uri=_text(values.get(CUTOUT_COLUMN)),
                mask_uri=_text(values.get(MASK_COLUMN)),
                fraction=float(fraction) if fraction not in (None, "") else None,
                flags=tuple(flag.strip() for flag in flags or () if flag and flag.strip()),
            )
        )
    return rows


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _share(budget: int, available: Sequence[int]) -> list[int]:
    """Split `budget` evenly over groups, giving what a small group cannot use to the others."""
    shares = [0] * len(available)
    remaining = budget
    while remaining > 0:
        open_groups = [i for i, count in enumerate(available) if shares[i] < count]
        if not open_groups:
            break
        each = max(1, remaining // len(open_groups))
        for i in open_groups:
            give = min(each, available[i] - shares[i], remaining)
            shares[i] += give
            remaining -= give
    return shares


def _render_tiles(rows: list[_Row], storage: Storage, address_policy: AddressPolicy) -> list[_Tile]:
    if not rows:
        return []
    progress = Progress(len(rows), "report tiles")
    fetcher = _ImageFetcher(storage, address_policy)

    def render(row: _Row) -> _Tile:
        tile = _tile(row, fetcher)
        progress.advance(1, 1 if tile.problems else 0)
        return tile

    with ThreadPoolExecutor(min(FETCH_WORKERS, len(rows)), thread_name_prefix="report") as pool:
        return list(pool.map(render, rows))


def _tile(row: _Row, fetcher: _ImageFetcher) -> _Tile:
    problems: list[str] = []

    def load(uri: str | None, what: str, missing: str) -> Image.Image | str:
        if not uri:
            return missing
        try:
            return _decode(fetcher.fetch(uri))
        except _Unavailable as exc:
            problems.append(f"{what} unavailable: {exc}")
            return f"{what} unavailable: {exc}"

    original = load(row.image, "original", "no image reference")
    cutout = load(row.cutout_uri, "cutout", f"no cutout (status {row.status_code})")
    mask: Image.Image | str
    if row.mask_uri or not isinstance(cutout, Image.Image) or cutout.mode != "RGBA":
        mask = load(row.mask_uri, "mask", "no mask")
    else:
        mask = cutout.getchannel("A")
    panels = (
        _panel(original, _flat((236, 236, 236))),
        _panel(cutout, _checkerboard()),
        _panel(mask, _flat((0, 0, 0)), grayscale=True),
    )
    return _Tile(row, panels, tuple(problems))


class _Unavailable(Exception):
    pass


@dataclass(frozen=True)
class _ImageFetcher:
    """Reads a tile's image: from storage, or over http(s) under the address rules and limits."""

    storage: Storage
    address_policy: AddressPolicy

    def fetch(self, uri: str) -> bytes:
        if scheme_of(uri) in ("http", "https"):
            try:
                return fetch_url(uri, IMAGE_FETCH_LIMITS, self.address_policy)
            except FetchRefused as exc:
                hint = " (allow private URLs for the report to fetch it)" if exc.code == NOT_PUBLIC else ""
                raise _Unavailable(str(exc).replace(uri, "it")[:160] + hint) from exc
        try:
            return self.storage.read_bytes(uri, limit=MAX_IMAGE_BYTES)
        except StorageError as exc:
            reason = str(exc).removeprefix(f"cannot read {uri}: ")
            raise _Unavailable(reason[:120]) from exc


def _decode(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            # thumbnail() decodes JPEGs at reduced scale, so large originals stay cheap.
            image.thumbnail((THUMB, THUMB))
            if image.mode in ("RGBA", "RGB", "L"):
                return image
            return image.convert("RGBA" if image.has_transparency_data else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _Unavailable("not a readable image") from exc


def _panel(content: Image.Image | str, backdrop: Image.Image, *, grayscale: bool = False) -> Image.Image:
    panel = backdrop.copy()
    if isinstance(content, str):
        _placeholder(panel, content)
        return panel
    image = content.convert("L").convert("RGB") if grayscale else content
    offset = ((THUMB - image.width) // 2, (THUMB - image.height) // 2)
    if image.mode == "RGBA":
        panel.paste(image, offset, image)
    else:
        panel.paste(image.convert("RGB"), offset)
    return panel


def _placeholder(panel: Image.Image, message: str) -> None:
    draw = ImageDraw.Draw(panel)
    draw.rectangle((0, 0, THUMB - 1, THUMB - 1), fill=(90, 90, 90), outline=(200, 60, 60))
    lines = _wrap(message, 22)[:8]
    draw.multiline_text((8, 8), "\n".join(lines), fill=(255, 255, 255), font=_font(12), spacing=3)


def _flat(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (THUMB, THUMB), colour)


def _checkerboard(square: int = 10) -> Image.Image:
    cells = (np.indices((THUMB, THUMB)) // square).sum(axis=0) % 2
    board = np.where(cells[..., None] == 0, 255, 204).astype(np.uint8)
    return Image.fromarray(np.repeat(board, 3, axis=2), "RGB")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        while len(word) > width:
            lines.append(word[:width])
            word = word[width:]
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        elif word:
            lines.append(word)
    return lines or [""]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    # PNG at zlib's default level: `optimize` made the contact sheet 5 % smaller for 2.3 times the
    # encoding time, which a run spends after its last request.
    image.save(buffer, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _out_prefix(manifest_uri: str, out_prefix: str | None) -> str:
    if out_prefix:
        for extension in (".html", ".png"):
            if out_prefix.lower().endswith(extension):
                return out_prefix[: -len(extension)]
        return out_prefix
    path = manifest_uri.split("?", 1)[0]
    head, _, name = path.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{stem}.report" if head else f"{stem}.report"


def _caption(row: _Row) -> list[str]:
    status = f"{row.status_code if row.status_code is not None else '-'} {row.status_text or ''}".strip()
    lines = [f"#{row.row}  {row.id}", status]
    if row.flags:
        lines.append("flags: " + ", ".join(row.flags))
    if row.fraction is not None:
        lines.append(f"foreground {row.fraction:.1%}")
    if row.error:
        lines.append(row.error)
    return lines


def _headline(counts: _Counts) -> str:
    return (
        f"{counts.rows} rows: {counts.groups[FAILED]} failed, {counts.groups[FLAGGED]} flagged, "
        f"{counts.groups[SAMPLED]} fine"
    )


_GROUP_COLOURS = {FLAGGED: (214, 120, 0), FAILED: (200, 40, 40), SAMPLED: (80, 80, 80)}


def _contact_sheet(manifest_uri: str, counts: _Counts, tiles: list[_Tile]) -> Image.Image:
    width, height = sheet_size(len(tiles))
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD * 2, PAD * 2), f"removebg report: {manifest_uri}", fill=(0, 0, 0), font=_font(18))
    draw.text((PAD * 2, PAD * 2 + 28), _headline(counts), fill=(0, 0, 0), font=_font(14))
    status_text = "status: " + ", ".join(f"{code}: {n}" for code, n in sorted(counts.by_status.items()))
    flag_text = "flags: " + (", ".join(f"{flag}: {n}" for flag, n in counts.by_flag.most_common()) or "none")
    y = PAD * 2 + 52
    for line in _wrap(status_text, 90)[:3] + _wrap(flag_text, 90)[:3]:
        draw.text((PAD * 2, y), line, fill=(40, 40, 40), font=_font(13))
        y += 18
    _draw_histogram(draw, counts, (width - 560, PAD * 2, width - PAD * 2, HEADER_HEIGHT - PAD * 2))
    for index, tile in enumerate(tiles):
        x = (index % SHEET_COLUMNS) * TILE_WIDTH
        y = HEADER_HEIGHT + (index // SHEET_COLUMNS) * TILE_HEIGHT
        colour = _GROUP_COLOURS[tile.row.group]
        draw.rectangle((x + 2, y + 2, x + TILE_WIDTH - 3, y + TILE_HEIGHT - 3), outline=colour, width=2)
        for i, panel in enumerate(tile.panels):
            sheet.paste(panel, (x + PAD + i * (THUMB + PAD), y + PAD))
        lines = [line[:80] for line in _caption(tile.row)][:4]
        draw.multiline_text(
            (x + PAD, y + PAD + THUMB + 4), "\n".join(lines), fill=colour, font=_font(12), spacing=2
        )
    return sheet


def _draw_histogram(draw: ImageDraw.ImageDraw, counts: _Counts, box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    title = f"foreground fraction ({int(counts.histogram.sum())} rows"
    title += f", {counts.without_fraction} without)" if counts.without_fraction else ")"
    draw.text((left, top), title, fill=(0, 0, 0), font=_font(13))
    plot_top, plot_bottom = top + 22, bottom - 18
    peak = max(int(counts.histogram.max()), 1)
    bar = (right - left) / HISTOGRAM_BINS
    for i, count in enumerate(counts.histogram.tolist()):
        bar_height = round((plot_bottom - plot_top) * count / peak)
        x0 = left + round(i * bar)
        x1 = left + round((i + 1) * bar) - 2
        if bar_height:
            draw.rectangle((x0, plot_bottom - bar_height, x1, plot_bottom), fill=(70, 110, 180))
    draw.line((left, plot_bottom, right, plot_bottom), fill=(0, 0, 0))
    for value in (0.0, 0.5, 1.0):
        x = left + round(value * (right - left))
        draw.text((min(x, right - 24), plot_bottom + 3), f"{value:g}", fill=(0, 0, 0), font=_font(11))


def _html_page(manifest_uri: str, counts: _Counts, tiles: list[_Tile]) -> str:
    summary = PageSummary(
        manifest_uri=manifest_uri,
        headline=_headline(counts),
        by_status=sorted(counts.by_status.items()),
        by_flag=counts.by_flag.most_common(),
        histogram=counts.histogram.tolist(),
        without_fraction=counts.without_fraction,
    )
    return html_page(summary, [_figure(tile) for tile in tiles])


def _figure(tile: _Tile) -> Figure:
    row = tile.row
    status = f"{row.status_code if row.status_code is not None else '-'} {row.status_text or ''}"
    jpeg = tuple(_encode(panel, "JPEG") for panel in tile.panels)
    return Figure(
        row=row.row,
        id=row.id,
        group=row.group,
        status=status.strip(),
        flags=row.flags,
        fraction=row.fraction,
        error=row.error,
        problems=tile.problems,
        image=row.image,
        panels=(jpeg[0], jpeg[1], jpeg[2]),
    )
