"""Password hashing with scrypt (a slow, memory-hard KDF from the standard library).

Stored as ``scrypt$N$r$p$salt_hex$digest_hex`` with a fresh 16-byte salt per
hash. Passwords are encoded with ``surrogatepass`` on both sides, so any Python
string (even one holding a lone surrogate from a browser) hashes and verifies
the same way instead of raising.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1
_DKLEN = 32
# Bounds on parameters read back from the database: a tampered row must not
# make one login allocate gigabytes.
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16


def _encode(password: str) -> bytes:
    return password.encode("utf-8", "surrogatepass")


def hash_password(password: str) -> str:
    if not isinstance(password, str):
        raise TypeError("a password is text")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(_encode(password), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN, maxmem=2**26)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False for a wrong password or a malformed hash."""
    if not isinstance(password, str) or not isinstance(stored, str):
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        n_, r_, p_ = int(n), int(r), int(p)
        salt_b, digest_b = bytes.fromhex(salt), bytes.fromhex(digest)
    except ValueError:
        return False
    if scheme != "scrypt" or not (2 <= n_ <= _MAX_N and 1 <= r_ <= _MAX_R and 1 <= p_ <= _MAX_P) or not digest_b:
        return False
    try:
        candidate = hashlib.scrypt(_encode(password), salt=salt_b, n=n_, r=r_, p=p_, dklen=len(digest_b), maxmem=2**27)
    except ValueError:  # parameters over the memory bound, or not a power of two
        return False
    return hmac.compare_digest(candidate, digest_b)


_DUMMY: str | None = None


def dummy_verify(password: str) -> None:
    """Spend one verification's time (for unknown user names, so timing does not tell which names exist)."""
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = hash_password(secrets.token_urlsafe(12))
    verify_password(password, _DUMMY)
