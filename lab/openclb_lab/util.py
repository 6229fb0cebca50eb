"""Small shared helpers: logging, subprocess, where the lab keeps its files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[lab {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Kept between runs (the guest image, the lab ssh key); outside the repo."""
    return Path(os.environ.get("OPENCLB_CACHE", Path.home() / ".cache" / "openclb"))


def state_dir(lab: str) -> Path:
    """Everything one running lab owns (overlays, sockets, logs); removed by `down`.

    On disk, not tmpfs: UML opens its copy-on-write files with O_DIRECT."""
    return Path(os.environ.get("OPENCLB_RUN", "/var/tmp/openclb-lab")) / lab


def run(cmd: list[str], check: bool = True, quiet: bool = False, progress: str | None = None,
        **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output and say what failed."""
    if progress:
        # long steps: stream a dot per 50 lines so the user sees it moving
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        tail: list[str] = []
        for n, line in enumerate(proc.stdout, 1):
            tail = (tail + [line])[-30:]
            if n % 50 == 0:
                log(f"{progress}: {line.strip()[:100]}")
        rc = proc.wait()
        if check and rc:
            sys.stderr.write("".join(tail))
            raise subprocess.CalledProcessError(rc, cmd)
        return subprocess.CompletedProcess(cmd, rc)
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if check and res.returncode:
        if not quiet:
            sys.stderr.write(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)
    return res


def in_netns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]
