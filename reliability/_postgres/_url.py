"""PostgreSQL URLs: which server they name, and their printable form (password masked).

The password (in the URL's user part, in a ``password=`` query parameter, or in
``PGPASSWORD``) never appears in a log line, error, repr or report: everything shown goes
through ``mask_url`` or ``scrub``.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field

from .._errors import ConfigurationError

__all__ = ["DatabaseURL", "is_postgres_url", "mask_url", "parse_url", "scrub", "url_passwords"]

SCHEMES = ("postgresql", "postgres")
MASK = "***"


def is_postgres_url(url: str) -> bool:
    """True if ``url`` selects the PostgreSQL store."""
    return url.split(":", 1)[0].lower() in SCHEMES


def mask_url(url: str) -> str:
    """``url`` with its password (user part and ``password=`` parameter) replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, hosts = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":" + MASK
            netloc = f"{userinfo}@{hosts}"
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        masked_query = "&".join(
            f"{key}={MASK if key.lower() == 'password' else urllib.parse.quote(value)}"
            for key, value in query)
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, masked_query, ""))
    except ValueError:
        return f"{url.split(':', 1)[0]}://{MASK}"  # unparsable: show nothing of it


def _passwords(url: str) -> list[str]:
    found = []
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            found += [parts.password, urllib.parse.unquote(parts.password)]
        for key, value in urllib.parse.parse_qsl(parts.query):
            if key.lower() == "password" and value:
                found += [value, urllib.parse.quote(value)]
    except ValueError:
        pass
    environment = os.environ.get("PGPASSWORD")
    if environment:
        found.append(environment)
    # Longest first: a password containing another is replaced whole.
    return sorted({p for p in found if p}, key=len, reverse=True)


def url_passwords(url: str) -> list[str]:
    """Every form of the password ``url`` (or ``PGPASSWORD``) carries, longest first: what
    log and error redaction must replace."""
    return _passwords(url)


def scrub(text: str, url: str) -> str:
    """``text`` (an error message, say) with every form of the password replaced by ***."""
    for password in _passwords(url):
        text = text.replace(password, MASK)
    return text


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed ``postgresql://`` URL. ``str()`` and ``repr()`` show it masked; ``secret``
    is the URL itself, for the driver only."""

    secret: str = field(repr=False)
    masked: str
    host: str
    port: int
    database: str
    user: str

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"DatabaseURL({self.masked!r})"

    @property
    def server(self) -> str:
        """host:port, for messages (no user, no password)."""
        return f"{self.host}:{self.port}"


def parse_url(url: str) -> DatabaseURL:
    """Parse a store URL; ConfigurationError (masked) if it is not a PostgreSQL URL."""
    masked = mask_url(url)
    if not is_postgres_url(url):
        raise ConfigurationError(f"store URL {masked} is not a postgresql:// URL")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or int(os.environ.get("PGPORT", "5432"))
    except ValueError as error:
        raise ConfigurationError(f"store URL {masked} is malformed: "
                                 f"{scrub(str(error), url)}") from None
    query = dict(urllib.parse.parse_qsl(parts.query))
    host = parts.hostname or query.get("host") or os.environ.get("PGHOST") or "localhost"
    database = parts.path.lstrip("/") or query.get("dbname") or parts.username or "postgres"
    user = parts.username or query.get("user") or os.environ.get("PGUSER") or ""
    return DatabaseURL(url, masked, host, port, urllib.parse.unquote(database),
                       urllib.parse.unquote(user))
