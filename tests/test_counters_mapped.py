"""The daemon's reader of the request counter files (``counters.Mapped``): each file mapped once and
read in place at every scrape, following the writer's counts, a file replaced, and a file removed."""

import os

from daemon.runtime._serve import counters


def test_a_mapped_reader_follows_the_writer_and_a_replaced_or_removed_file(tmp_path):
    folder = str(tmp_path / "requests")
    writer = counters.RequestCounters(f"{folder}/a.direct")
    reader = counters.Mapped()
    assert reader.scan(folder).keys() == {"a.direct"}
    assert reader.read(folder, "a.direct") == counters.Counts({}, [0] * (len(counters.BOUNDS) + 1), 0.0)
    for _ in range(3):
        writer.observe(200, 0.001)
    writer.observe(599, 0.2)  # (a status word on the file's second page)
    found = reader.read(folder, "a.direct")  # the same map, read again: the writer's counts as they are now
    assert found is not None and found.codes == {"200": 3, "599": 1} and abs(found.sum - 0.203) < 1e-9
    assert found == counters.read(f"{folder}/a.direct")  # what one pread of the file says
    assert reader.read(folder, "a.direct") is found  # unchanged since: the last reading, not parsed again
    writer.observe(200, 0.001)
    assert reader.read(folder, "a.direct").codes == {"200": 4, "599": 1}  # type: ignore[union-attr]
    writer.close()

    os.unlink(f"{folder}/a.direct")  # a delete, then a new server's file at the same name: another inode
    again = counters.RequestCounters(f"{folder}/a.direct")
    again.observe(404, 0.0)
    reader.scan(folder)
    assert reader.read(folder, "a.direct").codes == {"404": 1}  # type: ignore[union-attr]
    again.close()

    with open(f"{folder}/b.direct", "wb") as f:  # a file being made (shorter than a counter file): not mapped yet
        f.write(b"\x00" * 100)
    reader.scan(folder)
    assert reader.read(folder, "b.direct") is None
    os.unlink(f"{folder}/a.direct")
    assert reader.scan(folder).keys() == {"b.direct"}
    assert reader._maps.keys() == set()  # the removed file's map is gone with it
