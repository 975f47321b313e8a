"""Airflow hooks of the Remove Background provider."""

from removebg_provider.hooks.removebg import RemoveBgHook

__all__ = ["RemoveBgHook"]
