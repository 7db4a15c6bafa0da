"""Sender tokens: making them, the receiver's file of their hashes, and checking one presented.

A token is 256 random bits (``secrets.token_urlsafe(32)``, 43 characters). The receiver keeps
only ``sha256:<hex>`` of each, one line per sender id, so a leaked tokens file lets nobody
connect. A plain hash (no salt, no slow KDF) suffices because the tokens are random and long:
there is no dictionary to try. Each token is valid only for its own sender id.

On the sender the token lives in a ``Token`` whose ``repr`` and ``str`` are ``Token(***)``, so
it cannot reach a log line or a traceback by accident. Error messages built here name the
variable or file at fault, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from avd.atomicfile import write_atomically
from avd.errors import ConfigError

SENDER_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MIN_TOKEN_LENGTH = 32
HASH_PREFIX = "sha256:"
_SENDER_ID = re.compile(SENDER_ID_RE)
_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
# Compared against when the sender id is unknown, so that an unknown id costs the same as a
# wrong token and the timing does not reveal which ids exist.
_DUMMY_DIGEST = hashlib.sha256(b"avd: no sender has this digest").digest()
_LINE_FORMAT = "'<sender-id> sha256:<64 hex digits>'"


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The form the receiver stores: ``sha256:`` and 64 lowercase hex digits."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def validate_sender_id(s: str) -> str:
    """``s`` itself if it is a valid sender id, else ValueError saying what is allowed."""
    # fullmatch: a plain match would let "$" accept a trailing newline.
    if _SENDER_ID.fullmatch(s) is None:
        shown = s if len(s) <= 80 else s[:77] + "..."
        raise ValueError(
            f"invalid sender id {shown!r}: use 1 to 64 characters from A-Z a-z 0-9 . _ -,"
            " starting with a letter or digit"
        )
    return s


class Token:
    """A secret that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)
    __hash__ = None  # type: ignore[assignment]  # secrets do not belong in sets or dict keys

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def as_bytes(self) -> bytes:
        return self._value.encode()

    def __repr__(self) -> str:
        return "Token(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Token):
            return NotImplemented
        return hmac.compare_digest(self.as_bytes(), other.as_bytes())

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the secret wherever the pickle goes (a multiprocessing queue,
        # a cache file); pass `reveal()` explicitly if that is really wanted.
        raise TypeError("a Token cannot be pickled")


class TokenStore:
    """The receiver's sender ids and token digests, loaded from the tokens file."""

    __slots__ = ("_digests",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, hashes: Mapping[str, str]) -> None:
        """``hashes`` maps sender id to ``sha256:<hex>`` as ``hash_token`` makes it."""
        self._digests = {validate_sender_id(i): _digest_of(h) for i, h in hashes.items()}

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, str]) -> TokenStore:
        """A store for known plaintext tokens (tests, one-off tools)."""
        return cls({sender: hash_token(token) for sender, token in tokens.items()})

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        """Read a tokens file; ConfigError naming ``path:line`` for anything malformed."""
        return cls(_parse_tokens_file(_read_tokens_file(path), path))

    def verify(self, sender_id: str, token: bytes | str) -> bool:
        """Whether ``token`` is the one issued to ``sender_id``, in constant time."""
        presented = hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()
        expected = self._digests.get(sender_id, _DUMMY_DIGEST)
        matches = hmac.compare_digest(presented, expected)
        return matches and sender_id in self._digests

    def sender_ids(self) -> frozenset[str]:
        return frozenset(self._digests)

    def digest_of(self, sender_id: str) -> bytes | None:
        return self._digests.get(sender_id)

    def __len__(self) -> int:
        return len(self._digests)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenStore):
            return NotImplemented
        return self._digests == other._digests

    def __repr__(self) -> str:
        return f"TokenStore({len(self)} senders)"


def removed_or_changed(old: TokenStore, new: TokenStore) -> set[str]:
    """Sender ids whose sessions must close on reload: gone from ``new`` or with a new token."""
    return {sender for sender in old.sender_ids() if old.digest_of(sender) != new.digest_of(sender)}


def add_token(path: Path, sender_id: str, token: str) -> bool:
    """Store the hash of ``token`` for ``sender_id``, replacing (revoking) any previous one;
    True if it replaced one.

    Other lines and comments are kept. The file is replaced atomically and keeps its mode and
    owner; a new file gets mode 0644: it holds only hashes, and the receiver's service user
    (systemd's DynamicUser) must be able to read it.
    """
    validate_sender_id(sender_id)
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the token for {sender_id!r} is shorter than {MIN_TOKEN_LENGTH}")
    new_line = f"{sender_id} {hash_token(token)}"
    lines = _read_tokens_file(path).splitlines() if path.exists() else []
    kept = _with_line(lines, sender_id, new_line)
    _replace_tokens_file(path, "".join(f"{line}\n" for line in kept))
    return len(kept) <= len(lines)  # nothing appended: a line of this sender was there


def read_sender_token(
    *, token_file: Path | None, credentials_directory: str | None, token_env: str | None
) -> Token:
    """The sender's token from, in order: AVD_TOKEN_FILE, the systemd credential, AVD_TOKEN."""
    if token_file is not None:
        source = f"AVD_TOKEN_FILE ({token_file})"
        return _checked(_read_secret(token_file, source), source)
    if credentials_directory:
        credential = Path(credentials_directory) / "token"
        if credential.exists():
            source = f"$CREDENTIALS_DIRECTORY/token ({credential})"
            return _checked(_read_secret(credential, source), source)
    if token_env is not None:
        return _checked(token_env, "AVD_TOKEN")
    raise ConfigError(
        "no token: set AVD_TOKEN_FILE, put a 'token' credential in $CREDENTIALS_DIRECTORY,"
        " or set AVD_TOKEN"
    )


def _digest_of(stored: str) -> bytes:
    match = _HASH.fullmatch(stored)
    if match is None:
        raise ValueError(f"a stored hash must look like {HASH_PREFIX}<64 hex digits>")
    return bytes.fromhex(match.group(1))


def _read_tokens_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"tokens file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"tokens file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read tokens file {path}: {exc.strerror or exc}") from None


def _parse_tokens_file(text: str, path: Path) -> dict[str, str]:
    hashes: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        # Field contents are never echoed unchecked: a token pasted by mistake must not end up
        # in an error message or the journal.
        if len(fields) != 2:
            raise ConfigError(f"{where}: expected {_LINE_FORMAT}, found {len(fields)} fields")
        sender, stored = fields
        if _SENDER_ID.fullmatch(sender) is None:
            raise ConfigError(f"{where}: the first field is not a valid sender id")
        if _HASH.fullmatch(stored) is None:
            raise ConfigError(
                f"{where}: the hash for {sender!r} is not {HASH_PREFIX}<64 hex digits>"
                " (a token itself does not belong here: store its hash with add_token)"
            )
        if sender in hashes:
            raise ConfigError(
                f"{where}: sender {sender!r} already has a line ({first_seen[sender]})"
            )
        hashes[sender], first_seen[sender] = stored.lower(), number
    return hashes


def _with_line(lines: list[str], sender_id: str, new_line: str) -> list[str]:
    """``lines`` with the first line of ``sender_id`` replaced by ``new_line`` (or appended)."""
    result: list[str] = []
    placed = False
    for line in lines:
        fields = line.split()
        if fields and fields[0] == sender_id:
            if not placed:
                result.append(new_line)
            placed = True  # later duplicates of the id are dropped: one token per sender
        else:
            result.append(line)
    return result if placed else [*result, new_line]


def _replace_tokens_file(path: Path, text: str) -> None:
    """Atomically, keeping the old file's mode and owner (see ``avd.atomicfile``)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    # The replacement must stay readable by whoever could read the old file (the receiver's
    # user when root edits it), and no more; a new one is world-readable.
    write_atomically(
        path,
        text.encode("utf-8"),
        mode=stat.S_IMODE(old.st_mode) if old else 0o644,
        owner=(old.st_uid, old.st_gid) if old else None,
    )


def _read_secret(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None


def _checked(raw: str, source: str) -> Token:
    value = raw.strip()
    if len(value) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"the token from {source} is too short ({len(value)} characters, at least"
            f" {MIN_TOKEN_LENGTH} needed; avd issues tokens of 43)"
        )
    if not all(c.isascii() and c.isprintable() and not c.isspace() for c in value):
        raise ConfigError(f"the token from {source} contains spaces or non-ASCII characters")
    return Token(value)
