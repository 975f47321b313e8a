"""The API's records: what is sent for each image, what comes back, and matching answers to inputs."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from removebg_provider.errors import ConfigurationError
from removebg_provider.vocabulary import (
    CUTOUT,
    IMAGE_FORMATS,
    MASK,
    OUTPUT_KINDS,
    WHITE_BACKGROUND,
    RowStatus,
)

# A record the API answered for without a usable result is reported like a bad gateway: the request
# itself went through, so nothing else in the batch is lost, and a later rerun may fix it.
BAD_RECORD_STATUS = RowStatus.BAD_OUTPUT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    """One image to process: an id of the caller's choosing and either a URL or the encoded bytes."""

    id: str
    url: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigurationError(f"an image record needs a non-empty string id, got {self.id!r}")
        given = [name for name, value in (("url", self.url), ("data", self.data)) if value]
        if len(given) != 1:
            found = " and ".join(given) if given else "neither"
            raise ConfigurationError(
                f"image record {self.id!r} needs exactly one of a non-empty url or data, got {found}"
            )


@dataclass(frozen=True)
class RemovalOptions:
    """What the API should produce for every record of a request."""

    binary_mask: bool = False
    white_background: bool = False
    image_format: str | None = None
    image_quality: int | None = None

    def __post_init__(self) -> None:
        if self.image_format is not None and self.image_format not in IMAGE_FORMATS:
            raise ConfigurationError(
                f"image_format must be one of {', '.join(IMAGE_FORMATS)} or unset, got {self.image_format!r}"
            )
        quality = self.image_quality
        if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int)):
            raise ConfigurationError(f"image_quality must be an integer from 1 to 100, got {quality!r}")
        if quality is not None and not 1 <= quality <= 100:
            raise ConfigurationError(f"image_quality must be from 1 to 100, got {quality}")


@dataclass(frozen=True)
class RecordResult:
    """The API's answer for one record, matched to the input record's id.

    `outputs` maps each output kind the API returned (`cutout`, `mask`, `whitebg`: see
    `vocabulary.OUTPUT_KINDS`) to its temporary URL.
    """

    id: str
    status_code: int
    status_text: str
    error: str | None
    outputs: Mapping[str, str]
    width: int | None
    height: int | None
    request_id: str | None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """True when the API processed the record (a 2xx record status)."""
        return 200 <= self.status_code < 300

    @property
    def output_url(self) -> str | None:
        """The cutout's temporary URL (`_output_url`)."""
        return self.outputs.get(CUTOUT.name)

    @property
    def output_url_mask(self) -> str | None:
        """The binary mask's temporary URL (`_output_url_mask`); same as `outputs["mask"]`."""
        return self.outputs.get(MASK.name)

    @property
    def output_url_whitebg(self) -> str | None:
        """The white-background image's temporary URL (`_output_url_whitebg`), as `outputs["whitebg"]`."""
        return self.outputs.get(WHITE_BACKGROUND.name)

    @classmethod
    def failure(
        cls,
        record_id: str,
        status_code: int,
        status_text: str,
        error: str,
        *,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> RecordResult:
        """A record the API did not process: no outputs and no size."""
        return cls(
            id=record_id,
            status_code=status_code,
            status_text=status_text,
            error=error,
            outputs={},
            width=None,
            height=None,
            request_id=request_id,
            attempts=attempts,
        )


def check_unique_ids(records: Sequence[ImageRecord]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ConfigurationError(
                f"image record id {record.id!r} appears twice; ids must be unique to match results"
            )
        seen.add(record.id)


def request_body(records: Sequence[ImageRecord], options: RemovalOptions) -> dict[str, Any]:
    items = []
    for record in records:
        item: dict[str, Any] = {"_id": record.id}
        if record.url is not None:
            item["_url"] = record.url
        else:
            item["_base64"] = base64.b64encode(record.data or b"").decode("ascii")
        for kind in OUTPUT_KINDS:
            if kind.request_flag is not None:
                item[kind.request_flag] = getattr(options, kind.request_flag)
        items.append(item)
    body: dict[str, Any] = {"records": items}
    if options.image_format is not None:
        body["image_format"] = options.image_format
    if options.image_quality is not None:
        body["image_quality"] = options.image_quality
    return body


def status_code(payload: Mapping[str, Any] | None) -> int | None:
    status = payload.get("status") if payload is not None else None
    return _int_or_none(status.get("code")) if isinstance(status, dict) else None


def status_text(payload: Mapping[str, Any] | None) -> str | None:
    status = payload.get("status") if payload is not None else None
    if not isinstance(status, dict):
        return None
    parts = [str(status[key]) for key in ("text", "error_description") if status.get(key)]
    return ": ".join(parts)[:500] or None


def match_results(
    records: Sequence[ImageRecord], payload: Mapping[str, Any], attempts: int
) -> list[RecordResult]:
    """Pair response records with inputs by echoed `_id`, else by position when the counts agree."""
    answered: list[Any] = payload["records"]
    index = {record.id: position for position, record in enumerate(records)}
    matched: list[Mapping[str, Any] | None] = [None] * len(records)
    leftovers: list[tuple[int, Any]] = []
    for position, item in enumerate(answered):
        echoed = item.get("_id") if isinstance(item, dict) else None
        if isinstance(echoed, str) and echoed in index and matched[index[echoed]] is None:
            matched[index[echoed]] = item
        else:
            leftovers.append((position, item))
    extras = []
    for position, item in leftovers:
        unclaimed_id = not isinstance(item, dict) or item.get("_id") not in index
        if (
            len(answered) == len(records)
            and isinstance(item, dict)
            and unclaimed_id
            and matched[position] is None
        ):
            matched[position] = item
        else:
            extras.append(position)
    if extras:
        log.warning(
            "The API response to %d record(s) held %d record(s) matching no input (positions %s); ignored",
            len(records),
            len(extras),
            extras,
        )
    request_id = _request_id(payload.get("status"))
    return [
        _record_result(record.id, item, request_id, attempts)
        if item is not None
        else RecordResult.failure(
            record.id,
            BAD_RECORD_STATUS,
            "missing",
            "missing from the API response",
            request_id=request_id,
            attempts=attempts,
        )
        for record, item in zip(records, matched, strict=True)
    ]


def _record_result(
    record_id: str, item: Mapping[str, Any], request_id: str | None, attempts: int
) -> RecordResult:
    status = item.get("_status")
    status = status if isinstance(status, dict) else {}
    request_id = _request_id(status) or request_id
    outputs = {
        kind.name: url for kind in OUTPUT_KINDS if (url := _str_or_none(item.get(kind.api_field))) is not None
    }
    code = _int_or_none(status.get("code"))
    if code is None and outputs:
        code = 200
    if code is None:
        return RecordResult.failure(
            record_id,
            BAD_RECORD_STATUS,
            "no result",
            "the API returned neither _status nor an output URL",
            request_id=request_id,
            attempts=attempts,
        )
    # The seed contract adds `_output_url_mask` beside `_output_url`; Ximilar's current documentation
    # says a binary-mask request gets the mask instead of the cutout. Either answer is a success.
    if 200 <= code < 300 and not outputs:
        return RecordResult.failure(
            record_id,
            BAD_RECORD_STATUS,
            "no result",
            "the API reported OK but returned no output URL",
            request_id=request_id,
            attempts=attempts,
        )
    text = _str_or_none(status.get("text")) or ("OK" if 200 <= code < 300 else f"HTTP {code}")
    error = None
    if not 200 <= code < 300:
        error = _str_or_none(status.get("error_description")) or text
    return RecordResult(
        id=record_id,
        status_code=code,
        status_text=text,
        error=error,
        outputs=outputs,
        width=_int_or_none(item.get("_width")),
        height=_int_or_none(item.get("_height")),
        request_id=request_id,
        attempts=attempts,
    )


def _request_id(status: Any) -> str | None:
    return _str_or_none(status.get("request_id")) if isinstance(status, dict) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None
