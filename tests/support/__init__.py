"""Test support: real servers on 127.0.0.1 (API, stores, fault proxy, Airflow) and shared factories."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
