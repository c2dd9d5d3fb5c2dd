"""Real file-system faults for tests: a read-only or tiny tmpfs mounted in a private mount namespace.

``unshare -rm`` gives the command its own user and mount namespace (no root needed where unprivileged user
namespaces are enabled); the tmpfs mounts exist only inside it, so the faults are real (EROFS from the kernel, ENOSPC
from a full tmpfs) and nothing outside the test sees them. Everything that has to look at the mounted folders must
run inside the same namespace: one shell script per call.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when private mount namespaces with tmpfs mounts work here, else why not (for pytest.skip)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o ro,size=64k tmpfs $d"
                            " && ! touch $d/x 2>/dev/null"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private user+mount namespace here: {probe.stderr.strip()[:200]}"
    return None


def run_with_tmpfs(script: str, mounts: dict[Path, str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the shell ``script`` in a private mount namespace where each folder of ``mounts`` (created if needed)
    is a fresh tmpfs mounted with the given options (``ro``, ``size=1m``, ...)."""
    lines = ["set -e"]
    for path, options in mounts.items():
        Path(path).mkdir(parents=True, exist_ok=True)
        lines.append(f"mount -t tmpfs -o {shlex.quote(options)} tmpfs {shlex.quote(str(path))}")
    lines += ["set +e", script]
    return subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(lines)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
