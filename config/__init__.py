"""Typed settings of the attribution pipeline (defaults live in config.yaml)."""

from config.errors import SettingsError
from config.settings import (
    PROJECT_ROOT,
    ApiSettings,
    LocalModelSettings,
    Settings,
    load_settings,
)

__all__ = [
    "PROJECT_ROOT",
    "ApiSettings",
    "LocalModelSettings",
    "Settings",
    "SettingsError",
    "load_settings",
]
