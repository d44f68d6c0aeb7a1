"""gRPC's words (sidecar.grpc): status names and mapping, grpc-timeout, grpc-message,
the sidecar's Trailers-Only errors; and the raw frame judge (sidecar.h2frames)."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes

from sidecar import grpc as g
from sidecar.h2frames import (
    PREFACE,
    FrameError,
    FrameReader,
    RawFrame,
    goaway_bytes,
    parse_goaway,
)
from sidecar.vocab import Reason


def test_code_names_are_go_grpc_prometheus_spelling() -> None:
    assert [g.code_name(c) for c in range(17)] == [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ]
    assert g.code_name(17) == "Unknown"
    assert g.code_name(-1) == "Unknown"


@pytest.mark.parametrize(
    ("http", "code"),
    [
        (400, 13),
        (401, 16),
        (403, 7),
        (404, 12),
        (429, 14),
        (431, 13),
        (502, 14),
        (503, 14),
        (504, 14),
        (200, 2),
        (500, 2),
        (418, 2),
    ],
)
def test_http_status_mapping(http: int, code: int) -> None:
    assert g.from_http_status(http) == code
    assert g.status_of(http, None) == code


def test_grpc_status_wins_over_http_status() -> None:
    assert g.status_of(503, "0") == 0
    assert g.status_of(200, "14") == 14
    assert g.status_of(200, "x") == 2  # garbage is UNKNOWN
    assert g.status_of(200, "") == 2
    assert g.parse_status(None) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1H", 3600.0),
        ("2M", 120.0),
        ("3S", 3.0),
        ("250m", 0.25),
        ("1500u", 0.0015),
        ("7n", 7e-9),
        ("99999999S", 99999999.0),
        ("0m", 0.0),
    ],
)
def test_parse_timeout(value: str, seconds: float) -> None:
    assert g.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", [None, "", "m", "5", "5x", "123456789S", "-5S", "1.5S", " 5S", "5 S", "\uff15S"]
)
def test_parse_timeout_invalid(value: str | None) -> None:
    assert g.parse_timeout(value) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (1.0, "1000m"),
        (0.3, "300m"),
        (0.0019, "1m"),  # rounded down
        (0.0004, "1m"),  # at least 1
        (0.0, "1m"),
        (123.4567, "123456m"),
        (10**9, "99999999m"),  # at most 8 digits
        (float("inf"), "99999999m"),
    ],
)
def test_format_timeout(seconds: float, text: str) -> None:
    assert g.format_timeout(seconds) == text
    parsed = g.parse_timeout(text)
    assert parsed is not None and parsed <= max(seconds, 0.001)


def test_format_timeout_rejects_nan() -> None:
    with pytest.raises(ValueError, match="not a number"):
        g.format_timeout(float("nan"))


@pytest.mark.parametrize(
    ("message", "encoded"),
    [
        ("plain text, fine!", "plain text, fine!"),
        ("100%", "100%25"),
        ("ünï", "%C3%BCn%C3%AF"),
        ("tab\there\nnew", "tab%09here%0Anew"),
        ("~ and \x7f", "~ and %7F"),
        ("", ""),
    ],
)
def test_grpc_message_percent_encoding(message: str, encoded: str) -> None:
    assert g.encode_message(message) == encoded
    assert g.decode_message(encoded) == message


def test_grpc_message_decoding_never_fails() -> None:
    assert g.decode_message("50%") == "50%"
    assert g.decode_message("%zz%4") == "%zz%4"
    assert g.decode_message("%41%42") == "AB"
    assert g.decode_message("%FF") == "\ufffd"  # not UTF-8: replaced, not an error


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (Reason.NO_ROUTE, 12),
        (Reason.CIRCUIT_OPEN, 14),
        (Reason.OVERLOADED, 14),
        (Reason.NO_HEALTHY_UPSTREAM, 14),
        (Reason.UPSTREAM_UNREACHABLE, 14),
        (Reason.UPSTREAM_RESET, 14),
        (Reason.TIMEOUT, 4),
        (Reason.BAD_REQUEST, 13),
        (Reason.FAULT_INJECTED, 14),
    ],
)
def test_sidecar_reasons_as_grpc_status(reason: Reason, code: int) -> None:
    assert g.status_for_reason(reason) == code


def test_fault_status_is_configurable() -> None:
    assert g.status_for_reason(Reason.FAULT_INJECTED, fault_status=8) == 8
    assert g.status_for_reason(Reason.TIMEOUT, fault_status=8) == 4


def test_trailers_only_error_head() -> None:
    fields = g.error_trailers(
        Reason.NO_ROUTE, "no route for /a.B/C (100%)", extra=[("x-sidecar-attempts", "0")]
    )
    assert fields == [
        ("content-type", "application/grpc"),
        ("grpc-status", "12"),
        ("grpc-message", "no_route: no route for /a.B/C (100%25)"),
        ("x-sidecar-error", "no_route"),
        ("x-sidecar-attempts", "0"),
    ]
    assert g.error_trailers(Reason.TIMEOUT)[1:3] == [
        ("grpc-status", "4"),
        ("grpc-message", "timeout"),
    ]


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("application/grpc+json", True),
        ("application/grpc;charset=utf-8", True),
        ("Application/GRPC", True),
        ("application/grpc-web", False),
        ("application/grpcx", False),
        ("application/json", False),
        ("", False),
        (None, False),
    ],
)
def test_is_grpc(content_type: str | None, grpc: bool) -> None:
    assert g.is_grpc(content_type) is grpc


# --------------------------------------------------------------------------- frames


def _header(length: int, ftype: int, flags: int = 0, stream: int = 0) -> bytes:
    return length.to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big")


SETTINGS = _header(0, 0x4)


def test_frames_split_across_reads() -> None:
    reader = FrameReader(expect_preface=True, max_header_block=1000)
    data = PREFACE + SETTINGS + _header(3, 0x0, 0x1, 1) + b"abc"
    frames: list[RawFrame] = []
    for i in range(len(data)):  # one byte at a time
        frames.extend(reader.feed(data[i : i + 1]))
    assert [(f.type, f.stream_id, f.payload) for f in frames] == [(4, 0, b""), (0, 1, b"abc")]
    assert reader.buffered == 0


def test_oversized_frame_is_refused_from_its_header() -> None:
    reader = FrameReader(expect_preface=False, max_header_block=1000)
    list(reader.feed(SETTINGS))
    with pytest.raises(FrameError, match="frame of 16385 bytes") as info:
        list(reader.feed(_header(16385, 0x0, 0, 1)))  # the header alone, no payload
    assert info.value.code == ErrorCodes.FRAME_SIZE_ERROR


def test_bad_preface_and_first_frame() -> None:
    with pytest.raises(FrameError, match="preface"):
        list(FrameReader(expect_preface=True, max_header_block=10).feed(b"PRI * HTTP/1.1"))
    with pytest.raises(FrameError, match="first frame is not SETTINGS"):
        list(FrameReader(expect_preface=False, max_header_block=10).feed(_header(8, 0x6)))


def test_header_block_rules() -> None:
    reader = FrameReader(expect_preface=False, max_header_block=100)
    list(reader.feed(SETTINGS + _header(10, 0x1, 0, 1) + b"x" * 10))  # HEADERS, no END_HEADERS
    with pytest.raises(FrameError, match="other than CONTINUATION"):
        list(reader.feed(_header(8, 0x6)))
    reader = FrameReader(expect_preface=False, max_header_block=100)
    list(reader.feed(SETTINGS + _header(60, 0x1, 0, 1) + b"x" * 60))
    with pytest.raises(FrameError, match="not ended within 100 bytes") as info:
        list(reader.feed(_header(50, 0x9, 0, 1)))
    assert info.value.code == ErrorCodes.ENHANCE_YOUR_CALM
    reader = FrameReader(expect_preface=False, max_header_block=100)
    with pytest.raises(FrameError, match="CONTINUATION without a header block"):
        list(reader.feed(SETTINGS + _header(0, 0x9, 0x4, 1)))


def test_goaway_roundtrip() -> None:
    reader = FrameReader(expect_preface=False, max_header_block=10)
    (_settings, goaway) = list(reader.feed(SETTINGS + goaway_bytes(7, ErrorCodes.NO_ERROR, "bye")))
    assert parse_goaway(goaway) == (7, 0)
