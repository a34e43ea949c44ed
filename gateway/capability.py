"""VCS tokens: mint and verify the signed JWTs that bind a client to one session and Assembly.

A `Keyring` holds the active signer plus verify-only keys for rotation; a `Verifier`
pins every kid to its own algorithm and caches verified claims for the hot path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.types import Options

from gateway.errors import ConfigError, Unauthenticated

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "PREVIOUS_KEYS_ENV",
    "Claims",
    "Keyring",
    "VcsKey",
    "Verifier",
    "bearer_token",
    "constant_time_equals",
    "generate_ed25519_key",
    "mint",
]

ISSUER: Final = "abc-gateway"
AUDIENCE: Final = "abc-vcs"
PREVIOUS_KEYS_ENV: Final = "ABC_SIGNING_KEYS_PREVIOUS"
MIN_SECRET_CHARS: Final = 32
MAX_LEEWAY_S: Final = 5.0

INVALID_MESSAGE: Final = "invalid VCS token"
EXPIRED_MESSAGE: Final = "VCS token expired"

Algorithm = Literal["HS256", "EdDSA"]

# A minted token is ~400 characters; anything far longer is not ours and is not worth hashing.
_MAX_TOKEN_CHARS = 4096
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_HEADER_KEYS = frozenset({"alg", "kid", "typ"})
# exp/iat are checked here against the Verifier's clock, not by PyJWT against the wall clock.
_DECODE_OPTIONS: Options = {
    "require": ["iss", "aud", "sub", "asm", "jti", "iat", "exp"],
    "strict_aud": True,
    "verify_exp": False,
    "verify_iat": False,
    "verify_nbf": False,
}


@dataclass(frozen=True, slots=True)
class Claims:
    session_id: str
    assembly_id: str
    tenant: str | None
    jti: str
    issued_at: int  # seconds since the epoch
    expires_at: int
    # Set on a recorded replay's token: the session whose journal answers its calls.
    replay_of: str | None = None


# eq=False: a generated __eq__ would compare secrets with `==`, which is not constant time.
@dataclass(frozen=True, slots=True, eq=False)
class VcsKey:
    """One key of a ring; `signer` is None for a verify-only key (an Ed25519 public key)."""

    kid: str
    algorithm: Algorithm
    verifier: bytes | Ed25519PublicKey = field(repr=False)
    signer: bytes | Ed25519PrivateKey | None = field(repr=False)

    @classmethod
    def hs256(cls, secret: str) -> VcsKey:
        if len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"an HS256 secret needs at least {MIN_SECRET_CHARS} characters")
        raw = secret.encode("utf-8")
        # Salted hash, truncated: names the key for rotation without helping to guess it.
        kid = "hs-" + hashlib.sha256(b"abc-kid:" + raw).hexdigest()[:16]
        return cls(kid=kid, algorithm="HS256", verifier=raw, signer=raw)

    @classmethod
    def ed25519(cls, key: Ed25519PrivateKey | Ed25519PublicKey) -> VcsKey:
        public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kid = "ed-" + hashlib.sha256(raw).hexdigest()[:16]
        signer = key if isinstance(key, Ed25519PrivateKey) else None
        return cls(kid=kid, algorithm="EdDSA", verifier=public, signer=signer)


class Keyring:
    """The active signer plus older keys by kid. Immutable: rotate by building a new one.

    Rotation: make the new key active and list the old one as previous until every token
    it signed has expired; then drop it.
    """

    __slots__ = ("_active", "_keys")

    def __init__(self, active: VcsKey, previous: Sequence[VcsKey] = ()) -> None:
        if active.signer is None:
            raise ConfigError(
                "the active signing key must be able to sign: "
                "give an HS256 secret or an Ed25519 private key"
            )
        keys = {active.kid: active}
        for key in previous:
            keys.setdefault(key.kid, key)
        self._active = active
        self._keys: Mapping[str, VcsKey] = MappingProxyType(keys)

    @property
    def active(self) -> VcsKey:
        return self._active

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def get(self, kid: str) -> VcsKey | None:
        return self._keys.get(kid)

    @classmethod
    def from_sources(cls, active: str, previous: Sequence[str] = ()) -> Keyring:
        """Each source is an HS256 secret (>= 32 characters) or the path of an Ed25519 PEM
        key; previous keys may also be PEM public keys (verify only)."""
        return cls(
            _load_key(active, "active signing key", verify_only_ok=False),
            [
                _load_key(source, f"previous signing key #{i}", verify_only_ok=True)
                for i, source in enumerate(previous, start=1)
            ],
        )

    @classmethod
    def from_env(cls, settings_signing_key: str | None, previous_env: str | None) -> Keyring:
        """Build from ABC_SIGNING_KEY and ABC_SIGNING_KEYS_PREVIOUS.

        ABC_SIGNING_KEYS_PREVIOUS is a comma-separated list of older keys, each written like
        ABC_SIGNING_KEY (so an HS256 secret listed there must not contain a comma); tokens
        they signed keep verifying until they are removed from the list.
        """
        if not settings_signing_key or not settings_signing_key.strip():
            raise ConfigError(
                "ABC_SIGNING_KEY is not set: give an HS256 secret of at least "
                f"{MIN_SECRET_CHARS} characters or the path of an Ed25519 PEM private key"
            )
        previous = [s for s in (previous_env or "").split(",") if s.strip()]
        return cls(
            _load_key(settings_signing_key, "ABC_SIGNING_KEY", verify_only_ok=False),
            [
                _load_key(source, f"{PREVIOUS_KEYS_ENV} entry #{i}", verify_only_ok=True)
                for i, source in enumerate(previous, start=1)
            ],
        )


def _load_key(source: str, label: str, *, verify_only_ok: bool) -> VcsKey:
    # Messages name the setting, never its value: the value may be a secret.
    # Surrounding whitespace is dropped so replicas fed from different shells agree on the kid.
    source = source.strip()
    if not source:
        raise ConfigError(f"{label} is empty")
    path = Path(source).expanduser()
    if _is_file(path):
        return _load_pem(path, label, verify_only_ok=verify_only_ok)
    # A mistyped key path must not silently become a guessable HS256 secret.
    if source.lower().endswith((".pem", ".key")) or source.startswith(("/", "./", "../", "~")):
        raise ConfigError(
            f"{label} looks like a file path but no such file exists "
            "(an HS256 secret must not start with '/', '.' or '~')"
        )
    if len(source) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"{label} is neither an existing Ed25519 PEM file nor an HS256 secret "
            f"of at least {MIN_SECRET_CHARS} characters"
        )
    return VcsKey.hs256(source)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a long secret is "File name too long", a NUL a ValueError
        return False


def _load_pem(path: Path, label: str, *, verify_only_ok: bool) -> VcsKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {path}: {exc.strerror}") from None
    key: object
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{label}: {path} is encrypted; use an unencrypted PEM protected by file permissions"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(f"{label}: {path} is not a PEM key") from None
    if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        raise ConfigError(f"{label}: {path} is not an Ed25519 key")
    if isinstance(key, Ed25519PublicKey) and not verify_only_ok:
        raise ConfigError(f"{label}: {path} is a public key; signing needs the private key")
    return VcsKey.ed25519(key)


def generate_ed25519_key(path: Path) -> Path:
    """Write a new Ed25519 private key as PEM, mode 0600 (used by `abc-gateway demo`).

    Never overwrites: an existing file raises FileExistsError, since tokens may already
    be signed with it.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # the umask can only narrow the mode; be exact anyway
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def mint(
    keyring: Keyring,
    *,
    session_id: str,
    assembly_id: str,
    tenant: str | None,
    ttl_s: int,
    now: float | None = None,
    replay_of: str | None = None,
) -> tuple[str, Claims]:
    if not session_id or not assembly_id:
        raise ValueError("session_id and assembly_id must be non-empty")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    if replay_of is not None and not replay_of:
        raise ValueError("replay_of must be non-empty when given")
    issued = int(time.time() if now is None else now)
    claims = Claims(
        session_id=session_id,
        assembly_id=assembly_id,
        tenant=tenant,
        jti=secrets.token_urlsafe(16),  # 128 random bits
        issued_at=issued,
        expires_at=issued + int(ttl_s),
        replay_of=replay_of,
    )
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": claims.session_id,
        "asm": claims.assembly_id,
        "ten": claims.tenant,
        "jti": claims.jti,
        "iat": claims.issued_at,
        "exp": claims.expires_at,
    }
    if replay_of is not None:
        payload["rpl"] = replay_of
    key = keyring.active
    assert key.signer is not None  # Keyring refuses a verify-only active key
    token = jwt.encode(payload, key.signer, algorithm=key.algorithm, headers={"kid": key.kid})
    return token, claims


class Verifier:
    """Verifies VCS tokens; one per process, used from its event loop thread.

    Revocation is not checked here: the budget script checks it in Redis on every request,
    so a cached token still stops working the moment its session is revoked.
    """

    __slots__ = ("_cache", "_cache_size", "_clock", "_keyring", "_leeway")

    def __init__(
        self,
        keyring: Keyring,
        *,
        leeway_s: float = MAX_LEEWAY_S,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway_s must be between 0 and {MAX_LEEWAY_S}")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._keyring = keyring
        self._leeway = leeway_s
        self._cache_size = cache_size
        self._clock = clock
        # Keyed by the token's SHA-256 so raw tokens are not kept around; LRU order.
        self._cache: OrderedDict[bytes, Claims] = OrderedDict()

    def verify(self, token: str) -> Claims:
        if len(token) > _MAX_TOKEN_CHARS or not token.isascii():
            _reject()
        digest = hashlib.sha256(token.encode("ascii")).digest()
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None:
            # The hot path: one hash, one lookup, one compare; the signature was checked once.
            if now < cached.expires_at + self._leeway:
                self._cache.move_to_end(digest)
                return cached
            del self._cache[digest]
            _reject(EXPIRED_MESSAGE)
        claims = self._verify_signed(token, now)
        if self._cache_size:
            self._cache[digest] = claims
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return claims

    def _verify_signed(self, token: str, now: float) -> Claims:
        header = _unverified_header(token)
        kid, alg = header.get("kid"), header.get("alg")
        key = self._keyring.get(kid) if isinstance(kid, str) else None
        # Pinning: the kid's key alone decides the algorithm, so "none" or HS256 signed with
        # an Ed25519 public key as the HMAC secret never reaches a verifier.
        if key is None or alg != key.algorithm:
            _reject()
        try:
            payload = jwt.decode(
                token,
                key.verifier,
                algorithms=[key.algorithm],
                audience=AUDIENCE,
                issuer=ISSUER,
                options=_DECODE_OPTIONS,
            )
        except jwt.PyJWTError:
            _reject()
        claims = _claims_from_payload(payload)
        # Time is judged only after the signature, so a forgery learns nothing from the message.
        if now >= claims.expires_at + self._leeway:
            _reject(EXPIRED_MESSAGE)
        if claims.issued_at > now + self._leeway:
            _reject()
        return claims


def _reject(message: str = INVALID_MESSAGE) -> NoReturn:
    # `from None`: library exception text never rides along into logs or responses.
    raise Unauthenticated(message) from None


def _unverified_header(token: str) -> dict[str, Any]:
    """Read only enough of an unverified token to choose its key; reject any odd encoding."""
    if _SHAPE.fullmatch(token) is None:
        _reject()
    # Canonical base64url only, so one signed token has exactly one spelling. Recent PyJWT
    # releases check this too; older ones within our pinned range do not.
    if not all(_is_canonical_b64url(segment) for segment in token.split(".")):
        _reject()
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        _reject()
    if not header.keys() <= _HEADER_KEYS or header.get("typ", "JWT") != "JWT":
        _reject()
    return header


def _is_canonical_b64url(segment: str) -> bool:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).rstrip(b"=") == segment.encode("ascii")


def _claims_from_payload(payload: dict[str, Any]) -> Claims:
    sub, asm, jti = payload.get("sub"), payload.get("asm"), payload.get("jti")
    tenant, iat, exp = payload.get("ten", ...), payload.get("iat"), payload.get("exp")
    replay_of = payload.get("rpl")
    if not (isinstance(sub, str) and sub and isinstance(asm, str) and asm):
        _reject()
    if not (isinstance(jti, str) and jti):
        _reject()
    if tenant is not None and not isinstance(tenant, str):  # absent (...) is not ours either
        _reject()
    if "rpl" in payload and not (isinstance(replay_of, str) and replay_of):
        _reject()
    # type() rather than isinstance: True is an int, and floats are never minted.
    if type(iat) is not int or type(exp) is not int or exp <= iat:
        _reject()
    return Claims(
        session_id=sub,
        assembly_id=asm,
        tenant=tenant,
        jti=jti,
        issued_at=iat,
        expires_at=exp,
        replay_of=replay_of,
    )


def bearer_token(header_value: str | None) -> str | None:
    """The token of an `Authorization: Bearer X` value; None when absent or malformed."""
    if header_value is None:
        return None
    parts = header_value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def constant_time_equals(a: str, b: str) -> bool:
    # Comparing digests keeps the time independent of where the strings differ and of
    # their lengths.
    return hmac.compare_digest(_digest(a), _digest(b))


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
