"""PipelineConfig: the one owner of every pipeline setting, with its type, default and help in one place.

CLI flags and operator fields are generated from the fields' metadata. Three settings can also come
from the API connection (its extras): `mode`, `max_records_per_request` and `concurrency`. Their
precedence is task option > connection extra > default, applied once by `PipelineConfig.resolved`;
the API client is then built from `client_settings()`, so the two always agree.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import string
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from removebg_provider.client import DEFAULT_CONCURRENCY, DEFAULT_MAX_RECORDS_PER_REQUEST, RemovalOptions
from removebg_provider.errors import ConfigurationError, StorageError
from removebg_provider.manifest import FORMATS
from removebg_provider.outputs import DEFAULT_OUTPUT_KEY_TEMPLATE, output_uri
from removebg_provider.storage import comparable_uri, join_uri, scheme_of
from removebg_provider.vocabulary import (
    CUTOUT,
    DEFAULT_IMAGE_FORMAT,
    DEFAULT_MODE,
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    MODES,
    OUTPUT_KINDS,
)

DEFAULT_MAX_MAP_LENGTH = 1024
# Settings a `removebg` connection may also give, with the default each takes when neither does.
CONNECTION_SETTINGS: dict[str, Any] = {
    "mode": DEFAULT_MODE,
    "max_records_per_request": DEFAULT_MAX_RECORDS_PER_REQUEST,
    "concurrency": DEFAULT_CONCURRENCY,
}


def _setting(default: Any, help: str, **cli: Any) -> Any:
    """A field with its help text; `cli` holds what the command line needs beyond the name and type.

    `flag` overrides `--field-name`, `aliases` adds other spellings, `choices` limits the values;
    `positional=True` makes it an argument, `required=True` a required flag.
    """
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides what a run produces; stored with the plan so every task agrees.

    Every field's meaning is its `help` metadata (`removebg run --help` and the operators' docs show
    it). `mode`, `max_records_per_request` and `concurrency` left as None take the connection's
    extra, else the default, in `resolved`.
    """

    manifest_uri: str = _setting(
        dataclasses.MISSING,
        "manifest URI or path (.parquet, .csv, .jsonl; s3://, gs://, az://, ...)",
        flag="manifest",
        positional=True,
    )
    output_prefix: str = _setting(
        dataclasses.MISSING, "where the cutouts are written (URI or folder)", required=True
    )
    output_manifest_uri: str = _setting(
        dataclasses.MISSING, "where the enriched manifest is written", flag="--output-manifest", required=True
    )
    staging_prefix: str | None = _setting(
        None, "where shards and checkpoints go (default: a job folder under the output prefix)"
    )
    manifest_format: str | None = _setting(
        None, "the manifest's format (default: from its extension)", choices=FORMATS
    )
    output_manifest_format: str | None = _setting(
        None, "the enriched manifest's format (default: from its extension)", choices=FORMATS
    )
    image_column: str = _setting("image_url", "column with image references (URLs, paths or URIs)")
    id_column: str | None = _setting(
        None, "column with unique row ids (default: derived from the image reference)"
    )
    mode: str | None = _setting(None, "API endpoint", choices=MODES)
    binary_mask: bool = _setting(False, "also store a binary mask ({id}.mask.jpg)")
    white_background: bool = _setting(False, "also store a white-background jpg ({id}.whitebg.jpg)")
    image_format: str | None = _setting(
        None, f"cutout format (default: {DEFAULT_IMAGE_FORMAT})", choices=IMAGE_FORMATS
    )
    image_quality: int | None = _setting(None, "cutout quality 1-100 (API default 85)")
    output_key_template: str = _setting(
        DEFAULT_OUTPUT_KEY_TEMPLATE, "object key of each output: {id}, {kind}, {suffix}, {ext}"
    )
    shard_size: int = _setting(1000, "rows per shard (one mapped task each on Airflow)")
    max_map_length: int = _setting(
        DEFAULT_MAX_MAP_LENGTH, "at most this many shards; shards grow to fit big manifests"
    )
    max_records_per_request: int | None = _setting(
        None,
        "records per API request",
        flag="--batch-size",
        aliases=("--max-records-per-request",),
    )
    concurrency: int | None = _setting(None, "API requests in flight")
    resume: bool = _setting(True, "reuse checkpointed results of an earlier run of the same job")
    skip_existing: bool = _setting(
        False,
        "deprecated alias of --cache: an existing output is kept only when the result store records "
        "that it was made from the same image content and options",
    )
    cache: bool = _setting(
        True,
        "serve rows whose image content and removal options already have a stored result from the "
        "result store, without a request (--no-cache sends every row)",
    )
    cache_prefix: str | None = _setting(
        None,
        "where the result store lives (default: <output prefix>/_removebg_cache); give several output "
        "prefixes one store to share it",
    )
    fingerprint_column: str | None = _setting(
        None,
        "column identifying each image's content, e.g. image_md5 or image_updated_at (default: the "
        "store's metadata, an http ETag, or a hash of the image)",
    )
    max_billable_records: int | None = _setting(None, "refuse to run past this many billed records")
    max_failed_fraction: float = _setting(
        0.05, "fail (exit 1) when more than this share of rows failed, after writing the enriched manifest"
    )
    max_image_bytes: int = _setting(
        20 << 20, "largest image read from storage, in bytes (larger rows get 422)"
    )
    quality_check: bool = _setting(
        True, "decode every output for the foreground fraction and quality flags (about 1 ms per 0.1 MP PNG)"
    )
    report: bool = _setting(True, "write the contact-sheet report next to the enriched manifest")
    report_sample: int = _setting(48, "tiles in the report, flagged and failed rows first")
    allow_private_urls: bool = _setting(
        False,
        "let the run's own requests for http(s) images (the HEAD that describes each for the result "
        "store, the report's tiles) reach loopback, private and reserved addresses (refused by default, "
        "as the local server refuses such a _url)",
    )

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigurationError("invalid pipeline configuration: " + "; ".join(problems))
        if self.skip_existing:
            warnings.warn(
                "skip_existing is deprecated: the result store (cache=True, the default) already keeps an "
                "output only when it was made from the same image content and options",
                FutureWarning,
                stacklevel=3,
            )

    @property
    def is_resolved(self) -> bool:
        """Whether every connection-level setting has a value (see `resolved`)."""
        return all(getattr(self, name) is not None for name in CONNECTION_SETTINGS)

    def resolved(self, connection: Mapping[str, Any] | None = None) -> PipelineConfig:
        """This config with each unset connection-level setting taken from `connection`, else its default."""
        connection = connection or {}
        filled = {
            name: next(v for v in (getattr(self, name), connection.get(name), default) if v is not None)
            for name, default in CONNECTION_SETTINGS.items()
        }
        return dataclasses.replace(self, **filled)

    @property
    def records_per_request(self) -> int:
        """The resolved `max_records_per_request`: records sent in one API request."""
        return self._resolved_count("max_records_per_request")

    @property
    def requests_in_flight(self) -> int:
        """The resolved `concurrency`: API requests in flight at once."""
        return self._resolved_count("concurrency")

    def _resolved_count(self, name: str) -> int:
        value = getattr(self, name)
        if value is None:
            raise ConfigurationError("resolve the pipeline configuration first: PipelineConfig.resolved()")
        return int(value)

    def client_settings(self) -> dict[str, Any]:
        """The API client's settings that this config owns; build the client with them."""
        if not self.is_resolved:
            raise ConfigurationError("resolve the pipeline configuration first: PipelineConfig.resolved()")
        return {name: getattr(self, name) for name in CONNECTION_SETTINGS}

    @property
    def staging(self) -> str:
        """Where shards, checkpoints and per-shard results live."""
        if self.staging_prefix:
            return self.staging_prefix.rstrip("/")
        job = hashlib.sha256(f"{self.manifest_uri}\n{self.output_manifest_uri}".encode()).hexdigest()[:16]
        return join_uri(self.output_prefix, f"_removebg_staging/{job}")

    @property
    def cutout_ext(self) -> str:
        """The cutout's file extension."""
        return IMAGE_EXTENSIONS[self.image_format or DEFAULT_IMAGE_FORMAT]

    @property
    def options(self) -> RemovalOptions:
        """What every request of this run asks the API for."""
        return RemovalOptions(
            binary_mask=self.binary_mask,
            white_background=self.white_background,
            image_format=self.image_format,
            image_quality=self.image_quality,
        )

    @functools.cached_property
    def output_kinds(self) -> tuple[str, ...]:
        """The kinds of output this run writes for every record (the cutout, and the mask if asked)."""
        # Cached (the settings never change): every served row asks, twice.
        return tuple(
            kind.name for kind in OUTPUT_KINDS if kind is CUTOUT or getattr(self, kind.request_flag or "")
        )

    def outputs_for(self, record_id: str) -> dict[str, str]:
        """The durable URIs this run writes for `record_id`, by output kind."""
        return {
            kind.name: output_uri(
                self.output_prefix,
                record_id,
                kind.name,
                kind.extension or self.cutout_ext,
                self.output_key_template,
            )
            for kind in OUTPUT_KINDS
            if kind.name in self.output_kinds
        }

    @property
    def store_prefix(self) -> str | None:
        """Where the result store lives, or None when the run does not use one (`cache=False`)."""
        if not self.cache:
            return None
        return (self.cache_prefix or join_uri(self.output_prefix, "_removebg_cache")).rstrip("/")

    def fingerprint(self, reference: str, source_fingerprint: str | None = None) -> str:
        """Identifies the work done for one image reference and content, so resume never reuses other work."""
        parts = (
            reference,
            source_fingerprint,
            self.mode,
            self.binary_mask,
            self.white_background,
            self.image_format,
            self.image_quality,
            self.output_prefix,
            self.output_key_template,
        )
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, as stored in the plan."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineConfig:
        """The config of `to_dict`; unknown keys (from other versions) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PipelineConfig:
        """A config from rendered option values: strings such as "true" or "8" become the field's type."""
        return cls(**{name: coerce_option(name, value) for name, value in options.items()})


FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(PipelineConfig)
REQUIRED_FIELDS = ("manifest_uri", "output_prefix", "output_manifest_uri")
# Object stores whose URIs name a bucket (or container), then a key.
_BUCKET_SCHEMES = ("s3", "gs", "az", "azure")
_QUERY_OR_FRAGMENT = frozenset("?#")
_TEMPLATE_FIELDS = {"id", "kind", "suffix", "ext"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def options_doc() -> str:
    """`:param:` lines for every setting, from the fields' help and defaults (for operator docs)."""
    lines = []
    for item in FIELDS:
        if item.name in CONNECTION_SETTINGS:
            default = f" (default: the connection's extra, else {CONNECTION_SETTINGS[item.name]!r})"
        else:
            default = "" if item.default is dataclasses.MISSING else f" (default {item.default!r})"
        lines.append(f"    :param {item.name}: {item.metadata['help']}{default}")
    return "\n".join(lines) + "\n"


def field_type(name: str) -> type:
    """The Python type of field `name`, without `| None` (str, int, float or bool)."""
    hint = typing.get_type_hints(PipelineConfig)[name]
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint]
    chosen: type = kinds[0]
    return chosen


def is_optional(name: str) -> bool:
    """Whether field `name` may be None."""
    return type(None) in typing.get_args(typing.get_type_hints(PipelineConfig)[name])


def coerce_option(name: str, value: Any) -> Any:
    """Turn a rendered string into the type of field `name`; ConfigurationError names the option."""
    if not isinstance(value, str):
        return value
    kind = field_type(name)
    text = value.strip()
    if is_optional(name) and text in ("", "None"):
        # An unset optional option renders as "None" or "".
        return None
    if kind is str:
        return value
    try:
        if kind is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError("expected true or false")
        return kind(text)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={value!r} is not a valid {kind.__name__}: {exc}") from exc


def _problems(config: PipelineConfig) -> list[str]:
    problems = []
    for item in FIELDS:
        choices = item.metadata.get("choices")
        value = getattr(config, item.name)
        if choices and value is not None and value not in choices:
            problems.append(f"{item.name} must be one of {', '.join(choices)}, not {value!r}")
    if config.image_quality is not None and not 1 <= config.image_quality <= 100:
        problems.append(f"image_quality must be within 1..100, not {config.image_quality}")
    counts = ("shard_size", "max_map_length", "max_records_per_request", "concurrency", "max_image_bytes")
    for name in (*counts, "report_sample"):
        value = getattr(config, name)
        if value is not None and value < 1:
            problems.append(f"{name} must be at least 1, not {value}")
    if not 0.0 <= config.max_failed_fraction <= 1.0:
        problems.append(f"max_failed_fraction must be within 0..1, not {config.max_failed_fraction}")
    if config.max_billable_records is not None and config.max_billable_records < 0:
        problems.append("max_billable_records must not be negative")
    for name in (*REQUIRED_FIELDS, "image_column"):
        if not getattr(config, name):
            problems.append(f"{name} must not be empty")
    if config.skip_existing and not config.cache:
        problems.append(
            "skip_existing (deprecated) is the result store's reuse; it cannot be combined with cache=False"
        )
    for name in ("output_prefix", "cache_prefix", "staging_prefix"):
        if (problem := _bucket_prefix_problem(getattr(config, name))) is not None:
            problems.append(f"{name} {problem}")
    template = config.output_key_template
    if scheme_of(config.output_prefix) in _BUCKET_SCHEMES and _QUERY_OR_FRAGMENT & set(template):
        problems.append(
            f"output_key_template {template!r} holds '?' or '#', which some clients read as a query or a "
            "fragment of the object store's URIs"
        )
    if comparable_uri(config.output_manifest_uri) == comparable_uri(config.manifest_uri):
        problems.append(
            f"output_manifest_uri is the input manifest {config.manifest_uri}; write the enriched "
            "manifest elsewhere (an input is never overwritten)"
        )
    if not problems:
        # Naming the outputs needs the other settings valid (the cutout's extension, the prefix).
        problems += _template_problems(config)
    return problems


def _bucket_prefix_problem(prefix: str | None) -> str | None:
    """Why an object store prefix names no one key prefix to every client, if so.

    `s3://b//out` is the key `/out/...` to smart_open's S3 reads and writes but `out/...` to a
    listing or a HEAD (GCS and Azure clients all drop that `/`); `?` and `#` are a query and a
    fragment to some clients and part of the key to others. Objects written there would never be
    found again: every run would bill them anew.
    """
    if not prefix or scheme_of(prefix) not in _BUCKET_SCHEMES:
        return None
    scheme, separator, rest = prefix.partition("://")
    if not separator:
        return f"{prefix} names no bucket: write it as {scheme}://bucket/folder"
    if scheme.lower() == "s3" and rest.partition("/")[2].rstrip("/").startswith("/"):
        return f"{prefix} has an empty folder name right after its bucket: write it with one '/'"
    if _QUERY_OR_FRAGMENT & set(prefix):
        return f"{prefix} holds '?' or '#', which some clients read as a query or a fragment"
    return None


def _template_problems(config: PipelineConfig) -> list[str]:
    """Why the output key template cannot name one distinct, safe object per row and output, if so."""
    template = config.output_key_template
    try:
        names = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        return [f"output_key_template {template!r} is not a valid template: {exc}"]
    unknown = sorted(names - _TEMPLATE_FIELDS)
    if unknown:
        return [f"output_key_template {template!r} uses {unknown}; it may use {sorted(_TEMPLATE_FIELDS)}"]
    if "id" not in names:
        return [f"output_key_template {template!r} must use {{id}}: every row would write one object"]
    try:
        keys = config.outputs_for("sku")
    except StorageError as exc:
        return [str(exc)]
    if len(set(keys.values())) < len(keys):
        return [
            f"output_key_template {template!r} gives two outputs of a row one key; use {{suffix}} or {{kind}}"
        ]
    return []
