"""The codec contract, checked the same way for every registered RPC codec."""

from __future__ import annotations

import pytest

from shoal.codec.rpc.base import FRAME_FIELDS, Match, RpcErrorKind, RpcFrame, RpcProtocolError
from shoal.codec.rpc.registry import CODECS

NAMES = sorted(CODECS)


@pytest.mark.parametrize("name", NAMES)
def test_frames_before_a_bad_one_are_kept(name: str) -> None:
    """A good frame and garbage in one read: the error carries the good frame and the
    start of the bad bytes, so the proxy serves the first and answers the second."""
    codec = CODECS[name]
    good = codec.heartbeat(4)
    garbage = b"\x00not a frame of any protocol, certainly" * 2
    with pytest.raises(RpcProtocolError) as caught:
        codec.decoder().feed(good + garbage)
    (frame,) = caught.value.frames
    assert frame.heartbeat and frame.request_id == 4
    assert caught.value.at == garbage[:64]


@pytest.mark.parametrize("name", NAMES)
def test_heartbeats_and_ids(name: str) -> None:
    codec = CODECS[name]
    (beat,) = codec.decoder().feed(codec.heartbeat(11))
    assert beat.is_request and beat.heartbeat and beat.request_id == 11
    (reply,) = codec.decoder().feed(codec.heartbeat_reply(beat))
    assert not reply.is_request and reply.heartbeat and reply.request_id == 11
    renumbered = codec.set_request_id(beat.raw, 2**31 - 1)
    assert codec.decoder().feed(renumbered)[0].request_id == 2**31 - 1
    assert len(renumbered) == len(beat.raw)


@pytest.mark.parametrize("name", NAMES)
def test_detection_by_magic(name: str) -> None:
    codec = CODECS[name]
    frame = codec.heartbeat(1)
    assert codec.match(frame) is Match.MATCH
    assert codec.match(frame[:1]) is Match.NEED_MORE
    assert codec.match(b"GET / HTTP/1.1\r\n") is Match.NO
    others = [other for other in NAMES if other != name]
    assert all(CODECS[other].match(frame) is Match.NO for other in others)


@pytest.mark.parametrize("name", NAMES)
def test_local_replies_answer_the_request_id(name: str) -> None:
    codec = CODECS[name]
    request = RpcFrame(is_request=True, request_id=99, raw=codec.heartbeat(99))
    for kind in RpcErrorKind:
        (reply,) = codec.decoder().feed(codec.local_reply(request, kind, f"why: {kind.value}"))
        assert not reply.is_request and reply.request_id == 99 and not reply.ok


def test_frame_fields_name_every_field() -> None:
    frame = RpcFrame(is_request=True, request_id=1)
    assert all(hasattr(frame, name) for name in FRAME_FIELDS)
    slots = getattr(RpcFrame, "__slots__", FRAME_FIELDS)  # compiled: no __slots__ to read
    assert set(slots) == set(FRAME_FIELDS)
