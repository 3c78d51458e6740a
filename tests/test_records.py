"""The process record (``service.pid``): a typed record, and the files earlier versions wrote still load."""

from __future__ import annotations

import dataclasses

import pytest

from daemon.linux import ProcessIdentity
from daemon.store import LaunchInfo, PidRecord

# As an earlier daemon wrote it in the middle of a hand-over (a dict of short keys then).
EARLIER = "3345\n1372428\nboot-a\nf=/r/x.f\nh=/r/x.h\nlaunch=c3\nprev=3300:1372000:boot-a\nprev_launch=b2\nprev_version=1\nversion=2\n"


def test_a_record_written_by_an_earlier_version_loads_with_its_previous_server():
    record = PidRecord.loads(EARLIER)
    assert record.ident == ProcessIdentity(3345, 1372428, "boot-a")
    assert record.info == LaunchInfo(version="2", launch="c3", health_socket="/r/x.h", fd_socket="/r/x.f")
    assert record.previous == PidRecord(ProcessIdentity(3300, 1372000, "boot-a"), LaunchInfo(version="1", launch="b2"))
    assert record.dumps().decode() == EARLIER  # and is written back the same, byte for byte


def test_what_a_record_lacks_is_none_and_keys_it_does_not_know_are_ignored():
    record = PidRecord.loads("10\n20\nboot\nsomething_new=1\n")
    assert record.info == LaunchInfo() and record.previous is None
    assert PidRecord.loads("10\n20\nboot\nprev=garbage\n").previous is None  # unreadable: no previous server


def test_a_mistyped_field_fails_instead_of_reading_none():
    info = LaunchInfo(version="1")
    with pytest.raises(AttributeError):
        info.verison  # noqa: B018 - the typo is the test
    with pytest.raises(TypeError):
        LaunchInfo(verison="1")  # type: ignore[call-arg]  # the typo is the test
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.version = "2"  # type: ignore[misc]  # frozen: a record is replaced, never edited


def test_a_tag_is_read_like_a_record():
    assert LaunchInfo.from_tag('{"version": "3", "launch": "ab", "role": "x"}') == LaunchInfo(version="3", launch="ab")
    assert LaunchInfo.from_tag("not json") == LaunchInfo() == LaunchInfo.from_tag("[1]")
