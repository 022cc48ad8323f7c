from __future__ import annotations

import uuid

import pytest

from orchestrator_data import ValidationError
from orchestrator_data.db.driver_errors import is_retryable
from orchestrator_data.errors import RetryExhaustedError, sqlstate_of
from orchestrator_data.pagination import decode_cursor, encode_cursor


class FakePgError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.pgcode = code


class Wrapper(Exception):
    def __init__(self, orig: BaseException) -> None:
        super().__init__("wrapped")
        self.orig = orig


def test_sqlstate_found_through_any_wrapping() -> None:
    inner = FakePgError("40001")
    assert sqlstate_of(Wrapper(inner)) == "40001"
    try:
        try:
            raise inner
        except FakePgError as e:
            raise RuntimeError("outer") from e
    except RuntimeError as outer:
        assert sqlstate_of(outer) == "40001"
        assert is_retryable(outer)
    assert not is_retryable(Wrapper(FakePgError("23505")))
    assert sqlstate_of(ValueError("plain")) is None


def test_retry_exhausted_carries_the_last_error() -> None:
    last = Wrapper(FakePgError("40P01"))
    err = RetryExhaustedError(5, last)
    assert err.last_error is last
    assert "40P01" in str(err)


def test_cursor_round_trip_and_garbage() -> None:
    from datetime import datetime, timezone

    ident = uuid.uuid4()
    moment = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    assert decode_cursor(encode_cursor(moment, ident)) == (moment, ident)
    assert decode_cursor(encode_cursor(7, ident)) == (7, ident)
    with pytest.raises(ValidationError) as info:
        decode_cursor("definitely-not-a-cursor")
    assert info.value.fields == ["after"]
