"""An independent NBD client for the tests (libnbd, Debian's python3-libnbd; run it with
/usr/bin/python3): reads an export handed over as a connected socket.

    /usr/bin/python3 tests/nbd_reader.py FD CONTEXT RESTORE_ONTO

Prints JSON: the export's size and the extents of CONTEXT as the server reports them
(``[start, length, flags]``); with RESTORE_ONTO (a raw file, or "-"), writes every extent
the context marks dirty onto it (zeroed ranges read as zeros).
"""

import json
import sys

import nbd  # type: ignore[import-not-found]

CHUNK = 32 << 20


def main() -> None:
    fd, context, onto = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    handle = nbd.NBD()
    handle.add_meta_context(context)
    handle.connect_socket(fd)
    size = handle.get_size()
    found: dict[str, list[list[int]]] = {context: []}

    def collect(name: str, offset: int, entries: list[int], error: object) -> int:
        runs = found.setdefault(name, [])
        for i in range(0, len(entries), 2):
            runs.append([offset, entries[i], entries[i + 1]])
            offset += entries[i]
        return 0

    offset = 0
    while offset < size:
        before = sum(r[1] for r in found[context])
        handle.block_status(min(size - offset, 1 << 30), offset, collect)
        got = sum(r[1] for r in found[context]) - before
        offset += got if got else size - offset
    if onto != "-":
        with open(onto, "r+b") as out:
            for start, length, flags in found[context]:
                for part_start, part_length in _split(start, length) if flags & 1 else ():
                    out.seek(part_start)
                    out.write(handle.pread(part_length, part_start))
    handle.shutdown()
    print(json.dumps({"size": size, "extents": found[context]}))


def _split(start: int, length: int) -> list[tuple[int, int]]:
    return [(o, min(CHUNK, start + length - o)) for o in range(start, start + length, CHUNK)]


if __name__ == "__main__":
    main()
