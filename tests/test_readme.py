"""The README's python code blocks run, so the tour cannot drift from the code.

Every ```python block of README.md is extracted and executed on this machine,
with the few names a fragment takes from its context (the regions, an address,
``stop_guest``) provided and host-specific values substituted: addresses become
loopback ones, paths temporary ones, sizes small ones. A block that matches no
rule below runs with only ``from mpmultifd import *`` and the guest callbacks
defined, so a new example must either run as written or get a rule here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mpmultifd import Destination, GuestRAM, MigrationConfig, Source, WorkerPool
from mpmultifd.testing import fill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks() -> list[tuple[int, str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


class Env:
    """What one block runs with: its namespace, and everything to release afterwards."""

    def __init__(self, tmp_path: Any) -> None:
        self.tmp = tmp_path
        self.ns: dict[str, Any] = {"__name__": "readme"}
        exec("from mpmultifd import *", self.ns)
        self.calls: list[str] = []
        for name in ("stop_guest", "start_guest", "cont_guest"):
            self.ns[name] = (lambda n: lambda: self.calls.append(n))(name)
        self.ns["set_guest_cpu_quota"] = lambda percent: self.calls.append(f"quota {percent}")
        self.owned: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.files: list[str] = []

    def region(self, blocks: dict[str, int], content: str | None = "mixed") -> GuestRAM:
        ram = GuestRAM.create(blocks)
        if content:
            fill(ram, content, 5)
        self.owned.append(ram)
        return ram

    def keep(self, obj: Any) -> Any:
        self.owned.append(obj)
        return obj

    def key_file(self) -> str:
        path = self.tmp / "mig.key"
        path.write_bytes(os.urandom(32))
        path.chmod(0o600)  # as the README says to make it (load_key warns otherwise)
        return str(path)

    def destination(self, blocks: dict[str, int], cfg: MigrationConfig | None = None, **kw: Any) -> Destination:
        return self.keep(Destination(self.region(blocks, None), ("127.0.0.1", 0), cfg or MigrationConfig(), **kw))

    def close(self) -> None:
        for t in self.threads:
            t.join(60)
        values = list(self.ns.values()) + self.owned
        seen: set[int] = set()
        for kinds in ((Source, Destination), (WorkerPool,), (GuestRAM,)):
            for v in values:
                if isinstance(v, kinds) and id(v) not in seen:
                    seen.add(id(v))
                    v.close()
                    if isinstance(v, GuestRAM) and v.owner:
                        v.unlink()
        for path in self.files:
            if os.path.exists(path):
                os.unlink(path)


@dataclass
class Rule:
    """How to run the block containing ``match``."""

    match: str
    subs: list[tuple[str, str]] = field(default_factory=list)
    setup: Callable[[Env], None] | None = None
    check: Callable[[Env], None] | None = None
    needs: str | None = None  # a module without which the block cannot run


def _tour_setup(env: Env) -> None:
    env.ns["KEY_PATH"] = env.key_file()


def _tour_check(env: Env) -> None:
    res = env.ns["res"]
    assert res.status == "completed" and res.verified
    assert env.ns["dst"].status == "completed"
    assert env.calls == ["stop_guest"]


def _metrics_setup(env: Env) -> None:
    ram = env.region({"pc.ram": 1 << 20})
    env.ns["src"] = env.keep(Source(ram, MigrationConfig(channels=1)))


def _metrics_check(env: Env) -> None:
    from prometheus_client import REGISTRY, generate_latest

    try:
        assert b'migration="vm-42"' in generate_latest(REGISTRY)
    finally:
        REGISTRY.unregister(env.ns["collector"])


def _tls_setup(env: Env) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a certificate")
    key, cert = env.tmp / "key.pem", env.tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=dest-host", "-addext", "subjectAltName=DNS:dest-host"],
                   check=True, capture_output=True, timeout=60)
    exec("import ssl\nfrom pathlib import Path", env.ns)
    env.ns.update(KEY_PATH=env.key_file(), CERT=str(cert), TLS_KEY=str(key), CA=str(cert))
    env.ns["ram"] = env.region({"pc.ram": 2 << 20})
    env.ns["dst_ram"] = env.region({"pc.ram": 2 << 20}, None)


def _tls_check(env: Env) -> None:
    res = env.ns["src"].migrate(env.ns["dst"].address)
    assert res.status == "completed" and res.verified


def _convergence_setup(env: Env) -> None:
    prefix = os.environ.get("MPMULTIFD_SHM_PREFIX", "mpm_")
    path = f"/dev/shm/{prefix}readme_guest_{os.getpid()}"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * 4)
    env.files.append(path)
    env.ns["GUEST_FILE"] = path
    env.ns["addr"] = env.destination({"pc.ram": 4 << 20}, MigrationConfig(channels=4)).address


def _convergence_check(env: Env) -> None:
    assert env.ns["est"].dirty_rate >= 0
    assert "stop_guest" in env.calls


def _save_setup(env: Env) -> None:
    env.ns["ram"] = env.region({"pc.ram": 4 << 20})
    env.ns["SAVE_PATH"] = str(env.tmp / "vm1.mpsave")
    env.ns["dst_ram"] = env.region({"pc.ram": 4 << 20}, None)


def _save_check(env: Env) -> None:
    assert env.ns["saved"].path == env.ns["SAVE_PATH"]
    assert env.ns["topped"].status == "completed"


class _Guest:
    def __init__(self, ram: GuestRAM, target: Any) -> None:
        self.ram, self.target = ram, target


def _pool_setup(env: Env) -> None:
    cfg = env.ns["cfg"] = MigrationConfig(channels=2)
    guests = []
    for _ in range(2):
        ram = env.region({"pc.ram": 2 << 20})
        guests.append(_Guest(ram, env.destination({"pc.ram": 2 << 20}, cfg).address))
    env.ns["guests"] = guests


def _pool_check(env: Env) -> None:
    assert env.ns["src"].status == "completed"


def _prepared_setup(env: Env) -> None:
    cfg = env.ns["cfg"] = MigrationConfig(channels=2)
    env.ns["ram"] = env.region({"pc.ram": 4 << 20}, None)
    env.ns["listen"] = ("127.0.0.1", 0)
    src_ram = env.region({"pc.ram": 4 << 20})

    def announce(address: Any) -> None:
        src = env.keep(Source(src_ram, cfg))

        def send() -> None:
            try:
                env.ns["sent"] = src.migrate(address)
            except BaseException as exc:  # the check reports it, with the destination's side
                env.ns["send_error"] = exc

        t = threading.Thread(target=send)
        t.start()
        env.threads.append(t)

    env.ns["announce"] = announce


def _prepared_check(env: Env) -> None:
    for t in env.threads:
        t.join(60)
    assert "send_error" not in env.ns, env.ns.get("send_error")
    assert env.ns["result"].status == "completed" and env.ns["sent"].status == "completed"


def _commit_unknown_setup(env: Env) -> None:
    cfg = MigrationConfig(channels=2)
    env.ns["src"] = env.keep(Source(env.region({"pc.ram": 2 << 20}), cfg))
    env.ns["addr"] = env.destination({"pc.ram": 2 << 20}, cfg).address
    env.ns["ask_destination_host_if_valid"] = lambda: True
    env.ns["discard_local_guest"] = lambda: env.calls.append("discard")


def _commit_unknown_check(env: Env) -> None:
    assert env.ns["res"].status == "completed"  # the happy path: no CommitUnknown here
    assert env.calls == ["stop_guest"]


def _vm_setup(env: Env) -> None:
    pytest.skip("needs two QEMUs with QMP sockets: tests/test_vm_handover.py runs the handover for real")


RULES = [
    Rule("qemu.receive_vm(", setup=_vm_setup),
    Rule("except CommitUnknown:", setup=_commit_unknown_setup, check=_commit_unknown_check),
    Rule(
        'ram = GuestRAM.create({"pc.ram": 1 << 30',
        subs=[
            ("1 << 30", "1 << 22"),
            ('"/etc/mpmultifd/key"', "KEY_PATH"),
            ('("0.0.0.0", 4444)', '("127.0.0.1", 0)'),
            ('("dest-host", 4444)', "dst.address"),
        ],
        setup=_tour_setup,
        check=_tour_check,
    ),
    Rule("MigrationCollector()", setup=_metrics_setup, check=_metrics_check, needs="prometheus_client"),
    Rule("from mpmultifd import aio", subs=[("64 << 20", "4 << 20")]),
    Rule(
        "ssl.PROTOCOL_TLS_SERVER",
        subs=[
            ('"/etc/mpmultifd/key"', "KEY_PATH"),
            ('"cert.pem"', "CERT"),
            ('"key.pem"', "TLS_KEY"),
            ('"ca.pem"', "CA"),
            ('("0.0.0.0", 4444)', '("127.0.0.1", 0)'),
        ],
        setup=_tls_setup,
        check=_tls_check,
    ),
    Rule(
        "ConvergenceError",
        subs=[('"/dev/shm/guest"', "GUEST_FILE"), ("src.estimate(2.0", "src.estimate(0.5")],
        setup=_convergence_setup,
        check=_convergence_check,
    ),
    Rule(
        "src.save(",
        subs=[
            ('"/var/lib/guests/vm1.mpsave"', "SAVE_PATH"),
            (
                "    src.migrate(addr, pause=stop_guest, top_up=True)",
                '    dst = Destination(dst_ram, listen=("127.0.0.1", 0), config=MigrationConfig(channels=4))\n'
                "    dst.restore(saved.path)\n"
                "    topped = src.migrate(dst.address, pause=stop_guest, top_up=True)",
            ),
        ],
        setup=_save_setup,
        check=_save_check,
    ),
    Rule("with WorkerPool(8) as pool", subs=[("WorkerPool(8)", "WorkerPool(2)")], setup=_pool_setup, check=_pool_check),
    Rule("prepare_receivers=True", setup=_prepared_setup, check=_prepared_check),
]


def _rule_for(code: str) -> Rule:
    found = [r for r in RULES if r.match in code]
    assert len(found) <= 1, f"several rules match one block: {[r.match for r in found]}"
    return found[0] if found else Rule("")


BLOCKS = readme_blocks()


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 5
    for rule in RULES:  # a rule whose block went away is stale
        assert any(rule.match in code for _, code in BLOCKS), f"no README block contains {rule.match!r}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path, capsys):
    rule = _rule_for(code)
    if rule.needs:
        pytest.importorskip(rule.needs)
    for old, new in rule.subs:
        assert old in code, f"README block at line {line}: {old!r} is gone; update tests/test_readme.py"
        code = code.replace(old, new)
    env = Env(tmp_path)
    try:
        if rule.setup:
            rule.setup(env)
        exec(compile(code, f"README.md:{line}", "exec"), env.ns)
        if rule.check:
            rule.check(env)
    finally:
        env.close()
