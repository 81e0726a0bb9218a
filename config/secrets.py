"""The IHC API key: never a setting or a parameter, never logged, never written anywhere."""

from __future__ import annotations

import logging
import os

from pydantic import SecretStr

logger = logging.getLogger(__name__)

API_KEY_ENV = "IHC_API_KEY"
SECRET_BLOCK = "ihc-api-key"


def resolve_api_key() -> SecretStr | None:
    """The IHC API key: ``IHC_API_KEY``, else the Prefect Secret block ``ihc-api-key``.

    The block is only asked for when a Prefect API is known to be there (a
    ``PREFECT_API_URL`` or a running flow or task), so a run without one does not start
    a temporary server just to look. A missing block means no key; a block that cannot
    be read is logged as a warning (without the value) and also means no key.
    """
    value = os.environ.get(API_KEY_ENV, "").strip()
    if value:
        return SecretStr(value)
    from prefect.blocks.system import Secret
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import get_current_settings

    if not (get_current_settings().api.url or FlowRunContext.get() or TaskRunContext.get()):
        return None
    try:
        block = Secret.load(SECRET_BLOCK, _sync=True)
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            logger.warning("Prefect Secret block '%s' could not be read: %s", SECRET_BLOCK, exc)
        return None
    except Exception as exc:
        logger.warning(
            "Prefect Secret block '%s' could not be read (%s)", SECRET_BLOCK, type(exc).__name__
        )
        return None
    secret = str(block.get()).strip()
    return SecretStr(secret) if secret else None
