"""The local server's configuration as one validated, frozen value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from removebg_provider.client import DEFAULT_CONCURRENCY, DEFAULT_MAX_RECORDS_PER_REQUEST
from removebg_provider.engines import ENGINE_NAMES, MODES, Mode

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Everything `create_app` needs besides the engine; `removebg serve --help` documents each field.

    `storage_dir=None` means a fresh private folder per start; `max_pixels_in_flight=None` means
    `workers x max_image_pixels` (see `pixels_in_flight`).
    """

    storage_dir: Path | None = None
    token: str | None = field(default=None, repr=False)
    public_url: str | None = None
    engine: str | None = None  # both modes' engine: onnx when `model` is set, else classic
    fast_engine: str | None = None  # overrides `engine` for /removebg/fast
    precise_engine: str | None = None  # overrides `engine` for /removebg/precise
    model: str | None = None  # a model name (`removebg models list`) or the path of a .onnx file
    model_preset: str | None = None
    model_home: Path | None = None  # the model cache; None: `model_store.model_home()`
    workers: int = 2
    ttl_hours: float = 24.0
    max_records: int = 10
    allow_private_urls: bool = False
    max_body_bytes: int = 64 * MIB
    max_image_bytes: int = 20 * MIB
    max_image_pixels: int = 50_000_000
    # Admit at once everything a client at its defaults has in flight (requests x records each), so a
    # run at defaults against a server at defaults is never told it is busy.
    queue_records: int = DEFAULT_CONCURRENCY * DEFAULT_MAX_RECORDS_PER_REQUEST
    retry_after_seconds: int = 5
    credits: int | None = None  # the local account's credits; None: unlimited
    fetch_timeout_seconds: float = 20.0
    max_redirects: int = 5
    max_pixels_in_flight: int | None = None
    max_connections: int = 500
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 120.0
    keep_alive_seconds: int = 5

    def __post_init__(self) -> None:
        if self.storage_dir is not None:
            object.__setattr__(self, "storage_dir", Path(self.storage_dir))
        if self.engine is None:
            object.__setattr__(self, "engine", "onnx" if self.model else "classic")
        if self.public_url is not None:
            object.__setattr__(self, "public_url", self.public_url.rstrip("/"))
        for problem in self._problems():
            raise ValueError(problem)

    @property
    def ttl_seconds(self) -> float:
        """How long an output file stays downloadable."""
        return self.ttl_hours * 3600.0

    @property
    def engine_names(self) -> dict[Mode, str]:
        """The engine each mode uses."""
        chosen = {"fast": self.fast_engine, "precise": self.precise_engine}
        return {mode: chosen[mode] or str(self.engine) for mode in MODES}

    @property
    def pixels_in_flight(self) -> int:
        """Most decoded pixels held at once; by default every worker may hold a largest image."""
        if self.max_pixels_in_flight is not None:
            return self.max_pixels_in_flight
        return self.workers * self.max_image_pixels

    def _problems(self) -> list[str]:
        problems: list[str] = []
        positive = {
            "workers": self.workers,
            "ttl_hours": self.ttl_hours,
            "max_records": self.max_records,
            "max_body_bytes": self.max_body_bytes,
            "max_image_bytes": self.max_image_bytes,
            "max_image_pixels": self.max_image_pixels,
            "queue_records": self.queue_records,
            "retry_after_seconds": self.retry_after_seconds,
            "fetch_timeout_seconds": self.fetch_timeout_seconds,
            "max_connections": self.max_connections,
            "header_timeout_seconds": self.header_timeout_seconds,
            "body_timeout_seconds": self.body_timeout_seconds,
            "keep_alive_seconds": self.keep_alive_seconds,
        }
        problems += [
            # `not > 0` also refuses NaN, which compares false with everything.
            f"{name} must be positive, got {value}"
            for name, value in positive.items()
            if not value > 0
        ]
        if self.credits is not None and self.credits < 0:
            problems.append(f"credits must be 0 or more (or unset: unlimited), got {self.credits}")
        if self.max_redirects < 0:
            problems.append(f"max_redirects must be 0 or more, got {self.max_redirects}")
        if self.pixels_in_flight < self.max_image_pixels:
            # An image at the pixel limit must fit into an empty budget, or it could never be decoded.
            problems.append(
                f"max_pixels_in_flight ({self.pixels_in_flight}) must be at least "
                f"max_image_pixels ({self.max_image_pixels})"
            )
        if self.queue_records < self.max_records:
            # A full-size batch must always fit into an empty queue, or it could never be admitted.
            problems.append(
                f"queue_records ({self.queue_records}) must be at least max_records ({self.max_records})"
            )
        problems += self._engine_problems()
        if self.token is not None and not self.token.strip():
            problems.append("the token is empty; pass a non-empty token or none at all")
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                problems.append(
                    f"public_url must be an http(s) URL like https://host[:port], got {self.public_url!r}"
                )
        return problems

    def _engine_problems(self) -> list[str]:
        names = self.engine_names
        unknown = sorted({name for name in names.values() if name not in ENGINE_NAMES})
        if unknown:
            return [f"unknown engine {', '.join(unknown)}; choose one of {', '.join(ENGINE_NAMES)}"]
        uses_model = "onnx" in names.values()
        if uses_model and not self.model:
            return [
                "the onnx engine needs a model: --model NAME (see `removebg models list`) or --model PATH"
            ]
        if not uses_model and (self.model or self.model_preset):
            return ["a model is given but no mode uses the onnx engine; drop --model or choose --engine onnx"]
        return []
