"""Fuzz the Block Valve boundary (and through it the C core) with atheris.

Each input is decoded into a short program of valve calls on a 64-sector image file opened
fresh for the input: ``block_info``, ``block_read`` (fresh memory or ``into=`` an aligned
buffer, a bytearray, an unaligned memoryview slice, a read-only bytes), ``block_write``
(bytes, bytearray, valve buffers and unaligned slices of them, vectored lists of pieces,
durable or not), ``alloc_buffer``, ``restrict`` (any rights bits, any window, wrong types),
``revoke``, forged capabilities, and closing the valve — with addresses and counts drawn
near the edges (negative, zero, the last sector, past the end, 2**63, 2**64 + k).

The contract checked: every call either succeeds or raises one of the valve's refusals
(``CapabilityError``, ``RangeError``) or ``TypeError``/``ValueError`` for an argument of the
wrong kind; a successful read returns exactly ``count * sector_size`` bytes; what a successful
write wrote reads back; ``stats.denials`` never decreases.  Anything else (another exception,
a crash of the C core) is a finding; libFuzzer saves the input as ``crash-<sha1>``, and it
becomes a regression case in ``fuzz/regressions/`` replayed by tests/test_fuzz_valve.py.

Run (documented in docs/RELIABILITY.md)::

    .venv/bin/python fuzz/fuzz_valve.py -max_total_time=600 fuzz/corpus

:func:`one_input` is importable without atheris (the test suite replays it with hypothesis).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if __name__ == "__main__":  # instrument the valve for coverage before it is imported
    import atheris

    with atheris.instrument_imports():
        import valve  # noqa: F401

from valve import (  # noqa: E402
    AlignedBuffer,
    Capability,
    CapabilityError,
    RangeError,
    Rights,
    Valve,
)

ALLOWED = (CapabilityError, RangeError, TypeError, ValueError)
SECTORS = 64
_IMAGE: Path | None = None


def image_path() -> Path:
    """One scratch image per process (recreated if something removed it)."""
    global _IMAGE
    if _IMAGE is None or not _IMAGE.exists():
        directory = Path(tempfile.mkdtemp(prefix="nexfs-fuzz-"))
        _IMAGE = directory / "fuzz.img"
        with open(_IMAGE, "wb") as f:
            f.write(bytes(SECTORS * 4096))
    return _IMAGE


class Input:
    """Draws small integers and byte strings from the fuzzer's data (zeros when exhausted)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def left(self) -> int:
        return len(self.data) - self.pos

    def choice(self, n: int) -> int:
        return self.byte() % n

    def number(self, total: int) -> int:
        """An address or a count, mostly near the interesting edges."""
        kind = self.choice(10)
        small = self.byte()
        return [small % (total + 2), total - 1, total, total + 1, -1 - small % 4, 0, 1,
                2**63 - small, 2**64 + small, int.from_bytes(bytes(self.byte()
                                                                    for _ in range(8)),
                                                              "little", signed=True)][kind]

    def blob(self, n: int) -> bytes:
        n = max(0, min(n, 1 << 16))
        return bytes((self.byte() + i) & 0xFF for i in range(n))


def _data(inp: Input, valve_buf: AlignedBuffer, nbytes: int) -> object:
    """Write data of ``nbytes`` (or slightly off) in one of many shapes."""
    kind = inp.choice(8)
    n = nbytes + [0, 0, 0, 0, 1, -1, 512, -512][inp.choice(8)]
    n = max(0, n)
    raw = inp.blob(min(n, 1 << 16)) if n <= 1 << 16 else bytes(n)
    if kind == 0:
        return raw
    if kind == 1:
        return bytearray(raw)
    if kind == 2 and n <= len(valve_buf):
        memoryview(valve_buf)[:n] = raw
        return memoryview(valve_buf)[:n]
    if kind == 3 and n + 1 <= len(valve_buf):
        memoryview(valve_buf)[1 : n + 1] = raw
        return memoryview(valve_buf)[1 : n + 1]  # unaligned valve memory: bounced
    if kind == 4:
        cut = inp.choice(max(1, n + 1))
        return [raw[:cut], raw[cut:]]
    if kind == 5:
        return [memoryview(raw)]
    if kind == 6:
        return (raw, b"")
    return memoryview(bytearray(raw)).toreadonly()


def _into(inp: Input, nbytes: int) -> object:
    nbytes = min(nbytes, 1 << 16)
    kind = inp.choice(6)
    n = max(0, nbytes + [0, 0, 1, -1, 4096, -512][inp.choice(6)])
    if kind == 0:
        buf = AlignedBuffer(max(n, 1))
        return buf
    if kind == 1:
        return bytearray(n)
    if kind == 2:
        return memoryview(bytearray(n + 3))[3:]
    if kind == 3:
        return bytes(n)  # read-only: TypeError
    if kind == 4:
        return memoryview(AlignedBuffer(max(n + 512, 4096)))[512 : 512 + n]
    return None


def one_input(data: bytes) -> None:
    inp = Input(data)
    valve = Valve.open(image_path())
    try:
        ss = valve.grant(Rights.READ).block_info().sector_size
        total = valve.grant(Rights.READ).block_info().total_sectors
        caps: list[Capability] = [valve.grant(Rights.READ | Rights.WRITE)]
        vbuf = caps[0].alloc_buffer(8 * 4096)
        denials = 0
        for _step in range(24):
            if inp.left() <= 0:
                break
            cap = caps[inp.choice(len(caps))]
            op = inp.choice(9)
            try:
                if op == 0:
                    info = cap.block_info()
                    assert info.sector_size == ss and info.total_sectors == total
                elif op == 1:
                    lba, count = inp.number(total), inp.number(8)
                    into = _into(inp, max(0, count) * ss) if inp.choice(2) else None
                    got = cap.block_read(lba, count, into=into)  # type: ignore[arg-type]
                    assert got.nbytes == count * ss, (got.nbytes, count)
                elif op == 2:
                    lba, count = inp.number(total), inp.number(8)
                    payload = _data(inp, vbuf, max(0, min(count, 16)) * ss)
                    durable = bool(inp.choice(2))
                    if isinstance(payload, list | tuple):
                        expect = b"".join(bytes(p) for p in payload)
                    else:
                        expect = bytes(payload)  # type: ignore[call-overload]
                    cap.block_write(lba, count, payload, durable=durable)  # type: ignore
                    assert len(expect) == count * ss
                    back = caps[0].block_read(lba, count) if caps[0].rights else None
                    assert back is None or bytes(back) == expect, "write did not read back"
                elif op == 3:
                    n = [0, 1, 511, 512, 4096, 4097, -1, 1 << 20][inp.choice(8)]
                    buf = cap.alloc_buffer(n)
                    assert len(buf) == n
                elif op == 4:
                    bits = inp.choice(4)
                    shape = inp.choice(5)
                    window: object = [None, (inp.number(total), inp.number(total)),
                                      (0, total), [0, 1], "range"][shape]
                    caps.append(cap.restrict(Rights(bits), window))  # type: ignore[arg-type]
                elif op == 5:
                    cap.revoke()
                elif op == 6:
                    fake = object.__new__(Capability)
                    object.__setattr__(fake, "_valve", valve)
                    object.__setattr__(fake, "_token", inp.byte() % 8)
                    caps.append(fake)
                elif op == 7 and inp.choice(8) == 0:
                    valve.close()
                else:
                    _ = cap.rights, repr(cap)
            except ALLOWED:
                pass
            now = valve.stats.denials
            assert now >= denials, "denial counter went backwards"
            denials = now
    finally:
        valve.close()


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
