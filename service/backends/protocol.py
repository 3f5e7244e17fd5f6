"""What the front door needs from the workers, whatever runs them.

`ServeBackend` (service/backends/serve.py) calls Ray Serve deployment handles;
`LocalBackend` (service/backends/local.py) runs the same pipeline in this process. Both
raise only `workers.errors` types, which service/errors.py maps to statuses.
"""
from __future__ import annotations

from typing import Protocol

from workers.spec import ExplainResult, ExplainSpec, ModelDescription


class ExplainBackend(Protocol):
    async def models(self) -> list[ModelDescription]:
        """Every configured model, the default one flagged."""

    async def explain(self, spec: ExplainSpec) -> ExplainResult:
        """Runs one validated request; raises `workers.errors.AttributionError` subtypes."""

    async def close(self) -> None:
        """Releases whatever the backend holds; idempotent."""
