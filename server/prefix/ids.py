"""The naming rules of tenants, prefixes, versions and users, checked before anything is stored.

    tenant   [a-z0-9][a-z0-9_-]{0,63}
    prefix   [A-Za-z0-9][A-Za-z0-9._:-]{0,127}    user prefixes: "user:<user_id>"
    version  16 hex digits (the content hash of the stored tensor)

A client names a prefix of the admin tenant that the admin marked shared as
"shared/<id>"; a user's personalized prefix is "user:<user_id>" in the tenant's namespace.
Ids never contain `{` or `}`, so Redis hash tags built from them stay the tenant's.
"""

from __future__ import annotations

import re

TENANT_RULE = r"^[a-z0-9][a-z0-9_-]{0,63}$"
PREFIX_RULE = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
VERSION_RULE = r"^[0-9a-f]{16}$"
_TENANT_RE = re.compile(TENANT_RULE)
_PREFIX_RE = re.compile(PREFIX_RULE)
_VERSION_RE = re.compile(VERSION_RULE)

SHARED_PREFIX = "shared/"  # "shared/<id>": a prefix the admin tenant marked shared, read-only
USER_PREFIX = "user:"  # "user:<user_id>": a user's personalized prefix

MAX_ID_IN_MESSAGE = 140  # characters of a client's id echoed in an error (a valid id has at most 128)


def shorten(value: object, limit: int = MAX_ID_IN_MESSAGE) -> str:
    """repr(value), cut to about `limit` characters: error messages never echo a huge id."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


class InvalidIdError(ValueError):
    """A tenant or prefix id that breaks its naming rule; raised before anything is written."""

    def __init__(self, kind: str, value: object, rule: str):
        self.kind = kind
        self.value = value
        self.rule = rule
        super().__init__(f"invalid {kind} {shorten(value)}: must match {rule}")


def _check(kind: str, value: object, pattern: re.Pattern, rule: str) -> str:
    # fullmatch: `$` alone would accept a trailing newline
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidIdError(kind, value, rule)
    return value


def validate_tenant(tenant: object) -> str:
    return _check("tenant id", tenant, _TENANT_RE, TENANT_RULE)


def validate_prefix_id(prefix_id: object) -> str:
    return _check("prefix id", prefix_id, _PREFIX_RE, PREFIX_RULE)


def validate_version(version: object) -> str:
    return _check("version", version, _VERSION_RE, VERSION_RULE)


def user_prefix_id(user_id: str) -> str:
    """The prefix id of a user's personalized prefix; InvalidIdError if the user id cannot name one."""
    return validate_prefix_id(USER_PREFIX + user_id)


def is_user_prefix(prefix_id: str) -> bool:
    return prefix_id.startswith(USER_PREFIX)
