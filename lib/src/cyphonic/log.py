"""Structured key/value logging for every component (structlog over the stdlib).

Attach the node FQDN or connection ID as fields (``log.bind(fqdn=...)``); never log secrets.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(level: str = "info", fmt: str = "console") -> None:
    """Configure logging once per process; ``fmt`` is ``console`` or ``json``."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(component: str, **fields: Any) -> Any:
    """A logger with ``component`` and any given fields bound.

    Lazy: safe to create at import time, before ``configure`` runs.
    """
    return structlog.get_logger(component=component, **fields)
