"""Who may use the web page: a users file of hashed passwords and API tokens, and the audit log.

The users file is JSON, written with mode 0600 by ``ctguard users add``::

    {"users": {"alice": {"password": "scrypt$16384$8$1$<salt>$<hash>",
                         "tokens": [{"id": "3f2a...", "sha256": "<hex>", "created": "2026-12-01T10:00:00Z"}]}}}

Passwords are kept as scrypt hashes (salted, memory-hard), tokens as SHA-256 hashes of 32 random
bytes: the file never holds a secret that logs anyone in. A request authenticates with HTTP Basic
(``name:password``, what a browser asks for) or ``Authorization: Bearer <token>`` (scripts).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from ctguard.errors import InputError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"users": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"not a ctguard users file ({e.__class__.__name__}: {e})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
        raise InputError('not a ctguard users file (no "users" object)', path)
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_user(path: str | Path, name: str, password: str | None = None, token: bool = False) -> str | None:
    """Adds (or updates) a user: sets the password if given, adds a new API token if ``token``.

    Returns:
        The new token, shown once (only its hash is kept), or None.
    """
    if not name or not set(name) <= NAME_CHARS:
        raise InputError(f"user name {name!r}: use letters, digits and . _ - @")
    if password is None and not token:
        raise InputError("give a password, a token (--token), or both")
    if password is not None and len(password) < 8:
        raise InputError("a password needs at least 8 characters")
    path = Path(path)
    data = _read(path)
    user = data["users"].setdefault(name, {"tokens": []})
    if password is not None:
        user["password"] = hash_password(password)
    new = None
    if token:
        new = secrets.token_urlsafe(32)
        user.setdefault("tokens", []).append({"id": secrets.token_hex(4), "sha256": _token_hash(new),
                                              "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    _write(path, data)
    return new


def remove_user(path: str | Path, name: str) -> None:
    path = Path(path)
    data = _read(path)
    if name not in data["users"]:
        raise InputError(f"no user {name!r}", path)
    del data["users"][name]
    _write(path, data)


def list_users(path: str | Path) -> list[dict[str, Any]]:
    data = _read(Path(path))
    return [{"name": n, "password": "password" in u, "tokens": [t["id"] for t in u.get("tokens", [])]}
            for n, u in sorted(data["users"].items())]


class Users:
    """The users file, read at start (and re-read when it changes, so that a removed user is out)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError("no such users file (make one with: ctguard users add NAME --users FILE)", self.path)
        self._lock = threading.Lock()
        self._mtime = None
        self._users: dict[str, Any] = {}
        self._reload()
        if not self._users:
            raise InputError("the users file has no users", self.path)

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            self._users, self._mtime = _read(self.path)["users"], mtime

    def by_password(self, name: str, password: str) -> str | None:
        with self._lock:
            self._reload()
            user = self._users.get(name)
        stored = user.get("password") if user else None
        if not stored:
            check_password(password, hash_password("x" * 8))  # the same work for an unknown name
            return None
        return name if check_password(password, stored) else None

    def by_token(self, token: str) -> str | None:
        digest = _token_hash(token)
        with self._lock:
            self._reload()
            users = dict(self._users)
        found = None
        for name, user in users.items():
            for t in user.get("tokens", []):
                if hmac.compare_digest(t.get("sha256", ""), digest):
                    found = name
        return found


class AuditLog:
    """One JSON line per upload, view, deletion and refused login; appended and fsync'd."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        entry = {"time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "event": event, **fields}
        line = json.dumps(entry) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()] if self.path.is_file() else []
