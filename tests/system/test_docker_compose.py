"""docker/compose.yaml names only things that exist: services, files, images' entry points, commands, options.

No Docker engine runs on these machines, so the compose file is never started here. Instead its
every reference is checked against what it points at: build contexts, Dockerfiles, COPY sources,
mounted folders and env files in the repository; Airflow commands against the Airflow CLI's own
parser (with the CeleryExecutor configured, as in the containers); `removebg serve` options against
its `--help`; `AIRFLOW__SECTION__KEY` settings against Airflow's configuration reference; and the
external images against the entry points their official documentation describes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import airflow
import pytest
import yaml

from removebg_provider.example_dags.catalog_remove_background import POOL
from support import REPO_ROOT
from support.airflow_deployment import CELERY_RECOVERY_SETTINGS

ROOT = REPO_ROOT
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
BIN = Path(sys.executable).parent
AIRFLOW_IMAGE_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-cli",
)
# The external images, and the first argument their documentation expects (None: the image's default).
DOCUMENTED_ENTRY_POINTS: dict[str, str | None] = {
    "postgres": None,
    "redis": None,
    "minio/minio": "server",
    "minio/mc": None,
}
# Runs in a fresh interpreter configured like the containers; prints what it could not resolve.
_AIRFLOW_CHECK = """
import contextlib, importlib, io, json, sys
from airflow.configuration import conf
from airflow.cli.cli_parser import get_parser

request = json.loads(sys.argv[1])
bad_commands = []
for argv in request["commands"]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            get_parser().parse_args(argv)
        except SystemExit:
            bad_commands.append({"argv": argv, "error": err.getvalue()[-300:]})
conf.load_providers_configuration()
known = {(s.upper(), o.upper()) for s, d in conf.configuration_description.items() for o in d["options"]}
unknown = [name for name in request["settings"] if tuple(name.split("__")[1:3]) not in known]
missing = []
for target in request["objects"]:
    module, _, attribute = target.partition(":")
    try:
        getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        missing.append(f"{target}: {exc}")
print(json.dumps({"bad_commands": bad_commands, "unknown_settings": unknown, "missing_objects": missing}))
"""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def env_files(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Every env file a service names, parsed as compose reads it."""
    names = {name for service in services.values() for name in _as_list(service.get("env_file"))}
    return {name: _read_env_file(DOCKER / name) for name in names if (DOCKER / name).is_file()}


@pytest.fixture(scope="module")
def airflow_check(
    services: dict[str, dict[str, Any]],
    env_files: dict[str, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[Any]]:
    """The Airflow commands, settings and Celery app of the compose file, resolved by Airflow itself."""
    environment = services["airflow-scheduler"]["environment"]
    settings = [name for name in environment if name.startswith("AIRFLOW__")]
    settings += [name for values in env_files.values() for name in values if name.startswith("AIRFLOW__")]
    request = {
        "commands": [argv for _, argv in _airflow_commands(services)],
        "settings": sorted(set(settings)),
        "objects": [_celery_app(services["airflow-worker"])],
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env["AIRFLOW_HOME"] = str(tmp_path_factory.mktemp("airflow-home"))
    env["AIRFLOW__CORE__EXECUTOR"] = environment["AIRFLOW__CORE__EXECUTOR"]
    result = subprocess.run(
        [sys.executable, "-c", _AIRFLOW_CHECK, json.dumps(request)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    checked: dict[str, list[Any]] = json.loads(result.stdout.strip().splitlines()[-1])
    return checked


def test_compose_runs_the_celery_executor_with_every_airflow_component(
    services: dict[str, dict[str, Any]],
) -> None:
    wanted = {
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-worker",
    }
    assert wanted <= set(services)
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_compose_starts_at_least_two_celery_workers(services: dict[str, dict[str, Any]]) -> None:
    assert services["airflow-worker"]["command"] == "celery worker"
    assert services["airflow-worker"]["deploy"]["replicas"] >= 2


def test_compose_runs_postgres_redis_an_s3_store_and_the_local_api_server(
    services: dict[str, dict[str, Any]],
) -> None:
    images = {str(service.get("image", "")).split(":")[0] for service in services.values()}
    assert {"postgres", "redis", "minio/minio"} <= images
    assert _removebg_argv(services["removebg-server"])[:1] == ["serve"]


def test_every_build_context_and_dockerfile_exists(services: dict[str, dict[str, Any]]) -> None:
    builds = [service["build"] for service in services.values() if "build" in service]
    assert builds
    for build in builds:
        context = (DOCKER / build["context"]).resolve()
        assert context.is_dir(), context
        assert (context / build["dockerfile"]).is_file(), build


def test_dockerfile_copies_only_files_that_exist(services: dict[str, dict[str, Any]]) -> None:
    build = services["airflow-scheduler"]["build"]
    context = (DOCKER / build["context"]).resolve()
    sources = _copy_sources((context / build["dockerfile"]).read_text())
    assert sources
    missing = [source for source in sources if not (context / source).exists()]
    assert missing == [], f"COPY sources missing from the build context {context}"


def test_dockerfile_builds_on_the_official_image_of_the_installed_airflow() -> None:
    base = re.search(r"^ARG AIRFLOW_IMAGE=(\S+)$", (DOCKER / "Dockerfile").read_text(), re.MULTILINE)
    assert base is not None
    assert base.group(1) == f"apache/airflow:{airflow.__version__}-python3.11"


def test_every_mounted_local_path_exists(services: dict[str, dict[str, Any]]) -> None:
    mounts = [
        volume.split(":")[0]
        for service in services.values()
        for volume in service.get("volumes", [])
        if volume.startswith(".")
    ]
    assert mounts
    assert [mount for mount in mounts if not (DOCKER / mount).exists()] == []


def test_every_env_file_exists(services: dict[str, dict[str, Any]]) -> None:
    names = {name for service in services.values() for name in _as_list(service.get("env_file"))}
    assert names
    assert sorted(name for name in names if not (DOCKER / name).is_file()) == []


def test_every_named_volume_is_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    named = {
        volume.split(":")[0]
        for service in services.values()
        for volume in service.get("volumes", [])
        if not volume.startswith((".", "/"))
    }
    assert named <= set(compose["volumes"])


def test_every_dependency_is_a_service(services: dict[str, dict[str, Any]]) -> None:
    dependencies = {name for service in services.values() for name in service.get("depends_on", {})}
    assert dependencies <= set(services)


def test_airflow_commands_parse_with_the_airflow_cli(airflow_check: dict[str, list[Any]]) -> None:
    assert airflow_check["bad_commands"] == []


def test_airflow_settings_name_real_configuration_options(airflow_check: dict[str, list[Any]]) -> None:
    assert airflow_check["unknown_settings"] == []


def test_worker_healthcheck_names_the_celery_app_of_the_installed_provider(
    airflow_check: dict[str, list[Any]],
) -> None:
    assert airflow_check["missing_objects"] == []


def test_every_airflow_service_command_is_checked(services: dict[str, dict[str, Any]]) -> None:
    checked = {name for name, _ in _airflow_commands(services)}
    assert checked == {name for name in AIRFLOW_IMAGE_SERVICES if name != "airflow-cli"}


def test_removebg_serve_options_exist_in_its_help(services: dict[str, dict[str, Any]]) -> None:
    server = services["removebg-server"]
    assert server["entrypoint"] == ["removebg"]
    argv = _removebg_argv(server)
    help_text = subprocess.run(
        [str(BIN / "removebg"), *argv[:1], "--help"], capture_output=True, text=True, check=True
    ).stdout
    options = [token for token in argv if token.startswith("--")]
    assert options
    assert [option for option in options if option not in help_text.split()] == []


def test_removebg_server_uses_the_airflow_image(services: dict[str, dict[str, Any]]) -> None:
    assert services["removebg-server"]["build"] == services["airflow-scheduler"]["build"]


def test_external_images_are_pinned_and_use_their_documented_entry_points(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if "build" in service:
            continue
        repository, _, tag = service["image"].partition(":")
        assert repository in DOCUMENTED_ENTRY_POINTS, name
        assert tag, f"{name}: pin a tag"
        assert tag != "latest", name
        expected = DOCUMENTED_ENTRY_POINTS[repository]
        if expected is not None:
            assert _as_list(service.get("command"))[:1] == [expected], name


def test_connection_reaches_the_local_server_with_its_token(
    services: dict[str, dict[str, Any]], env_files: dict[str, dict[str, str]]
) -> None:
    values = env_files["removebg.env"]
    connection = json.loads(values["AIRFLOW_CONN_REMOVEBG_DEFAULT"])
    argv = _removebg_argv(services["removebg-server"])
    host = urlsplit(connection["host"])
    assert connection["conn_type"] == "removebg"
    assert connection["password"] == values["REMOVEBG_SERVER_TOKEN"]
    assert host.hostname == "removebg-server"
    assert str(host.port) == argv[argv.index("--port") + 1]
    assert argv[argv.index("--public-url") + 1] == connection["host"]


def test_connection_shares_its_request_budget_through_the_compose_redis(
    services: dict[str, dict[str, Any]], env_files: dict[str, dict[str, str]]
) -> None:
    extra = json.loads(env_files["removebg.env"]["AIRFLOW_CONN_REMOVEBG_DEFAULT"])["extra"]
    redis_url = urlsplit(extra["rate_limit_redis_url"])
    broker = urlsplit(services["airflow-worker"]["environment"]["AIRFLOW__CELERY__BROKER_URL"])
    assert extra["requests_per_minute"] > 0
    assert (redis_url.scheme, redis_url.hostname) == ("redis", "redis")
    assert redis_url.path != broker.path, "the budget keeps its keys out of the broker's database"


def test_compose_sets_every_setting_the_distributed_tier_relies_on_for_worker_loss(
    services: dict[str, dict[str, Any]],
) -> None:
    environment = services["airflow-worker"]["environment"]
    assert set(CELERY_RECOVERY_SETTINGS) <= set(environment)
    assert (
        environment["AIRFLOW__CELERY__TASK_ACKS_LATE"]
        == CELERY_RECOVERY_SETTINGS["AIRFLOW__CELERY__TASK_ACKS_LATE"]
    )


def test_store_credentials_are_the_s3_stores_account(env_files: dict[str, dict[str, str]]) -> None:
    values = env_files["minio.env"]
    assert values["AWS_ACCESS_KEY_ID"] == values["MINIO_ROOT_USER"]
    assert values["AWS_SECRET_ACCESS_KEY"] == values["MINIO_ROOT_PASSWORD"]
    assert urlsplit(values["AWS_ENDPOINT_URL"]).hostname == "minio"


def test_every_airflow_container_loads_the_connection_and_store_credentials(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in AIRFLOW_IMAGE_SERVICES:
        assert {"airflow.env", "removebg.env", "minio.env"} <= set(_as_list(services[name]["env_file"])), name


def test_execution_api_url_points_at_the_api_server(services: dict[str, dict[str, Any]]) -> None:
    url = urlsplit(services["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    published = services["airflow-apiserver"]["ports"][0].split(":")[-1]
    assert (url.hostname, str(url.port), url.path) == ("airflow-apiserver", published, "/execution/")


def test_init_creates_the_pool_the_example_dag_uses(services: dict[str, dict[str, Any]]) -> None:
    pools = [
        argv
        for name, argv in _airflow_commands(services)
        if name == "airflow-init" and argv[:2] == ["pools", "set"]
    ]
    assert [argv[2] for argv in pools] == [POOL]


def test_seed_script_writes_photos_and_a_manifest_of_them(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(DOCKER / "seed_demo.py"),
            str(tmp_path),
            "--date",
            "2025-01-15",
            "--photos",
            "3",
            "--size",
            "64",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    manifest = tmp_path / "manifests" / "2025-01-15" / "products.csv"
    with manifest.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert str(manifest) in result.stdout
    assert [row["sku"] for row in rows] == ["SKU-00000", "SKU-00001", "SKU-00002"]
    assert all(Path(row["image_url"]).is_file() for row in rows)


def _airflow_commands(services: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(service, argv after `airflow`) for every Airflow command a service runs or health-checks with."""
    found: list[tuple[str, list[str]]] = []
    for name in AIRFLOW_IMAGE_SERVICES:
        service = services[name]
        command = service.get("command")
        argv = shlex.split(command) if isinstance(command, str) else list(command or [])
        if argv[:2] == ["bash", "-c"]:
            found += [(name, words[1:]) for words in _shell_commands(argv[2]) if words[:1] == ["airflow"]]
        elif argv and argv[0] != "bash":
            found.append((name, argv))
        test = _as_list(service.get("healthcheck", {}).get("test"))
        if test[:1] == ["CMD-SHELL"]:
            found += [(name, words[1:]) for words in _shell_commands(test[1]) if words[:1] == ["airflow"]]
    return found


def _celery_app(worker: dict[str, Any]) -> str:
    words = shlex.split(worker["healthcheck"]["test"][1])
    module = words[words.index("--app") + 1]
    package, _, attribute = module.rpartition(".")
    return f"{package}:{attribute}"


def _removebg_argv(service: dict[str, Any]) -> list[str]:
    return [str(word) for word in _as_list(service.get("command"))]


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a `&&`-joined shell line, with compose's `$$` unescaped."""
    return [shlex.split(part.replace("$$", "$")) for part in script.split("&&")]


def _copy_sources(dockerfile: str) -> list[str]:
    sources: list[str] = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            arguments = [word for word in words[1:] if not word.startswith("--")]
            sources += arguments[:-1]
    return sources


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads them: comments and blank lines skipped, one pair of quotes removed."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
