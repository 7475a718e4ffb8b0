"""Secrets, resolved at the moment of use and never shown.

A spec names where a secret lives, never the secret: `secret:NAME` (an entry of
`secrets:`) or a provider reference —

    env:NAME        an environment variable of homelab
    file:/path      a file only its owner may read (mode 0600 or stricter; `~` is expanded)
    cmd:COMMAND     a command (a vault CLI: `vault kv get -field=password secret/homelab`,
                    `op read op://homelab/sudo/password`, `az keyvault secret show … --query value -o tsv`)
                    run with `sh -c`; its stdout, stripped, is the secret

Rules every caller keeps:

- a secret reaches a remote command only on its stdin — never in argv, never in
  the environment of a child process;
- it never appears in logs, events, plans, error messages or `--json` output:
  a `Secret` prints as `***`, and `Redactor` masks resolved values in any text
  that leaves homelab (a command's stderr, say);
- a resolution error names the reference (`secret sudo (file:/etc/homelab/sudo)`),
  never the value; a failing `cmd:` is reported by its exit status, not its output.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from controller.drivers.base import DriverError

MASK = "***"
CMD_TIMEOUT_S = 60.0


class SecretError(DriverError):
    """A secret could not be resolved; the message names its reference, never its value."""


class Secret:
    """A resolved secret: `str()` and `repr()` are `***`; `reveal()` is the value, for stdin only."""

    __slots__ = ("_value", "ref")

    def __init__(self, value: str, ref: str) -> None:
        self._value = value
        self.ref = ref

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({self.ref!r}, {MASK})"


def provider_ref(ref: str, secrets: Mapping[str, str]) -> str:
    """The provider reference behind `ref`: `secret:NAME` looked up in `secrets`, any other reference as is."""
    if ref.startswith("secret:"):
        name = ref[7:]
        if name not in secrets:
            raise SecretError(
                f"secret:{name}: not an entry of `secrets` (known: {', '.join(sorted(secrets)) or 'none'})"
            )
        return secrets[name]
    return ref


def resolve(ref: str, secrets: Mapping[str, str] | None = None, *, what: str | None = None) -> Secret:
    """Resolve a reference (`secret:NAME`, `env:`, `file:`, `cmd:`) now. Raises SecretError."""
    label = what or ref
    provider = provider_ref(ref, secrets or {})
    if provider != ref and what is None:
        label = f"{ref} ({provider})"
    return Secret(_read(provider, label), ref)


def resolve_secret(ref: str, what: str = "master key") -> str:
    """The value behind a provider reference (for a caller that hands it on at once)."""
    return _read(ref, what)


def _read(ref: str, label: str) -> str:
    if ref.startswith("env:"):
        value = os.environ.get(ref[4:])
        if not value:
            raise SecretError(f"{label}: environment variable {ref[4:]} is not set")
        return value
    if ref.startswith("file:"):
        return _read_file(Path(ref[5:]).expanduser(), label)
    if ref.startswith("cmd:"):
        return _run(ref[4:], label)
    raise SecretError(f"{label}: not a secret reference (env:NAME, file:/path or cmd:COMMAND)")


def _read_file(path: Path, label: str) -> str:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecretError(f"{label}: cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"{label}: {path} is readable by others (mode {stat.S_IMODE(mode):04o}); refusing it: chmod 600 {path}"
        )
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not text"
        raise SecretError(f"{label}: cannot read {path}: {why}") from None
    if not value:
        raise SecretError(f"{label}: {path} is empty")
    return value


def _run(command: str, label: str) -> str:
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise SecretError(f"{label}: the secret command did not finish in {CMD_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise SecretError(f"{label}: cannot run the secret command: {exc.strerror}") from None
    value = done.stdout.strip()
    if done.returncode != 0:
        raise SecretError(f"{label}: the secret command failed (exit {done.returncode})")
    if not value:
        raise SecretError(f"{label}: the secret command printed nothing")
    return value


class Redactor:
    """Masks every resolved secret value in text that leaves homelab."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = {v for v in values if v}

    def add(self, secret: Secret | str) -> None:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if value:
            self._values.add(value)

    def __call__(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            text = text.replace(value, MASK)
        return text
