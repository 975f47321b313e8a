"""The words of the domain, each defined once: modes, formats, output kinds, result columns, row statuses.

Everything else imports these names; this module imports nothing of ours. Adding an API mode is one
entry in `MODES`; adding an output kind is one `OutputKind` in `OUTPUT_KINDS` (its API field, its
request flag, its key suffix and its enriched-manifest column follow from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

Mode = Literal["fast", "precise"]
MODES: tuple[Mode, ...] = ("fast", "precise")
DEFAULT_MODE: Mode = "fast"

IMAGE_FORMATS = ("png", "jpg", "webp")
DEFAULT_IMAGE_FORMAT = "png"
# File extension of each image format, and the spellings users write for them.
IMAGE_EXTENSIONS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True)
class OutputKind:
    """One image the API can return for a record, and everything named after it.

    `request_flag` is the per-record boolean that asks for it (None: always returned); `extension`
    is fixed for kinds the API always encodes one way (None: it follows `image_format`).
    """

    name: str
    api_field: str
    request_flag: str | None
    key_suffix: str
    extension: str | None

    @property
    def column(self) -> str:
        """Its column in the enriched manifest: `removebg` + the API field."""
        return f"removebg{self.api_field}"

    @property
    def result_key(self) -> str:
        """Its key in stored results and checkpoints: the API field without the underscore."""
        return self.api_field.lstrip("_")


CUTOUT = OutputKind("cutout", "_output_url", None, "", None)
MASK = OutputKind("mask", "_output_url_mask", "binary_mask", ".mask", "jpg")
WHITE_BACKGROUND = OutputKind("whitebg", "_output_url_whitebg", "white_background", ".whitebg", "jpg")
OUTPUT_KINDS: tuple[OutputKind, ...] = (CUTOUT, MASK, WHITE_BACKGROUND)
OUTPUT_KINDS_BY_NAME = {kind.name: kind for kind in OUTPUT_KINDS}


class RowStatus(IntEnum):
    """The status codes the pipeline itself gives a row (`removebg_status_code`); the API adds its own."""

    OK = 200
    NO_REFERENCE = 400
    BUDGET_REACHED = 402
    OUTPUT_EXPIRED = 410
    UNREADABLE_IMAGE = 422
    # nginx's "client closed request": the run itself was stopped (Ctrl-C, SIGTERM, Airflow's on_kill).
    STOPPED = 499
    BAD_OUTPUT = 502
    API_UNAVAILABLE = 503
    NOT_PROCESSED = 504
    OUTPUT_NOT_WRITTEN = 507


ColumnType = Literal["int32", "float32", "string", "timestamp", "string_list"]

STATUS_COLUMN = "removebg_status_code"
STATUS_TEXT_COLUMN = "removebg_status_text"
ERROR_COLUMN = "removebg_error"
FRACTION_COLUMN = "removebg_foreground_fraction"
FLAGS_COLUMN = "removebg_quality_flags"
SOURCE_FINGERPRINT_COLUMN = "removebg_source_fingerprint"
# The enriched manifest's result columns, in order, each with its type and the RowResult field it shows.
RESULT_COLUMNS: tuple[tuple[str, ColumnType, str], ...] = (
    (STATUS_COLUMN, "int32", "status_code"),
    (STATUS_TEXT_COLUMN, "string", "status_text"),
    (ERROR_COLUMN, "string", "error"),
    *((kind.column, "string", kind.name) for kind in OUTPUT_KINDS),
    ("removebg_width", "int32", "width"),
    ("removebg_height", "int32", "height"),
    ("removebg_request_id", "string", "request_id"),
    ("removebg_mode", "string", "mode"),
    ("removebg_attempts", "int32", "attempts"),
    ("removebg_processed_at", "timestamp", "processed_at"),
    (FRACTION_COLUMN, "float32", "foreground_fraction"),
    (FLAGS_COLUMN, "string_list", "quality_flags"),
    (SOURCE_FINGERPRINT_COLUMN, "string", "source_fingerprint"),
)
# How list cells (quality flags) are joined where a format has no lists (CSV).
FLAG_SEPARATOR = ";"
