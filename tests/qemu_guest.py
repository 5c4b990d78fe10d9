"""A running QEMU guest whose RAM is a shared ``/dev/shm`` file, for live-migration tests.

The guest has no operating system. Its disk holds one hand-assembled boot
sector (:func:`boot_sector`) that SeaBIOS loads at ``0x7C00``; the program
switches to 32-bit protected mode with a flat GDT, programs the PIT to tick at
about 1 kHz, and then loops forever:

- a *sweep* walks the guest-physical range ``SWEEP_START``..``SWEEP_END``
  (16 MiB to 48 MiB of a 64 MiB guest: 8192 pages) at a stride of one page,
  incrementing one 32-bit word in every page; the word's offset in the page
  moves by 4 bytes every sweep (``(sweeps * 4) & 0xFFC``), so over time every
  part of every page changes;
- after every word it increments the *write counter*; after every
  ``writes_per_tick`` words (default 10) it sleeps in ``hlt`` until the next
  timer tick. So the guest dirties about ``1000 * writes_per_tick`` pages a
  second (10 000 by default: a sweep every ~0.8 s), at the same pace under KVM
  and TCG, well below what loopback carries, and it leaves the host CPU idle
  between ticks (a busy delay loop would take a whole host CPU per guest);
- the *marker* at guest-physical ``MARKER_ADDR`` (15 MiB) holds the magic
  ``b"MPMQ"`` (written once, when the program starts), then the sweep count,
  then the write count (little-endian 32-bit words). The host reads it from
  the backend file to tell that the program runs and is writing right now.

Interrupts are enabled only around the ``hlt``. The timer handler (the IDT maps
vectors 0..15 to it; SeaBIOS left the master PIC at vector base 8, so IRQ 0 is
vector 8) acknowledges the PIC, resets the stack and jumps back into the loop:
it never returns with ``iret``. (An ``iretd`` version of this program hung
forever on that ``iretd`` under the nested KVM of the machine this was written
on, while it ran under TCG.)

With ``-m 64M`` on the ``pc`` machine, guest-physical addresses below 64 MiB are
offsets in the backend file, so the host reads the marker at file offset
``MARKER_ADDR``.

QEMU runs with ``memory-backend-file,share=on`` over a file named with the
per-test-worker ``MPMULTIFD_SHM_PREFIX`` (:func:`mpmultifd._shm.unique_name`),
so the leak checks of ``tests/conftest.py`` notice a file left behind;
:meth:`QemuGuest.close` kills and reaps QEMU and deletes the file, whatever
happened. ``accel=kvm:tcg`` uses KVM when ``/dev/kvm`` can be opened and falls
back to TCG otherwise; under KVM the vCPU writes straight into the shared
pages (through the guest's own mapping), and a host process that maps the same
file sees them, as the scanning dirty tracker does.

Nothing here needs ``nasm``: :data:`ASM_SOURCE` is the same program in NASM
syntax, kept so that ``tests/test_qemu_guest.py`` can check the hand-assembled
bytes against it when ``nasm`` happens to be installed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass

from mpmultifd._shm import SHM_DIR, unique_name
from mpmultifd.testing import QMP, QMPError
from mpmultifd.testing import _log_tail as _tail

__all__ = [
    "QEMU_BINARY",
    "MEM_SIZE",
    "MARKER_ADDR",
    "SWEEP_START",
    "SWEEP_END",
    "WRITES_PER_TICK",
    "TICK_HZ",
    "MAGIC",
    "PAGE_SIZE",
    "ASM_SOURCE",
    "GuestError",
    "Marker",
    "QMP",
    "QemuGuest",
    "asm_source",
    "boot_sector",
    "qemu_binary",
]

QEMU_BINARY = "qemu-system-x86_64"
MEM_SIZE = 64 << 20
PAGE_SIZE = 4096
MARKER_ADDR = 0x00F0_0000  # 15 MiB: magic, sweep count, write count
SWEEP_START = 0x0100_0000  # 16 MiB
SWEEP_END = 0x0300_0000  # 48 MiB (exclusive)
WRITES_PER_TICK = 10  # page writes between two timer ticks
PIT_DIVISOR = 1193  # 1 193 182 Hz / 1193: the PIT ticks at ~1000 Hz
TICK_HZ = 1_193_182 / PIT_DIVISOR
MAGIC = b"MPMQ"

# addresses of the labels of the program (load address 0x7C00 + offset)
_PM32 = 0x7C24  # first 32-bit instruction, target of the far jump
_SWEEP = 0x7C5E
_WRITE = 0x7C73
_IDLE = 0x7C7E
_TICKED = 0x7C82
_NEXT = 0x7C87
_TIMER = 0x7C9D
_GDT = 0x7CA8  # null, code 0x08, data 0x10
_GDT_DESC = 0x7CC0  # the 6-byte operand of lgdt
_IDT_DESC = 0x7CC6  # the 6-byte operand of lidt
_IDT = 0x7CD0  # 16 interrupt gates
_LOAD = 0x7C00


def qemu_binary() -> str | None:
    """The path of ``qemu-system-x86_64``, or None when it is not on PATH."""
    return shutil.which(QEMU_BINARY)


# --------------------------------------------------------------------------- the boot sector


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _rel8(target: int, next_ip: int) -> bytes:
    """A short jump's displacement (checked to fit)."""
    d = target - next_ip
    assert -128 <= d <= 127, d
    return struct.pack("<b", d)


def boot_sector(writes_per_tick: int = WRITES_PER_TICK) -> bytes:
    """The 512-byte boot sector: hand-assembled machine code, one instruction a line.

    Each line is ``(offset from 0x7C00, bytes)``; the offsets are checked as
    the code is put together, so a wrong length shows at once.
    ``writes_per_tick`` is patched into the two ``mov ecx`` instructions.
    """
    if not 0 < writes_per_tick < 1 << 32:
        raise ValueError(f"writes_per_tick must be a positive 32-bit number, got {writes_per_tick}")
    sweeps, writes = MARKER_ADDR + 4, MARKER_ADDR + 8
    magic = struct.unpack("<I", MAGIC)[0]
    k = _u32(writes_per_tick)
    lines = [
        # ---- 16-bit real mode, CS:IP = 0000:7C00
        (0x00, b"\xfa"),                          # cli                    interrupts stay off but in the idle loop
        (0x01, b"\x31\xc0"),                      # xor ax, ax
        (0x03, b"\x8e\xd8"),                      # mov ds, ax             DS = 0: lgdt's operand is at 0:7CC0
        (0x05, b"\x8e\xd0"),                      # mov ss, ax
        (0x07, b"\xbc\x00\x7c"),                  # mov sp, 0x7c00
        (0x0A, b"\xe4\x92"),                      # in al, 0x92            "fast A20" gate (system control port A)
        (0x0C, b"\x0c\x02"),                      # or al, 2               bit 1: enable A20
        (0x0E, b"\x24\xfe"),                      # and al, 0xfe           bit 0 clear: do not reset the machine
        (0x10, b"\xe6\x92"),                      # out 0x92, al
        (0x12, b"\x0f\x01\x16" + struct.pack("<H", _GDT_DESC)),  # lgdt [0x7cc0]
        (0x17, b"\x0f\x20\xc0"),                  # mov eax, cr0
        (0x1A, b"\x0c\x01"),                      # or al, 1               CR0.PE: protected mode
        (0x1C, b"\x0f\x22\xc0"),                  # mov cr0, eax
        (0x1F, b"\xea" + struct.pack("<HH", _PM32, 0x08)),  # jmp 0x08:pm32   load the 32-bit code segment
        # ---- pm32: 32-bit protected mode, flat 4 GiB segments
        (0x24, b"\xb8\x10\x00\x00\x00"),          # mov eax, 0x10          the data segment selector
        (0x29, b"\x8e\xd8"),                      # mov ds, eax
        (0x2B, b"\x8e\xc0"),                      # mov es, eax
        (0x2D, b"\x8e\xd0"),                      # mov ss, eax
        (0x2F, b"\xbc\x00\x7c\x00\x00"),          # mov esp, 0x7c00        interrupt frames go below the code
        (0x34, b"\x0f\x01\x1d" + _u32(_IDT_DESC)),  # lidt [0x7cc6]
        (0x3B, b"\xb0\x34"),                      # mov al, 0x34           PIT channel 0, lo/hi byte, mode 2 (rate)
        (0x3D, b"\xe6\x43"),                      # out 0x43, al
        (0x3F, b"\xb0" + bytes([PIT_DIVISOR & 0xFF])),  # mov al, 0xa9   divisor 1193 (0x04a9): ~1000 Hz
        (0x41, b"\xe6\x40"),                      # out 0x40, al
        (0x43, b"\xb0" + bytes([PIT_DIVISOR >> 8])),  # mov al, 0x04
        (0x45, b"\xe6\x40"),                      # out 0x40, al
        (0x47, b"\xb0\xfe"),                      # mov al, 0xfe           master PIC: only IRQ 0 (the PIT) unmasked
        (0x49, b"\xe6\x21"),                      # out 0x21, al
        (0x4B, b"\xb0\xff"),                      # mov al, 0xff           slave PIC: everything masked
        (0x4D, b"\xe6\xa1"),                      # out 0xa1, al
        (0x4F, b"\xc7\x05" + _u32(MARKER_ADDR) + _u32(magic)),  # mov dword [MARKER], 'MPMQ'
        (0x59, b"\xb9" + k),                      # mov ecx, K             writes left before the next sleep
        # ---- sweep:
        (0x5E, b"\x8b\x3d" + _u32(sweeps)),       # mov edi, [MARKER+4]    the sweep count ...
        (0x64, b"\xc1\xe7\x02"),                  # shl edi, 2
        (0x67, b"\x81\xe7\xfc\x0f\x00\x00"),      # and edi, 0xffc         ... picks the word offset in every page
        (0x6D, b"\x81\xc7" + _u32(SWEEP_START)),  # add edi, SWEEP_START
        # ---- write:
        (0x73, b"\xff\x07"),                      # inc dword [edi]        change this page
        (0x75, b"\xff\x05" + _u32(writes)),       # inc dword [MARKER+8]   count the write
        (0x7B, b"\x49"),                          # dec ecx
        (0x7C, b"\x75" + _rel8(_NEXT, 0x7C7E)),   # jnz next               writes left: no sleep
        # ---- idle:
        (0x7E, b"\xfb"),                          # sti                    (takes effect after the next instruction)
        (0x7F, b"\xf4"),                          # hlt                    sleep; the timer handler jumps to ticked
        (0x80, b"\xeb" + _rel8(_IDLE, 0x7C82)),   # jmp idle               woken by something else: sleep again
        # ---- ticked:
        (0x82, b"\xb9" + k),                      # mov ecx, K
        # ---- next:
        (0x87, b"\x81\xc7\x00\x10\x00\x00"),      # add edi, 0x1000        the next page
        (0x8D, b"\x81\xff" + _u32(SWEEP_END)),    # cmp edi, SWEEP_END
        (0x93, b"\x72" + _rel8(_WRITE, 0x7C95)),  # jb write
        (0x95, b"\xff\x05" + _u32(sweeps)),       # inc dword [MARKER+4]   one more sweep done
        (0x9B, b"\xeb" + _rel8(_SWEEP, 0x7C9D)),  # jmp sweep
        # ---- timer: every IDT vector; an interrupt gate, so IF is clear again
        (0x9D, b"\xb0\x20"),                      # mov al, 0x20
        (0x9F, b"\xe6\x20"),                      # out 0x20, al           EOI to the master PIC
        (0xA1, b"\xbc\x00\x7c\x00\x00"),          # mov esp, 0x7c00        drop the interrupt frame ...
        (0xA6, b"\xeb" + _rel8(_TICKED, 0x7CA8)),  # jmp ticked            ... instead of iretd
        # ---- data
        (0xA8, struct.pack("<Q", 0)),                      # gdt: null descriptor
        (0xB0, struct.pack("<Q", 0x00CF_9A00_0000_FFFF)),  # 0x08: code, base 0, limit 4 GiB, 32-bit, exec/read
        (0xB8, struct.pack("<Q", 0x00CF_9200_0000_FFFF)),  # 0x10: data, base 0, limit 4 GiB, read/write
        (0xC0, struct.pack("<HI", 3 * 8 - 1, _GDT)),       # gdt_desc: limit 0x17, base 0x7ca8
        (0xC6, struct.pack("<HI", 16 * 8 - 1, _IDT)),      # idt_desc: limit 0x7f, base 0x7cd0
        (0xCC, bytes(4)),                                  # (align 8)
        # idt: 16 32-bit interrupt gates (type 0x8e, present, DPL 0) to timer in segment 0x08
        (0xD0, struct.pack("<HHBBH", _TIMER & 0xFFFF, 0x08, 0, 0x8E, _TIMER >> 16) * 16),
    ]
    image = b""
    for offset, code in lines:
        assert len(image) == offset, (hex(offset), hex(len(image)))
        image += code
    for label in (_PM32, _SWEEP, _WRITE, _IDLE, _TICKED, _NEXT, _TIMER, _GDT, _GDT_DESC, _IDT_DESC, _IDT):
        assert any(_LOAD + off == label for off, _ in lines), hex(label)
    assert len(image) == 0x150
    return image + bytes(510 - len(image)) + b"\x55\xaa"  # 1FE: the boot signature


ASM_SOURCE = """\
; the program of qemu_guest.boot_sector(), in NASM syntax (nasm -f bin)
bits 16
org 0x7c00
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    in al, 0x92
    or al, 2
    and al, 0xfe
    out 0x92, al
    lgdt [gdt_desc]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp 0x08:pm32
bits 32
pm32:
    mov eax, 0x10
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov esp, 0x7c00
    lidt [idt_desc]
    mov al, 0x34
    out 0x43, al
    mov al, {divisor_lo:#x}
    out 0x40, al
    mov al, {divisor_hi:#x}
    out 0x40, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    mov dword [{marker:#x}], '{magic}'
    mov ecx, strict dword {k}
sweep:
    mov edi, [{sweeps:#x}]
    shl edi, 2
    and edi, 0xffc
    add edi, {start:#x}
write:
    inc dword [edi]
    inc dword [{writes:#x}]
    dec ecx
    jnz next
idle:
    sti
    hlt
    jmp idle
ticked:
    mov ecx, strict dword {k}
next:
    add edi, 0x1000
    cmp edi, {end:#x}
    jb write
    inc dword [{sweeps:#x}]
    jmp sweep
timer:
    mov al, 0x20
    out 0x20, al
    mov esp, 0x7c00
    jmp ticked
align 8, db 0
gdt:
    dq 0
    dq 0x00cf9a000000ffff
    dq 0x00cf92000000ffff
gdt_desc:
    dw gdt_desc - gdt - 1
    dd gdt
idt_desc:
    dw idt_end - idt - 1
    dd idt
align 8, db 0
idt:
%rep 16
    dw timer, 0x08
    db 0, 0x8e
    dw 0
%endrep
idt_end:
times 510 - ($ - $$) db 0
dw 0xaa55
"""


def asm_source(writes_per_tick: int = WRITES_PER_TICK) -> str:
    """:data:`ASM_SOURCE` with the addresses and ``writes_per_tick`` filled in."""
    return ASM_SOURCE.format(
        marker=MARKER_ADDR, sweeps=MARKER_ADDR + 4, writes=MARKER_ADDR + 8, start=SWEEP_START, end=SWEEP_END,
        magic=MAGIC.decode(), k=writes_per_tick, divisor_lo=PIT_DIVISOR & 0xFF, divisor_hi=PIT_DIVISOR >> 8,
    )


# --------------------------------------------------------------------------- QMP


# QEMU failed to start, answer, or run the guest program; the message ends with QEMU's log
GuestError = QMPError


# --------------------------------------------------------------------------- the guest


@dataclass(frozen=True)
class Marker:
    """The guest program's marker, as read from the backend file."""

    magic: bytes
    sweeps: int
    writes: int

    @property
    def started(self) -> bool:
        """The program reached protected mode and wrote its magic."""
        return self.magic == MAGIC


class QemuGuest:
    """One ``qemu-system-x86_64`` running the boot-sector program, RAM in a shared /dev/shm file.

    ``workdir`` (e.g. pytest's ``tmp_path``) receives the disk image, the QMP
    socket and QEMU's log. Use as a context manager, or call :meth:`start`
    and, in a ``finally``, :meth:`close`. ``mem_path`` is the backend file,
    ``mem_size`` its size; ``writes_per_tick`` sets the guest's pace (about
    1000 times that many page writes a second); ``accel`` is QEMU's
    accelerator list (``"kvm:tcg"``: KVM if it can, else TCG).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        writes_per_tick: int = WRITES_PER_TICK,
        accel: str = "kvm:tcg",
        binary: str | None = None,
        mem_size: int = MEM_SIZE,
    ) -> None:
        if mem_size < SWEEP_END or mem_size % (1 << 20):
            raise ValueError(f"mem_size must be whole MiB and at least {SWEEP_END >> 20} MiB, got {mem_size}")
        self.workdir = os.fspath(workdir)
        self.binary = binary or qemu_binary() or QEMU_BINARY
        self.writes_per_tick = writes_per_tick
        self.accel = accel
        self.mem_size = mem_size
        self.mem_path = os.path.join(SHM_DIR, unique_name("qemu"))
        self.disk = os.path.join(self.workdir, "boot.img")
        self.qmp_path = os.path.join(self.workdir, "qmp.sock")
        self._sockdir: str | None = None
        if len(self.qmp_path.encode()) > 100:  # a Unix socket path must fit in 108 bytes
            self._sockdir = tempfile.mkdtemp(prefix="mpmq-")
            self.qmp_path = os.path.join(self._sockdir, "qmp.sock")
        self.log = os.path.join(self.workdir, "qemu.log")
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self._fd: int | None = None

    def argv(self) -> list[str]:
        mib = self.mem_size >> 20
        return [
            self.binary,
            "-machine", f"pc,accel={self.accel},memory-backend=ram0",
            "-m", f"{mib}M",
            "-object", f"memory-backend-file,id=ram0,size={mib}M,mem-path={self.mem_path},share=on",
            "-smp", "1",
            "-display", "none", "-nodefaults", "-no-user-config",
            "-no-reboot",  # a triple fault ends QEMU instead of quietly rebooting into SeaBIOS
            # SeaBIOS tries the hard disk first: an IDE disk boots about a second sooner than a floppy
            "-drive", f"file={self.disk},format=raw,if=ide",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]

    def start(self, timeout: float = 30.0) -> QemuGuest:
        """Write the disk image, start QEMU and connect to QMP (the guest boots meanwhile)."""
        with open(self.disk, "wb") as f:
            f.write(boot_sector(self.writes_per_tick))
        with open(self.log, "wb") as logf:
            # a session of its own: a Ctrl-C on the test run reaches our finally, not QEMU first
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.qmp = QMP(self.qmp_path, self.proc, self.log, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> QemuGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- QMP

    def _qmp(self) -> QMP:
        if self.qmp is None:
            raise GuestError("QEMU is not running")
        return self.qmp

    def stop(self) -> None:
        """Pause the vCPUs; returns once they are stopped (QMP ``stop``)."""
        self._qmp().cmd("stop")

    def cont(self) -> None:
        """Resume the vCPUs (QMP ``cont``)."""
        self._qmp().cmd("cont")

    def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ..."""
        return self._qmp().cmd("query-status")["status"]

    def accelerator(self) -> str:
        """``kvm`` or ``tcg``: what ``accel=kvm:tcg`` ended up using."""
        return "kvm" if self._qmp().cmd("query-kvm").get("enabled") else "tcg"

    # ---- the marker

    def marker(self) -> Marker:
        """The marker read from the backend file now (all zero until QEMU made the file and the program ran)."""
        if self._fd is None:
            try:
                self._fd = os.open(self.mem_path, os.O_RDONLY)
            except FileNotFoundError:
                return Marker(b"\0\0\0\0", 0, 0)
        raw = os.pread(self._fd, 12, MARKER_ADDR)
        if len(raw) < 12:  # QEMU has not sized the file yet
            return Marker(b"\0\0\0\0", 0, 0)
        sweeps, writes = struct.unpack("<II", raw[4:])
        return Marker(raw[:4], sweeps, writes)

    def wait_writing(self, timeout: float = 60.0, *, writes: int = 1, sweeps: int = 0,
                     since: Marker | None = None) -> Marker:
        """Wait until the program runs and counted ``writes`` more writes and ``sweeps`` more sweeps.

        The counts are relative to ``since`` (default: the first marker seen
        with the magic). Returns the marker that satisfied the wait; raises
        GuestError (with QEMU's state and log) on timeout or if QEMU exits.
        """
        deadline = time.monotonic() + timeout
        base = since
        while True:
            m = self.marker()
            if m.started:
                if base is None or not base.started:
                    base = m
                # the counters are 32-bit and wrap (after days at the default pace)
                if (m.writes - base.writes) % (1 << 32) >= writes and (m.sweeps - base.sweeps) % (1 << 32) >= sweeps:
                    return m
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise GuestError(f"QEMU exited ({code}) while waiting for the guest to write:\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                try:
                    state = self.status()
                except GuestError as exc:
                    state = f"unknown ({exc})"
                raise GuestError(
                    f"the guest did not write {writes} times / sweep {sweeps} times in {timeout:g} s "
                    f"(marker {m}, since {base}, QEMU {state}):\n{_tail(self.log)}"
                )
            time.sleep(0.005)

    # ---- the end

    def close(self) -> None:
        """Kill QEMU and reap it, delete the backend file and the QMP socket; idempotent."""
        try:
            if self.qmp is not None:
                self.qmp.close()
                self.qmp = None
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.kill()  # this pid only: we started it
                self.proc.wait(30)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            try:
                os.unlink(self.mem_path)
            except FileNotFoundError:
                pass
            try:
                os.unlink(self.qmp_path)
            except FileNotFoundError:
                pass
            if self._sockdir is not None:
                shutil.rmtree(self._sockdir, ignore_errors=True)
                self._sockdir = None
