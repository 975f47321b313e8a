"""A local server that speaks the Ximilar Remove Background API, for laptops, CI and self-hosting."""

from removebg_provider.server.app import create_app
from removebg_provider.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
