"""Access tokens of the web service: a file of tokens, a timing-safe check, loopback-only without them."""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

from sf_bsread_writer.config import is_loopback

__all__ = ["TokenSet", "read_tokens", "is_loopback", "TokenFileError", "origin_allowed"]

logger = logging.getLogger(__name__)

#: Shortest token accepted from a file: a guessable token is no token.
MIN_TOKEN_LENGTH = 16


class TokenFileError(ValueError):
    """The token file cannot be used; the message says why."""


def read_tokens(path: str | os.PathLike) -> tuple[str, ...]:
    """Tokens, one per line; ``#`` starts a comment; blank lines ignored. Raises TokenFileError."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenFileError(f"token file {path}: {error}") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        token = line.split("#", 1)[0].strip()
        if not token:
            continue
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise TokenFileError(f"token file {path}, line {number}: a token is one word of at least "
                                 f"{MIN_TOKEN_LENGTH} characters (e.g. python -c 'import secrets; "
                                 "print(secrets.token_urlsafe(32))')")
        tokens.append(token)
    if not tokens:
        raise TokenFileError(f"token file {path} holds no token")
    return tuple(tokens)


@dataclass(frozen=True)
class TokenSet:
    """The tokens that open the service; empty: open (allowed on loopback only)."""

    tokens: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def allows(self, presented: str | None) -> bool:
        """Timing-safe: every token is compared, whatever matches, so timing tells nothing."""
        if not self.tokens:
            return True
        # Digests of equal length: compare_digest returns early on a length difference, which would tell it.
        # surrogatepass: a header of non-UTF-8 bytes arrives with lone surrogates; it is a wrong token, not an error.
        candidate = hashlib.sha256((presented or "").encode("utf-8", "surrogatepass")).digest()
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(candidate, hashlib.sha256(token.encode("utf-8")).digest())
        return matched


def origin_allowed(origin: str | None, own_origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether a websocket may open from a page of ``origin`` (its ``Origin`` header).

    Browsers send the page's origin with every websocket and, unlike for other requests, do not
    stop a page of another site from opening one; with a ``?token=`` the browser holds, such a page
    would read the data. So: no Origin (not a browser) or the service's own origin or one of
    ``allowed`` (``--allow-origin``, normalised by ``config.parse_origins``); nothing else (``null``
    too). Compared case-insensitively, as origins are.
    """
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    return origin == own_origin.lower() or origin in allowed
