"""A replica's refusal crosses the handle as a Rejected and comes back as the same APIError."""

from __future__ import annotations

import pickle

import pytest

from serve_app.errors import (
    APIError,
    ContextLengthExceededError,
    InvalidRequestError,
    ServiceUnavailableError,
)
from serve_app.openai_adapter import Rejected

ERRORS = [
    ContextLengthExceededError("too long", param="prompt"),
    InvalidRequestError("no chat template", param="model", code="chat_not_supported"),
    ServiceUnavailableError("not loaded", code="model_unavailable", headers={"Retry-After": "1"}),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_survives_the_round_trip_through_the_handle(error: APIError) -> None:
    rejected = pickle.loads(pickle.dumps(Rejected.from_error(error)))  # as a handle carries it
    again = rejected.to_error()
    assert isinstance(again, APIError)
    assert (again.status_code, again.error_type, again.param, again.code) == (
        error.status_code,
        error.error_type,
        error.param,
        error.code,
    )
    assert again.message == error.message and again.headers == error.headers
    assert again.to_dict() == error.to_dict()


def test_the_rebuilt_error_does_not_change_its_class() -> None:
    Rejected.from_error(ServiceUnavailableError("x")).to_error()
    assert APIError.status_code == 500 and APIError.error_type == "server_error"
