"""Asking a running Dagster webserver to reload the code location, so that it builds the jobs of
newly published or activated versions (``publish --activate`` and ``activate`` do this when
``LIFECYCLE_DAGSTER_WEBSERVER_URL`` is set).

The request is Dagster's own GraphQL client (``dagster_graphql.DagsterGraphQLClient``,
``reload_repository_location``): the ``reloadRepositoryLocation`` mutation, which answers once
the location has loaded (or failed to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from lifecycle_dagster.settings import Settings

if TYPE_CHECKING:
    from dagster_graphql import DagsterGraphQLClient

#: the code location's name (pyproject's [tool.dagster] and workspace.yaml)
CODE_LOCATION = "lifecycle_dagster"
#: environment variable naming a running Dagster webserver, e.g. http://127.0.0.1:3000
WEBSERVER_URL_ENV = "LIFECYCLE_DAGSTER_WEBSERVER_URL"


@dataclass(frozen=True)
class ReloadOutcome:
    """The answer of :func:`reload_code_location`: ``ok`` and a one-line ``message`` saying what
    happened (on failure: why)."""

    ok: bool
    message: str


def _client(url: str, timeout_s: float) -> DagsterGraphQLClient:
    """Dagster's GraphQL client for the webserver at ``url`` (``http[s]://HOST[:PORT][/PREFIX]``).

    Raises:
        ValueError: ``url`` is not an http or https URL with a host.
    """
    from dagster_graphql import DagsterGraphQLClient

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL with a host (e.g. http://127.0.0.1:3000)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # an IPv6 address
    return DagsterGraphQLClient(
        host,
        port_number=parts.port,
        use_https=parts.scheme == "https",
        timeout=max(1, math.ceil(timeout_s)),  # whole seconds: the client's transport takes an int
        path_prefix=parts.path.rstrip("/"),
    )


def _reason(exc: BaseException, timeout_s: float) -> str:
    """Why a request failed: the socket's error when one is in the chain (``[Errno 111] Connection
    refused``, not the client's wrapper, which repeats the whole GraphQL document), else the first
    line of the client's message (``Server did not return a GraphQL result: ...``)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, TimeoutError) for e in seen):
        return f"no answer within {max(1, math.ceil(timeout_s))} s"
    for found in reversed(seen):  # the socket's own error, when there is one
        if isinstance(found, OSError) and str(found).strip():
            return str(found).strip().splitlines()[0]
    for found in seen:  # else the client's own words (not a stray StopIteration inside a JSON decoder)
        text = str(found).strip()
        if text and not isinstance(found, StopIteration):
            return text.splitlines()[0]
    return type(exc).__name__


def reload_code_location(url: str, location: str = CODE_LOCATION, timeout_s: float = 120.0) -> ReloadOutcome:
    """Ask the Dagster webserver at ``url`` (e.g. ``http://127.0.0.1:3000``) to reload
    ``location``, waiting at most ``timeout_s`` seconds (rounded up to whole seconds) for its
    answer, which comes once the location has loaded. Never raises: a bad URL, an unreachable
    server, an HTTP or GraphQL error or a location that failed to load is an outcome with
    ``ok=False`` and a message saying why.
    """
    from dagster_graphql import DagsterGraphQLClientError, ReloadRepositoryLocationStatus

    cannot = f"could not ask the Dagster webserver at {url} to reload"
    try:
        info = _client(url, timeout_s).reload_repository_location(location)
    except ValueError as exc:
        return ReloadOutcome(False, f"{cannot}: {exc}")
    except DagsterGraphQLClientError as exc:
        return ReloadOutcome(False, f"{cannot}: {_reason(exc, timeout_s)}")
    except (KeyError, TypeError) as exc:  # an answer of a type the client does not read (UnauthorizedError)
        return ReloadOutcome(False, f"the Dagster webserver at {url} refused the reload: unexpected answer ({exc!r})")
    if info.status == ReloadRepositoryLocationStatus.SUCCESS:
        return ReloadOutcome(True, f"code location '{location}' reloaded on {url}")
    first = (info.message or "").strip().splitlines()
    detail = first[0] if first else ""
    if info.failure_type == "PythonError":  # the location reloaded, but its code failed to load
        return ReloadOutcome(False, f"code location '{location}' reloaded on {url} but failed to load: {detail}")
    return ReloadOutcome(False, f"code location '{location}' was not reloaded on {url}: {info.failure_type}: {detail}")


def reload_hint() -> str:
    """How to make a running Dagster see new versions when :data:`WEBSERVER_URL_ENV` is unset."""
    return (
        "new versions appear in Dagster when the code location reloads: press Reload on the UI's"
        f" code locations page, or set {WEBSERVER_URL_ENV}=http://HOST:PORT (the dagster-webserver /"
        " `lifecycle-dagster dev` address) and publish or activate again to have it reloaded"
    )


def webserver_url() -> str | None:
    """:data:`WEBSERVER_URL_ENV`'s value, or ``None`` when unset or empty."""
    return Settings.from_env().webserver_url


__all__ = [
    "CODE_LOCATION",
    "WEBSERVER_URL_ENV",
    "ReloadOutcome",
    "reload_code_location",
    "reload_hint",
    "webserver_url",
]
