"""Specification of the provider metadata: valid for Airflow's schemas and visible to `airflow providers`."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import airflow
import jsonschema
import tomllib
from airflow.sdk import BaseOperatorLink
from packaging.requirements import Requirement

from removebg_provider.get_provider_info import get_provider_info
from removebg_provider.hooks.removebg import CONNECTION_EXTRAS, RemoveBgHook
from support import REPO_ROOT

AIRFLOW_DIR = Path(airflow.__file__).parent


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((AIRFLOW_DIR / name).read_text())
    return schema


def _connection_type() -> dict[str, Any]:
    (connection_type,) = get_provider_info()["connection-types"]
    return dict(connection_type)


def test_provider_info_is_valid_for_airflow() -> None:
    jsonschema.validate(get_provider_info(), _schema("provider_info.schema.json"))


def test_connection_type_is_valid_for_the_provider_yaml_schema() -> None:
    item_schema = _schema("provider.yaml.schema.json")["properties"]["connection-types"]

    jsonschema.validate([_connection_type()], item_schema)


def test_connection_type_points_at_the_hook() -> None:
    connection_type = _connection_type()
    module_name, class_name = connection_type["hook-class-name"].rsplit(".", 1)

    hook = getattr(importlib.import_module(module_name), class_name)

    assert hook is RemoveBgHook
    assert (connection_type["connection-type"], connection_type["hook-name"]) == (
        hook.conn_type,
        hook.hook_name,
    )


def test_connection_form_offers_every_extra_the_hook_reads() -> None:
    assert set(_connection_type()["conn-fields"]) == set(CONNECTION_EXTRAS)


def test_connection_form_defaults_are_accepted_by_the_hook() -> None:
    for name, field in _connection_type()["conn-fields"].items():
        if "default" in field["schema"]:
            CONNECTION_EXTRAS[name](field["schema"]["default"])


def test_extra_links_are_operator_link_classes() -> None:
    for name in get_provider_info()["extra-links"]:
        module_name, class_name = name.rsplit(".", 1)

        link = getattr(importlib.import_module(module_name), class_name)

        assert issubclass(link, BaseOperatorLink)


def test_package_name_matches_the_distribution() -> None:
    assert get_provider_info()["package-name"] == "airflow-provider-removebg"


def test_the_airflow_requirement_starts_where_airflow_reads_the_declarative_connection_form() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (airflow_requirement,) = [
        Requirement(line) for line in project["dependencies"] if Requirement(line).name == "apache-airflow"
    ]

    # The form is `conn-fields` in the provider info alone (no get_ui_field_behaviour): Airflow 3.2+.
    assert "get_connection_form_widgets" not in vars(RemoveBgHook)
    assert "3.1.9" not in airflow_requirement.specifier
    assert "3.2.0" in airflow_requirement.specifier
    assert airflow.__version__ in airflow_requirement.specifier


def _airflow_cli(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    listing: list[dict[str, Any]] = json.loads(completed.stdout)
    return listing


def test_airflow_providers_list_shows_the_package(tmp_path: Path) -> None:
    packages = [entry["package_name"] for entry in _airflow_cli(tmp_path, "providers", "list")]

    assert "airflow-provider-removebg" in packages


def test_airflow_registers_the_removebg_connection_type(tmp_path: Path) -> None:
    hooks = {entry["connection_type"]: entry for entry in _airflow_cli(tmp_path, "providers", "hooks")}

    assert hooks["removebg"]["class"] == "removebg_provider.hooks.removebg.RemoveBgHook"
    assert hooks["removebg"]["package_name"] == "airflow-provider-removebg"


def test_airflow_registers_the_report_link(tmp_path: Path) -> None:
    links = [entry["extra_link_class_name"] for entry in _airflow_cli(tmp_path, "providers", "links")]

    assert "removebg_provider.operators.links.RemoveBackgroundReportLink" in links
