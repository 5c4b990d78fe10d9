"""Embedding in an agent: our worker processes never run the agent's ``__main__``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# an agent script without an ``if __name__ == "__main__"`` guard: its top-level side effects
# (a line appended to a file, a listening Unix socket at a fixed path) must happen once
AGENT = textwrap.dedent(
    """
    import os, socket, sys
    from mpmultifd import Destination, GuestRAM, MigrationConfig, Source, WorkerPool
    from mpmultifd.testing import fill, same_contents

    log, sock_path, method, pooled = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "pool"
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)  # a second run fails with EADDRINUSE
    listener.listen()
    print("agent started", flush=True)

    cfg = MigrationConfig(channels=2, start_method=method)
    pool = WorkerPool(2, start_method=method) if pooled else None
    with GuestRAM.create({"a": 4 << 20}) as src_ram, GuestRAM.create({"a": 4 << 20}) as dst_ram:
        fill(src_ram, "mixed", 3)
        with Destination(dst_ram, ("127.0.0.1", 0), cfg, pool=pool) as dst, Source(src_ram, cfg, pool=pool) as src:
            res = src.migrate(dst.address)
            dres = dst.wait()
        ok = same_contents(src_ram, dst_ram)
        src_ram.unlink(); dst_ram.unlink()
    if pool is not None:
        pool.close()
    listener.close(); os.unlink(sock_path)
    print("migrated", res.status, dres.status, ok, flush=True)
    """
)


@pytest.mark.parametrize("pooled", ["direct", "pool"])
def test_workers_never_run_the_agents_main(tmp_path, start_method, pooled):
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    log = tmp_path / "runs.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script), str(log), str(tmp_path / "agent.sock"), start_method, pooled],
        env=env, capture_output=True, text=True, timeout=100, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("agent started") == 1, proc.stdout
    assert "migrated completed completed True" in proc.stdout, proc.stdout + proc.stderr
    assert len(log.read_text().splitlines()) == 1, log.read_text()  # the top level ran once
    assert "Address already in use" not in proc.stderr
