"""Parse and validate a removebg request body into jobs, one per record, before any work starts."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from removebg_provider.server.errors import RequestRejected
from removebg_provider.server.imaging import ImageFormat

OPTION_FIELDS = ("image_format", "image_quality", "binary_mask", "white_background")
REQUEST_FIELDS = ("records", *OPTION_FIELDS)

_FORMATS: dict[str, ImageFormat] = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True)
class OutputOptions:
    """What to produce for one record; a record's own fields override the request's."""

    image_format: ImageFormat = "png"
    image_quality: int = 85
    binary_mask: bool = False
    white_background: bool = False


@dataclass(frozen=True)
class RecordJob:
    """One record to process: where its image comes from, what to output, and what to echo back.

    `problem` is set when the record cannot be processed at all (no image data, wrong field type);
    it becomes that record's own 400 status, never the request's.
    """

    record_id: Any
    echo: dict[str, Any]
    base64_data: str | None
    url: str | None
    options: OutputOptions
    problem: str | None


def parse_request(body: bytes, max_records: int) -> list[RecordJob]:
    """The jobs of a request body, or a 400 `RequestRejected` naming what is wrong with it."""
    try:
        document = json.loads(body, parse_constant=_NonFinite, parse_float=_finite_or_marker)
        # Records echo their fields back, and a value JSON cannot carry would fail the answer after
        # the records were billed; so the whole request is refused here, before any work.
        unanswerable = _unanswerable(document, "")
    except (ValueError, RecursionError) as error:
        raise RequestRejected(400, f"the request body is not valid JSON: {error}") from error
    if unanswerable is not None:
        raise RequestRejected(400, unanswerable)
    if not isinstance(document, dict):
        raise RequestRejected(400, "the request body must be a JSON object with a 'records' list")
    unknown = sorted(set(document) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestRejected(
            400, f"unknown request field(s) {', '.join(unknown)}; allowed: {', '.join(REQUEST_FIELDS)}"
        )
    records = document.get("records")
    if not isinstance(records, list) or not records:
        raise RequestRejected(400, "'records' must be a non-empty list of record objects")
    if len(records) > max_records:
        raise RequestRejected(
            400, f"{len(records)} records sent; this server accepts at most {max_records} per request"
        )
    defaults = _options(document, OutputOptions(), "the request")
    jobs = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RequestRejected(400, f"records[{index}] must be a JSON object")
        jobs.append(_job(record, _options(record, defaults, f"records[{index}]")))
    return jobs


def _job(record: dict[str, Any], options: OutputOptions) -> RecordJob:
    base64_data = record.get("_base64")
    url = record.get("_url")
    problem = None
    if base64_data is not None and not isinstance(base64_data, str):
        problem = "_base64 must be a string of base64-encoded image bytes"
    elif url is not None and not isinstance(url, str):
        problem = "_url must be a string"
    elif not base64_data and not url:
        problem = "the record has no image: give it a '_base64' or a '_url' field"
    echo = {key: value for key, value in record.items() if key != "_base64"}
    record_id = record["_id"] if record.get("_id") is not None else str(uuid.uuid4())
    return RecordJob(
        record_id=record_id,
        echo=echo,
        base64_data=base64_data if isinstance(base64_data, str) and base64_data else None,
        url=url if isinstance(url, str) and url else None,
        options=options,
        problem=problem,
    )


class _NonFinite(str):
    """What json.loads made of `NaN`, `Infinity`, `-Infinity` or an overflowing number like `1e400`.

    Python's json accepts these, but they are not JSON numbers (RFC 8259) and cannot be answered.
    """


def _finite_or_marker(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _unanswerable(value: Any, path: str) -> str | None:
    """Why `value` (at `path`) cannot be echoed in a JSON answer, or None when it can."""
    if isinstance(value, _NonFinite):
        return f"{path or 'the body'} is {value}, which is not a finite JSON number; send a string instead"
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path or 'the body'} holds an unpaired surrogate escape (\\ud800-\\udfff), not text"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _unanswerable(key, f"a key of {path or 'the body'}") or _unanswerable(
                item, f"{path}.{key}" if path else str(key)
            )
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problem = _unanswerable(item, f"{path}[{index}]")
            if problem is not None:
                return problem
    return None


def _options(fields: dict[str, Any], defaults: OutputOptions, where: str) -> OutputOptions:
    image_format = defaults.image_format
    if fields.get("image_format") is not None:
        value = fields["image_format"]
        if not isinstance(value, str) or value.lower() not in _FORMATS:
            raise RequestRejected(400, f"{where}: image_format must be one of png, jpg, webp; got {value!r}")
        image_format = _FORMATS[value.lower()]
    quality = defaults.image_quality
    if fields.get("image_quality") is not None:
        value = fields["image_quality"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
            raise RequestRejected(
                400, f"{where}: image_quality must be an integer from 1 to 100; got {value!r}"
            )
        quality = value
    return OutputOptions(
        image_format=image_format,
        image_quality=quality,
        binary_mask=_flag(fields, "binary_mask", defaults.binary_mask, where),
        white_background=_flag(fields, "white_background", defaults.white_background, where),
    )


def _flag(fields: dict[str, Any], name: str, default: bool, where: str) -> bool:
    value = fields.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestRejected(400, f"{where}: {name} must be true or false; got {value!r}")
    return value
