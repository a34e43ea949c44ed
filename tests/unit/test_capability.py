"""VCS tokens: round trips, rotation, and every kind of forgery or tampering is rejected."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import capability
from gateway.capability import (
    AUDIENCE,
    EXPIRED_MESSAGE,
    INVALID_MESSAGE,
    ISSUER,
    Claims,
    Keyring,
    VcsKey,
    Verifier,
    bearer_token,
    constant_time_equals,
    generate_ed25519_key,
    mint,
)
from gateway.errors import ConfigError, Unauthenticated

NOW = 1_800_000_000
TTL = 600
SECRET = "test-hs256-secret-0123456789abcdef-XYZ"
OTHER_SECRET = "another-hs256-secret-fedcba9876543210-Q"
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def forge(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """Build a token by hand, so tests can produce what PyJWT itself refuses to."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"
    return f"{signing_input}.{b64url(sign(signing_input.encode('ascii')))}"


def hs256_with(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


def good_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "sess-1",
        "asm": "asm-1",
        "ten": "acme",
        "jti": "j" * 22,
        "iat": NOW,
        "exp": NOW + TTL,
    }
    payload.update(changes)
    return payload


def hs_header(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": "HS256", "kid": VcsKey.hs256(SECRET).kid, "typ": "JWT"}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not None}


def rejected(verifier: Verifier, token: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    # One of two fixed messages and nothing else, so the token can never be echoed.
    assert info.value.message in (INVALID_MESSAGE, EXPIRED_MESSAGE)
    assert info.value.extra == {} and info.value.param is None
    assert info.value.__cause__ is None and info.value.__suppress_context__
    return info.value


@pytest.fixture(scope="module")
def ed_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_ed25519_key(tmp_path_factory.mktemp("keys") / "ed25519.pem")


@pytest.fixture(scope="module")
def ed_public_pem(ed_pem: Path) -> Path:
    private = serialization.load_pem_private_key(ed_pem.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    path = ed_pem.with_name("ed25519.pub.pem")
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture(scope="module", params=["HS256", "EdDSA"])
def keyring(request: pytest.FixtureRequest, ed_pem: Path) -> Keyring:
    return Keyring.from_sources(SECRET if request.param == "HS256" else str(ed_pem))


@pytest.fixture(scope="module")
def token(keyring: Keyring) -> str:
    return mint(
        keyring, session_id="sess-1", assembly_id="asm-1", tenant="acme", ttl_s=TTL, now=NOW
    )[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


# --- round trips and keys ---------------------------------------------------------------


def test_minted_token_verifies_to_the_minted_claims(keyring: Keyring, clock: Clock) -> None:
    token, claims = mint(
        keyring, session_id="sess-9", assembly_id="asm-9", tenant=None, ttl_s=TTL, now=NOW
    )
    assert claims == Claims("sess-9", "asm-9", None, claims.jti, NOW, NOW + TTL)
    assert Verifier(keyring, clock=clock).verify(token) == claims
    header = jwt.get_unverified_header(token)
    assert header["kid"] == keyring.active.kid
    assert header["alg"] == keyring.active.algorithm


def test_jti_is_random_and_128_bits(keyring: Keyring) -> None:
    jtis = {
        mint(keyring, session_id="s", assembly_id="a", tenant=None, ttl_s=1)[1].jti
        for _ in range(50)
    }
    assert len(jtis) == 50
    assert all(len(b64url_decode(j)) == 16 for j in jtis)


def test_mint_refuses_a_non_positive_ttl(keyring: Keyring) -> None:
    with pytest.raises(ValueError):
        mint(keyring, session_id="s", assembly_id="a", tenant=None, ttl_s=0)


def test_kids_are_deterministic_and_reveal_nothing(ed_pem: Path, ed_public_pem: Path) -> None:
    hs = VcsKey.hs256(SECRET)
    assert hs.kid == VcsKey.hs256(SECRET).kid != VcsKey.hs256(OTHER_SECRET).kid
    expected = hashlib.sha256(b"abc-kid:" + SECRET.encode()).hexdigest()[:16]
    assert hs.kid == "hs-" + expected
    ed = Keyring.from_sources(str(ed_pem)).active
    assert ed.kid.startswith("ed-") and len(ed.kid) == 19
    # The public half names the same key, which is what makes verify-only rotation work.
    previous = Keyring.from_sources(SECRET, [str(ed_public_pem)])
    assert previous.get(ed.kid) is not None
    assert SECRET not in repr(hs) and SECRET not in repr(Keyring.from_sources(SECRET))


def test_keys_are_read_from_env_values(ed_pem: Path, ed_public_pem: Path, clock: Clock) -> None:
    old_token, _ = mint(
        Keyring.from_sources(OTHER_SECRET),
        session_id="s",
        assembly_id="a",
        tenant=None,
        ttl_s=TTL,
        now=NOW,
    )
    ring = Keyring.from_env(f"  {ed_pem}\n", f" {OTHER_SECRET} ,, {ed_public_pem},")
    assert ring.active.algorithm == "EdDSA"
    assert len(ring.kids) == 2  # the public PEM is the active key again: deduplicated
    assert Verifier(ring, clock=clock).verify(old_token).session_id == "s"
    assert Keyring.from_env(SECRET, None).kids == (VcsKey.hs256(SECRET).kid,)


# --- rotation ---------------------------------------------------------------------------


def test_rotation_keeps_old_tokens_until_the_old_key_is_dropped(ed_pem: Path, clock: Clock) -> None:
    old_token, old_claims = mint(
        Keyring.from_sources(SECRET),
        session_id="s",
        assembly_id="a",
        tenant="t",
        ttl_s=TTL,
        now=NOW,
    )
    rotated = Keyring.from_sources(str(ed_pem), [SECRET])
    assert Verifier(rotated, clock=clock).verify(old_token) == old_claims

    new_token, _ = mint(rotated, session_id="s2", assembly_id="a", tenant=None, ttl_s=TTL, now=NOW)
    assert jwt.get_unverified_header(new_token)["kid"] == rotated.active.kid
    assert jwt.get_unverified_header(new_token)["alg"] == "EdDSA"

    dropped = Keyring.from_sources(str(ed_pem))
    rejected(Verifier(dropped, clock=clock), old_token)
    assert Verifier(dropped, clock=clock).verify(new_token).session_id == "s2"


# --- forgeries --------------------------------------------------------------------------


def test_alg_none_is_rejected(clock: Clock) -> None:
    verifier = Verifier(Keyring.from_sources(SECRET), clock=clock)
    unsigned = forge(hs_header(alg="none"), good_payload(), lambda _: b"")
    rejected(verifier, unsigned)
    rejected(verifier, unsigned.rsplit(".", 1)[0] + ".")
    rejected(
        verifier, jwt.encode(good_payload(), "", algorithm="none", headers=hs_header(alg="none"))
    )


def test_hs256_signed_with_the_ed25519_public_key_is_rejected(ed_pem: Path, clock: Clock) -> None:
    ring = Keyring.from_sources(str(ed_pem))
    public = ring.active.verifier
    assert not isinstance(public, bytes)
    header = {"alg": "HS256", "kid": ring.active.kid, "typ": "JWT"}
    verifier = Verifier(ring, clock=clock)
    for encoding, fmt in [
        (serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
    ]:
        rejected(
            verifier, forge(header, good_payload(), hs256_with(public.public_bytes(encoding, fmt)))
        )


def test_an_algorithm_other_than_the_kids_is_rejected(ed_pem: Path, clock: Clock) -> None:
    ring = Keyring.from_sources(SECRET, [str(ed_pem)])
    private = serialization.load_pem_private_key(ed_pem.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    verifier = Verifier(ring, clock=clock)
    # A good Ed25519 signature under the HS256 kid, and HS384 under the HS256 kid.
    rejected(verifier, forge(hs_header(alg="EdDSA"), good_payload(), private.sign))
    rejected(
        verifier,
        forge(
            hs_header(alg="HS384"),
            good_payload(),
            lambda d: hmac.new(SECRET.encode(), d, "sha384").digest(),
        ),
    )


@pytest.mark.parametrize(
    "header",
    [
        hs_header(kid="hs-0000000000000000"),
        hs_header(kid=None),
        hs_header(kid=7),
        hs_header(jku="https://evil.example/keys"),
        hs_header(typ="at+jwt"),
        hs_header(alg=None),
    ],
    ids=["unknown-kid", "no-kid", "int-kid", "extra-header", "other-typ", "no-alg"],
)
def test_well_signed_tokens_with_a_bad_header_are_rejected(
    header: dict[str, Any], clock: Clock
) -> None:
    verifier = Verifier(Keyring.from_sources(SECRET), clock=clock)
    rejected(verifier, forge(header, good_payload(), hs256_with(SECRET.encode())))


def test_a_token_signed_with_another_secret_is_rejected(clock: Clock) -> None:
    verifier = Verifier(Keyring.from_sources(SECRET), clock=clock)
    rejected(verifier, forge(hs_header(), good_payload(), hs256_with(OTHER_SECRET.encode())))
    assert (
        verifier.verify(forge(hs_header(), good_payload(), hs256_with(SECRET.encode()))).tenant
        == "acme"
    )


@pytest.mark.parametrize(
    "payload",
    [
        good_payload(aud="other"),
        good_payload(aud=[AUDIENCE]),
        good_payload(aud=[AUDIENCE, "other"]),
        good_payload(iss="someone-else"),
        *[
            good_payload(**{claim: None})
            for claim in ("sub", "asm", "jti", "exp", "iat", "iss", "aud")
        ],
        *[
            {k: v for k, v in good_payload().items() if k != claim}
            for claim in ("sub", "asm", "jti", "exp", "iat", "ten")
        ],
        good_payload(sub=""),
        good_payload(sub=12),
        good_payload(asm=["a"]),
        good_payload(ten=5),
        good_payload(exp=float(NOW + TTL)),
        good_payload(exp=True),
        good_payload(iat=str(NOW)),
        good_payload(exp=NOW),
    ],
)
def test_well_signed_tokens_with_bad_claims_are_rejected(
    payload: dict[str, Any], clock: Clock
) -> None:
    verifier = Verifier(Keyring.from_sources(SECRET), clock=clock)
    error = rejected(verifier, forge(hs_header(), payload, hs256_with(SECRET.encode())))
    assert error.message == INVALID_MESSAGE


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        " ",
        "abc",
        "a.b",
        "a.b.c",
        "...",
        "a..b",
        "null",
        "Bearer abc.def.ghi",
        "é.é.é",
        "\x00",
        "x" * 100_000,
    ],
)
def test_garbage_is_rejected(garbage: str, clock: Clock) -> None:
    rejected(Verifier(Keyring.from_sources(SECRET), clock=clock), garbage)


def test_non_canonical_spellings_of_a_valid_token_are_rejected(
    token: str, keyring: Keyring, clock: Clock
) -> None:
    verifier = Verifier(keyring, clock=clock)
    # The signature's last character carries unused low bits: flipping one keeps the bytes.
    last = _B64URL.index(token[-1])
    same_bytes = token[:-1] + _B64URL[last ^ 1]
    assert b64url_decode(same_bytes.rsplit(".", 1)[1]) == b64url_decode(token.rsplit(".", 1)[1])
    swapped = token.replace("-", "+").replace("_", "/")
    variants = [same_bytes, token + "=", " " + token, token + "\n", f"{token}.x"]
    for variant in variants + ([swapped] if swapped != token else []):
        rejected(verifier, variant)
    assert verifier.verify(token).session_id == "sess-1"


# --- time -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "valid"), [(-1, True), (0, True), (4.999, True), (5, False), (60, False)]
)
def test_expiry_allows_exactly_the_leeway(
    token: str, keyring: Keyring, offset: float, valid: bool
) -> None:
    verifier = Verifier(keyring, leeway_s=5.0, clock=Clock(NOW + TTL + offset))
    if valid:
        assert verifier.verify(token).expires_at == NOW + TTL
    else:
        assert rejected(verifier, token).message == EXPIRED_MESSAGE


def test_expiry_without_leeway(token: str, keyring: Keyring) -> None:
    assert Verifier(keyring, leeway_s=0, clock=Clock(NOW + TTL - 0.001)).verify(token)
    assert (
        rejected(Verifier(keyring, leeway_s=0, clock=Clock(NOW + TTL)), token).message
        == EXPIRED_MESSAGE
    )


def test_leeway_is_capped_at_five_seconds(keyring: Keyring) -> None:
    with pytest.raises(ValueError):
        Verifier(keyring, leeway_s=5.001)
    with pytest.raises(ValueError):
        Verifier(keyring, leeway_s=-1)


def test_a_token_issued_in_the_future_is_rejected(keyring: Keyring) -> None:
    verifier = Verifier(keyring, clock=Clock(NOW))
    soon, _ = mint(keyring, session_id="s", assembly_id="a", tenant=None, ttl_s=TTL, now=NOW + 5)
    later, _ = mint(keyring, session_id="s", assembly_id="a", tenant=None, ttl_s=TTL, now=NOW + 6)
    assert verifier.verify(soon).issued_at == NOW + 5
    assert rejected(verifier, later).message == INVALID_MESSAGE


def test_expired_message_is_only_given_after_the_signature_checks(clock: Clock) -> None:
    verifier = Verifier(Keyring.from_sources(SECRET), clock=Clock(NOW + 10 * TTL))
    forged = forge(hs_header(), good_payload(), hs256_with(OTHER_SECRET.encode()))
    assert rejected(verifier, forged).message == INVALID_MESSAGE


# --- cache ------------------------------------------------------------------------------


def test_a_cached_token_skips_the_signature_check(
    token: str, keyring: Keyring, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = Verifier(keyring, clock=clock)
    first = verifier.verify(token)
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("signature checked again"))
    assert verifier.verify(token) is first


def test_a_cached_token_still_expires(token: str, keyring: Keyring, clock: Clock) -> None:
    verifier = Verifier(keyring, clock=clock)
    verifier.verify(token)
    clock.now = NOW + TTL + 4.9
    assert verifier.verify(token).session_id == "sess-1"
    clock.now = NOW + TTL + 5
    assert rejected(verifier, token).message == EXPIRED_MESSAGE


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(
    keyring: Keyring, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = [
        mint(keyring, session_id=f"s{i}", assembly_id="a", tenant=None, ttl_s=TTL, now=NOW)[0]
        for i in range(3)
    ]
    verifier = Verifier(keyring, cache_size=2, clock=clock)
    verifier.verify(tokens[0])
    verifier.verify(tokens[1])
    verifier.verify(tokens[0])  # now tokens[1] is the least recently used
    verifier.verify(tokens[2])
    monkeypatch.setattr(jwt, "decode", _refuse)
    assert verifier.verify(tokens[0]).session_id == "s0"
    assert verifier.verify(tokens[2]).session_id == "s2"
    rejected(verifier, tokens[1])


def test_a_zero_size_cache_checks_every_time(
    token: str, keyring: Keyring, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = Verifier(keyring, cache_size=0, clock=clock)
    verifier.verify(token)
    monkeypatch.setattr(jwt, "decode", _refuse)
    rejected(verifier, token)


def test_failures_are_not_cached(clock: Clock) -> None:
    verifier = Verifier(Keyring.from_sources(SECRET), clock=clock)
    forged = forge(hs_header(), good_payload(), hs256_with(OTHER_SECRET.encode()))
    rejected(verifier, forged)
    rejected(verifier, forged)


def test_a_cached_verify_costs_microseconds(token: str, keyring: Keyring) -> None:
    verifier = Verifier(keyring)
    mint_now, _ = mint(keyring, session_id="s", assembly_id="a", tenant=None, ttl_s=TTL)
    verifier.verify(mint_now)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        verifier.verify(mint_now)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 25e-6  # ~1µs on a laptop; loose so a busy CI box passes


def _refuse(*_: Any, **__: Any) -> Any:
    raise jwt.InvalidSignatureError("signature checked again")


# --- tampering (property) ---------------------------------------------------------------

_ALPHABET = _B64URL + ".=+/ "


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_character_change_never_verifies(
    token: str, keyring: Keyring, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(token) - 1), label="index")
    replacement = data.draw(
        st.one_of(st.sampled_from(_ALPHABET), st.characters(codec="utf-8")).filter(
            lambda c: c != token[index]
        ),
        label="replacement",
    )
    mutated = token[:index] + replacement + token[index + 1 :]
    # Only canonical base64url is accepted, so even a change in a final character's
    # unused bits (same decoded bytes) is a different, rejected token.
    rejected(Verifier(keyring, clock=Clock()), mutated)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_bit_flip_in_a_segment_never_verifies(
    token: str, keyring: Keyring, data: st.DataObject
) -> None:
    segments = token.split(".")
    which = data.draw(st.integers(0, 2), label="segment")
    raw = bytearray(b64url_decode(segments[which]))
    position = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    segments[which] = b64url(bytes(raw))
    rejected(Verifier(keyring, clock=Clock()), ".".join(segments))


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_arbitrary_text_never_verifies(text: str) -> None:
    rejected(Verifier(Keyring.from_sources(SECRET), clock=Clock()), text)


# --- key sources ------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["short-secret", "x" * 31, "   " + "y" * 20 + "   "])
def test_a_short_secret_is_a_config_error_that_does_not_echo_it(source: str) -> None:
    with pytest.raises(ConfigError) as info:
        Keyring.from_sources(source)
    assert source.strip() not in str(info.value)
    assert "32" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Keyring.from_sources(SECRET, [source])
    assert source.strip() not in str(info.value) and "#1" in str(info.value)


def test_a_missing_key_file_is_not_taken_for_a_secret(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "signing-key-ed25519.pem")
    assert len(missing) >= 32
    with pytest.raises(ConfigError, match="no such file"):
        Keyring.from_sources(missing)


def test_a_long_secret_is_not_mistaken_for_a_path() -> None:
    long_secret = "k" * 400  # longer than a file name may be
    assert Keyring.from_sources(long_secret).active.algorithm == "HS256"


def test_env_without_a_signing_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ABC_SIGNING_KEY"):
        Keyring.from_env(None, SECRET)
    with pytest.raises(ConfigError, match="ABC_SIGNING_KEYS_PREVIOUS entry #2"):
        Keyring.from_env(SECRET, f"{OTHER_SECRET},tooshort")


def test_a_public_key_cannot_be_the_active_key(ed_public_pem: Path) -> None:
    with pytest.raises(ConfigError, match="public key"):
        Keyring.from_sources(str(ed_public_pem))


@pytest.mark.parametrize("kind", ["encrypted", "ec", "garbage"])
def test_unusable_key_files_are_config_errors(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    if kind == "encrypted":
        path.write_bytes(
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pass"),
            )
        )
    elif kind == "ec":
        path.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    else:
        path.write_text(SECRET)
    with pytest.raises(ConfigError) as info:
        Keyring.from_sources(str(path))
    assert SECRET not in str(info.value)


def test_generated_key_is_private_to_its_owner_and_never_overwritten(
    tmp_path: Path, clock: Clock
) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        path = generate_ed25519_key(tmp_path / "var" / "signing.pem")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_ed25519_key(path)
    assert path.read_bytes() == before
    ring = Keyring.from_sources(str(path))
    token, claims = mint(ring, session_id="s", assembly_id="a", tenant=None, ttl_s=TTL, now=NOW)
    assert Verifier(ring, clock=clock).verify(token) == claims


# --- header helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("  Bearer\tabc", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearer a b", None),
        ("abc", None),
    ],
)
def test_bearer_token(value: str | None, expected: str | None) -> None:
    assert bearer_token(value) == expected


def test_constant_time_equals() -> None:
    assert constant_time_equals("admin-token", "admin-token")
    assert not constant_time_equals("admin-token", "admin-tokeN")
    assert not constant_time_equals("admin-token", "admin-token-longer")
    assert not constant_time_equals("", "x")
    assert constant_time_equals("é\udc80", "é\udc80")


def test_public_names_exist() -> None:
    for name in capability.__all__:
        assert hasattr(capability, name), name
