"""Docker over SSH with the node's own key and known_hosts: a local unix socket whose every connection is
`ssh … HOST docker system dial-stdio`.

docker-py's own `ssh://` support runs `ssh -p PORT -l USER HOST docker system dial-stdio` (or paramiko)
with no way to name a key file or a known_hosts file, so a spec's `ssh.key_file` and `ssh.known_hosts`
would be ignored and whatever ~/.ssh/config says would be used instead. `DialStdioProxy` runs the same
remote command — so it works wherever `docker context` over SSH works, Docker Desktop on Windows
included — through the system `ssh` with:

    -o BatchMode=yes                      never prompt (no password, no "accept this host key?")
    -o StrictHostKeyChecking=yes          an unknown or changed host key is refused, never added
    -o UserKnownHostsFile=<ssh.known_hosts>
    -i <ssh.key_file> -o IdentitiesOnly=yes   when the spec names a key
    -o ConnectTimeout=<docker.timeout>

and the docker SDK talks to the local socket (`unix://…/docker.sock` in a private 0700 directory).
Each connection's ssh child is killed when either side closes; the last line ssh wrote on stderr is kept
so a failure reads as ssh's own reason ("Host key verification failed.").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

from controller.drivers.base import DriverError

CHUNK = 64 * 1024


def ssh_argv(
    *,
    host: str,
    port: int,
    user: str | None,
    key_file: str | None,
    known_hosts: str,
    connect_timeout: float,
) -> list[str]:
    """The ssh command line for one `docker system dial-stdio` session."""
    argv = [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={os.path.expanduser(known_hosts)}",
        "-o",
        f"ConnectTimeout={max(1, round(connect_timeout))}",
        "-o",
        "LogLevel=ERROR",
        "-p",
        str(port),
    ]
    if key_file:
        argv += ["-i", os.path.expanduser(key_file), "-o", "IdentitiesOnly=yes"]
    if user:
        argv += ["-l", user]
    return [*argv, "--", host, "docker", "system", "dial-stdio"]


class DialStdioProxy:
    """Listen on a private unix socket; pipe every connection through its own ssh dial-stdio session."""

    def __init__(self, argv: Sequence[str]) -> None:
        if shutil.which(argv[0]) is None:
            raise DriverError(f"{argv[0]} is not installed (the OpenSSH client is needed for ssh:// endpoints)")
        self.argv = list(argv)
        self.dir = Path(tempfile.mkdtemp(prefix="hl-ssh-"))  # 0700
        # The directory goes even when nobody calls close() (a command that exits with the engine open).
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.path = self.dir / "docker.sock"
        self.url = f"unix://{self.path}"
        self.last_error = ""
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept, name="ssh-docker-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="ssh-docker-session", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C in the terminal is homelab's to handle, not ssh's
            )
        except OSError as exc:
            self.last_error = f"cannot run ssh: {exc}"
            conn.close()
            return
        with self._lock:
            if self._closed:
                proc.kill()
            self._procs.add(proc)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr

        def upstream() -> None:  # docker SDK → ssh
            with contextlib.suppress(OSError, ValueError):
                while data := conn.recv(CHUNK):
                    stdin.write(data)
                    stdin.flush()
            with contextlib.suppress(OSError, ValueError):
                stdin.close()

        def errors() -> None:
            for line in stderr:
                text = line.decode(errors="replace").strip()
                if text:
                    self.last_error = text

        threads = [threading.Thread(target=f, daemon=True) for f in (upstream, errors)]
        for t in threads:
            t.start()
        with contextlib.suppress(OSError, ValueError):
            while data := os.read(stdout.fileno(), CHUNK):
                conn.sendall(data)
        # ssh closed its output: let it exit and its last stderr line be read *before* the client sees the
        # connection end, so the client's error can name ssh's reason ("Host key verification failed.").
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        threads[1].join(timeout=2)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        for t in threads:
            t.join(timeout=2)
        stdout.close()
        stderr.close()
        with self._lock:
            self._procs.discard(proc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs = list(self._procs)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self._thread.join(timeout=2)
        self._cleanup()
