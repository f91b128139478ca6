import jwt
import pytest

from refresher.errors import BadResponseError
from refresher.token import Token, fingerprint


def make_jwt(exp: float | None) -> str:
    claims = {"sub": "x"}
    if exp is not None:
        claims["exp"] = int(exp)
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


def test_repr_and_str_never_show_the_value() -> None:
    token = Token(
        value="super-secret-token-value", token_type="Bearer", obtained_at=0, expires_at=10
    )
    assert "super-secret" not in repr(token)
    assert "super-secret" not in str(token)
    assert token.fingerprint() in str(token)
    assert token.fingerprint() == fingerprint("super-secret-token-value")
    assert len(token.fingerprint()) == 12


def test_token_is_frozen() -> None:
    token = Token(value="v", token_type="Bearer", obtained_at=0, expires_at=10)
    with pytest.raises(AttributeError):
        token.value = "other"  # type: ignore[misc]


def test_expiry_is_min_of_expires_in_and_jwt_exp() -> None:
    now = 1_000_000.0
    early = Token.from_grant(make_jwt(now + 60), obtained_at=now, expires_in=3600)
    assert early.expires_at == now + 60
    late = Token.from_grant(make_jwt(now + 7200), obtained_at=now, expires_in=3600)
    assert late.expires_at == now + 3600
    only_exp = Token.from_grant(make_jwt(now + 90), obtained_at=now)
    assert only_exp.expires_at == now + 90


def test_opaque_token_uses_expires_in_only() -> None:
    token = Token.from_grant("opaque.value", obtained_at=100.0, expires_in=30)
    assert token.expires_at == 130.0


@pytest.mark.parametrize("expires_in", [0, -5, "an hour", "-5", "1e400", True, float("nan"), [1]])
def test_bad_expires_in_is_rejected(expires_in: object) -> None:
    with pytest.raises(BadResponseError, match="expires_in"):
        Token.from_grant("opaque", obtained_at=0, expires_in=expires_in)


def test_no_expiry_is_rejected_unless_assumed() -> None:
    with pytest.raises(BadResponseError, match="assume_lifetime"):
        Token.from_grant("opaque", obtained_at=0)
    assert Token.from_grant("opaque", obtained_at=5, assume_lifetime=60).expires_at == 65


def test_missing_value_is_rejected() -> None:
    with pytest.raises(BadResponseError, match="access_token"):
        Token.from_grant(None, obtained_at=0, expires_in=5)
