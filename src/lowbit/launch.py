"""`lowbit quantize ... --nproc N`: start N data-parallel processes of the same command, without torch.

What torchrun's standalone mode does for one host, and nothing else: a rendezvous the processes meet at, the
environment torch.distributed reads (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE) and the cores split between
the processes (OMP_NUM_THREADS), then wait. This
module imports no torch: the launching process used to import lowbit, torch and transformers (~4.5 s on a
2-core CPU) and then run torchrun's elastic agent (its own polling and shutdown) only to start processes
that import them again; measured on the CPU in docs/architecture.md ("Data parallel").

The rendezvous is a file in a fresh private folder (torch.distributed's FileStore, `RENDEZVOUS_ENV`), not a
TCP port: a port probed free here and bound by rank 0 a moment later could be taken in between by another
program (rank 0 then failed at its start), and no port can be asked for without importing torch here. The
folder is removed when the processes are done. torchrun itself (`torchrun --nproc_per_node N -m lowbit.cli
quantize ...`) still works: with WORLD_SIZE set the command runs as one of its processes (env://, its store).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import LowbitError

STARTED_ENV = "LOWBIT_COMMAND_STARTED"  # the launching command's start (epoch seconds): each process's "startup" phase
RENDEZVOUS_ENV = "LOWBIT_RENDEZVOUS"  # path of the file store the launched processes meet at (dist.start reads it)
GRACE_SECONDS = 10.0  # after one process failed, how long the others may take to stop before they are killed


def command_started() -> float:
    """When this command started (epoch seconds): the launcher's start for its processes, else this process's."""
    if STARTED_ENV in os.environ:
        return float(os.environ[STARTED_ENV])
    import psutil

    return psutil.Process().create_time()


def worker_env(rank: int, nproc: int, store: Path, started: float) -> dict[str, str]:
    """Process `rank`'s environment; `store`: the rendezvous file (not existing yet: FileStore creates it)."""
    env = dict(os.environ, WORLD_SIZE=str(nproc), RANK=str(rank), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc))
    env[RENDEZVOUS_ENV] = str(store.resolve())
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # as torchrun: split the cores
    env[STARTED_ENV] = repr(started)
    return env


def die_with_parent() -> None:
    """In a started process, before it runs (Linux): SIGTERM when the launcher dies, even by SIGKILL (a
    benchmark's timeout), so no process is left holding a GPU or waiting in a collective. Elsewhere: nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m lowbit.cli *argv` as `nproc` processes of one process group; returns the exit status:
    0, or the first failed process's (2 after rank 0 printed its one-line LowbitError; 1 for a signal). When
    one fails the others are stopped (SIGTERM, then SIGKILL after GRACE_SECONDS): they would wait for it in a
    collective. Ctrl-C reaches every process (one process group); this one waits for them and returns 130, as
    it does on SIGTERM, which it passes on as SIGINT (each process then ends as on Ctrl-C)."""
    if nproc < 1:
        raise LowbitError(f"--nproc {nproc} is not a number of processes", "pass --nproc 1 or more")
    started = command_started()
    folder = Path(tempfile.mkdtemp(prefix="lowbit-rendezvous-"))  # private (0700), fresh: the store file is new
    try:
        return _run(nproc, argv, started, folder / "store")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(nproc: int, argv: list[str], started: float, store: Path) -> int:
    procs = [subprocess.Popen([sys.executable, "-m", "lowbit.cli", *argv], env=worker_env(r, nproc, store, started), preexec_fn=die_with_parent)
             for r in range(nproc)]
    failed: int | None = None

    sigterm = []

    def terminated(signum, frame):  # SIGTERM to the launcher: stop the processes as Ctrl-C would
        sigterm.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread: no handler (the processes still die with this one: die_with_parent)
        previous = terminated
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.returncode for p in procs if p.returncode]
            if codes and failed is None:
                failed = codes[0]
                deadline = time.monotonic() + GRACE_SECONDS
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            if failed is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.02)
    except KeyboardInterrupt:
        for p in procs:
            if sigterm and p.poll() is None:  # (Ctrl-C reached them already)
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
        return 130
    finally:
        if previous is not terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if failed is None:
        failed = next((p.returncode for p in procs if p.returncode), 0)
    return failed if failed > 0 else (1 if failed else 0)
