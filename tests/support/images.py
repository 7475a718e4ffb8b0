"""Test images built without a registry: a root filesystem assembled here, then `docker import`.

Nothing is ever pulled. Four images:

- `busybox_image(client)`: `/bin/busybox` (Debian's busybox-static; a dynamic
  busybox gets its libraries and loader too) with a symlink per applet; ~2 MB.
  The helper image of the Docker driver.
- `llamacpp_image(client)`: the real `llama-server` of the project's own llama.cpp
  build (tests/support/llamacpp_build.py), every shared library of that build
  next to it in /app — among them one CPU backend per x86-64 level, of which
  ggml loads the best for the CPU the container runs on — the system libraries
  `ldd` lists (at their host paths) and the loader `/lib64/ld-linux-x86-64.so.2`,
  all copied with symlinks followed (`cp -L`); ENTRYPOINT is the server. ~45 MB.
  It runs on the CPU.
- `rpc_server_image(client)`: the same build's `ggml-rpc-server` with the same
  libraries; ENTRYPOINT is the RPC worker (llama.cpp RPC: one model across
  several machines).
- `litellm_image(client)`: the real LiteLLM proxy of the virtualenv behind
  `$HOMELAB_LITELLM` (`litellm[proxy]==1.108.7` and `prisma`) and the CPython it
  was made from (its `sys.base_prefix`: the interpreter, `libpython`, the
  standard library without `site-packages`, tests, tkinter, idlelib and the
  static library), each at its host path, so the venv's `pyvenv.cfg` and script
  shebangs stay valid; plus every system library `ldd` lists for an ELF file in
  them, and the loader. Tests, `*.pyi` stubs and pip are left out; `__pycache__`
  is kept (a cold start compiles nothing). ENTRYPOINT is the venv's `litellm`.

Images are tagged by a hash of their content (`homelab-test/NAME:HASH`), so a
daemon that already has one is not asked again, and the root filesystem tarball
is kept under `$HOMELAB_TEST_CACHE` (default `~/.cache/homelab-tests`) so a
fresh daemon only needs the import.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.support import llamacpp_build

BUSYBOX = Path("/bin/busybox")
LOADER = Path("/lib64/ld-linux-x86-64.so.2")
SYSTEM_LIBS = ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libgomp.so.1")
"""Always in the llama.cpp image, whether or not `ldd` names them."""
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageBuildError(RuntimeError):
    """An image could not be assembled or imported."""


@dataclass(frozen=True)
class Entry:
    """One member of a root filesystem: a directory, a file copied from the host, or a symlink."""

    path: str
    """Absolute path inside the image."""
    source: Path | None = None
    """Host file to copy (symlinks followed); None for a directory or a symlink."""
    link: str | None = None
    mode: int = 0o755


def cache_dir() -> Path:
    return Path(os.environ.get("HOMELAB_TEST_CACHE", Path.home() / ".cache" / "homelab-tests"))


# ---------------------------------------------------------------------- root filesystems


def _base_dirs() -> list[Entry]:
    dirs = ["/bin", "/dev", "/etc", "/proc", "/sys", "/models"]
    return [Entry(d) for d in dirs] + [Entry("/tmp", mode=0o1777)]


def busybox_rootfs() -> list[Entry]:
    found = shutil.which("busybox")
    binary = BUSYBOX if BUSYBOX.is_file() else Path(found) if found else None
    if binary is None:
        raise ImageBuildError(f"{BUSYBOX} not found (apt-get install busybox-static)")
    out = subprocess.run([str(binary), "--list"], capture_output=True, text=True, check=True).stdout
    entries = [*_base_dirs(), Entry("/bin/busybox", source=binary)]
    for applet in sorted(set(out.split())):
        if applet != "busybox" and "/" not in applet:
            entries.append(Entry(f"/bin/{applet}", link="busybox"))
    libs = ldd(binary)  # empty for busybox-static; Debian's plain busybox needs libc
    if libs:
        entries += [Entry("/lib"), Entry("/lib/x86_64-linux-gnu"), Entry("/lib64")]
        entries += [Entry(f"/lib/x86_64-linux-gnu/{name}", source=path, mode=0o644) for name, path in libs.items()]
        entries.append(Entry(str(LOADER), source=LOADER))
    return entries


def llama_server_binary() -> Path:
    """The real `llama-server` of the project's llama.cpp build (built once per machine on first use)."""
    return _build().server


def _build() -> llamacpp_build.LlamaCppBuild:
    try:
        return llamacpp_build.ensure()
    except llamacpp_build.LlamaCppBuildError as exc:
        raise ImageBuildError(str(exc)) from exc


_LDD_RE = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def ldd(binary: Path) -> dict[str, Path]:
    """The shared libraries `binary` loads (name → host path); empty for a static binary."""
    result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    libs: dict[str, Path] = {}
    for line in result.stdout.splitlines():
        m = _LDD_RE.match(line)
        if m is not None:
            libs[m.group(1)] = Path(m.group(2))
        elif "not found" in line:
            raise ImageBuildError(f"ldd {binary}: {line.strip()}")
    return libs


def llamacpp_rootfs(executable: str = llamacpp_build.SERVER) -> list[Entry]:
    """`/app/EXECUTABLE` of the llama.cpp build with every library of the build beside it (ggml looks for its
    CPU variants next to the executable), the system libraries they load, and the loader."""
    build = _build()
    binary = build.bin / executable
    if not binary.is_file():
        raise ImageBuildError(f"no {executable} in {build.bin}")
    own = {p.name: p for p in build.libraries()}
    libs: dict[str, Path] = {}
    for elf in (binary, *own.values()):  # the dlopened backends need system libraries of their own (libgomp)
        libs.update(ldd(elf))
    if not libs:
        raise ImageBuildError(f"ldd {binary} lists no libraries")
    entries = [*_base_dirs(), Entry("/app"), Entry("/lib"), Entry("/lib/x86_64-linux-gnu"), Entry("/lib64")]
    entries.append(Entry(f"/app/{executable}", source=binary))
    system_dir = Path("/lib/x86_64-linux-gnu")
    for name in SYSTEM_LIBS:
        libs.setdefault(name, system_dir / name)
    for name, path in sorted(own.items()):  # the build's own symlinks stay links (libggml.so → libggml.so.0 …)
        if path.is_symlink():
            entries.append(Entry(f"/app/{name}", link=os.readlink(path)))
        else:
            entries.append(Entry(f"/app/{name}", source=path, mode=0o644))
    for name, path in sorted(libs.items()):
        if name not in own:
            entries.append(Entry(f"/lib/x86_64-linux-gnu/{name}", source=path, mode=0o644))
    entries.append(Entry(str(LOADER), source=LOADER))
    return entries


# ---------------------------------------------------------------------- build and import


def content_key(entries: list[Entry], changes: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(changes).encode())
    for e in entries:
        h.update(f"\0{e.path}\0{e.link}\0{e.mode}\0".encode())
        if e.source is not None:
            with open(e.source, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def write_tar(entries: list[Entry], dest: Path) -> None:
    """A root filesystem tarball owned by 0:0 (like `tar --numeric-owner --owner=0 --group=0`)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for e in entries:
                info = tarfile.TarInfo("." + e.path)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = e.mode
                if e.link is not None:
                    info.type = tarfile.SYMTYPE
                    info.linkname = e.link
                    info.mode = 0o777
                    tar.addfile(info)
                elif e.source is not None:
                    st = e.source.stat()
                    info.size = st.st_size
                    info.mtime = int(st.st_mtime)  # a .pyc is valid only next to a source of the same mtime
                    with open(e.source, "rb") as f:  # follows symlinks: `cp -L`
                        tar.addfile(info, f)
                else:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info, io.BytesIO())
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def build_image(client: docker.DockerClient, name: str, entries: list[Entry], changes: list[str]) -> str:
    """Import `entries` as `homelab-test/NAME:KEY` unless the daemon has it; return the tag."""
    key = content_key(entries, changes)[:16]
    repository = f"homelab-test/{name}"
    tag = f"{repository}:{key}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{name}-{key}.tar"
    if not tarball.exists():
        for old in cache.glob(f"{name}-*.tar"):
            old.unlink(missing_ok=True)
        write_tar(entries, tarball)
    client.api.import_image_from_file(str(tarball), repository=repository, tag=key, changes=changes)
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        raise ImageBuildError(f"docker import of {tarball} did not produce {tag}") from None
    return tag


def busybox_image(client: docker.DockerClient) -> str:
    return build_image(client, "busybox", busybox_rootfs(), [f"ENV PATH={PATH_ENV}", 'CMD ["/bin/sh"]'])


def llamacpp_image(client: docker.DockerClient) -> str:
    changes = [
        f"ENV PATH={PATH_ENV}",
        "ENV LD_LIBRARY_PATH=/app:/lib/x86_64-linux-gnu",
        'ENTRYPOINT ["/app/llama-server"]',
    ]
    return build_image(client, "llama-server", llamacpp_rootfs(), changes)


def rpc_server_image(client: docker.DockerClient) -> str:
    """llama.cpp's RPC worker (`ggml-rpc-server -H ADDR -p PORT`), from the same build as `llamacpp_image`:
    every member of a split must run one build (one RPC protocol version)."""
    changes = [
        f"ENV PATH={PATH_ENV}",
        "ENV LD_LIBRARY_PATH=/app:/lib/x86_64-linux-gnu",
        f'ENTRYPOINT ["/app/{llamacpp_build.RPC_SERVER}"]',
    ]
    return build_image(client, "rpc-server", llamacpp_rootfs(llamacpp_build.RPC_SERVER), changes)


LITELLM_ENV = "HOMELAB_LITELLM"
_STDLIB_SKIP = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"}
_VENV_SKIP = {"tests", "test", "pip", "__editable__"}


def litellm_venv() -> Path:
    """The virtualenv of `$HOMELAB_LITELLM` (`VENV/bin/litellm`)."""
    exe = os.environ.get(LITELLM_ENV, "")
    if not exe or not os.access(exe, os.X_OK):
        raise ImageBuildError(f"${LITELLM_ENV} must name the `litellm` of a venv with 'litellm[proxy]==1.108.7' prisma")
    venv = Path(exe).absolute().parent.parent
    if not (venv / "pyvenv.cfg").is_file():
        raise ImageBuildError(f"{venv} is not a virtualenv (no pyvenv.cfg)")
    return venv


def _tree(root: Path, skip_dir: Callable[[Path], bool], skip_file: Callable[[Path], bool]) -> list[Entry]:
    """Every directory, file and symlink under `root` (at its host path), symlinks kept as links."""
    entries: list[Entry] = []
    for parent, dirs, files in os.walk(root):
        here = Path(parent)
        entries.append(Entry(str(here), mode=0o755))
        keep = []
        for d in sorted(dirs):
            path = here / d
            if skip_dir(path):
                continue
            if path.is_symlink():
                entries.append(Entry(str(path), link=os.readlink(path)))
            else:
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            path = here / f
            if skip_file(path):
                continue
            if path.is_symlink():
                entries.append(Entry(str(path), link=os.readlink(path)))
            elif path.is_file():
                entries.append(Entry(str(path), source=path, mode=stat.S_IMODE(path.stat().st_mode)))
    return entries


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _system_libs(binaries: list[Path]) -> dict[str, Path]:
    """Libraries outside the copied trees that `ldd` resolves for `binaries` (name → host path)."""
    libs: dict[str, Path] = {}
    for i in range(0, len(binaries), 200):
        result = subprocess.run(["ldd", *map(str, binaries[i : i + 200])], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            m = _LDD_RE.match(line)
            if m is not None:
                libs.setdefault(m.group(1), Path(m.group(2)))
    return libs


def litellm_rootfs() -> list[Entry]:
    venv = litellm_venv()
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys; print(sys.base_prefix); print('%d.%d' % sys.version_info[:2])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    base, version = Path(probe[0]), probe[1]
    stdlib = base / "lib" / f"python{version}"

    def skip_stdlib(path: Path) -> bool:
        return path.parent == stdlib and (path.name in _STDLIB_SKIP or path.name.startswith("config-"))

    def skip_venv(path: Path) -> bool:
        return path.name in _VENV_SKIP and "site-packages" in path.parts

    def skip_file(path: Path) -> bool:
        return path.suffix == ".pyi" or path.name.endswith((".opt-1.pyc", ".opt-2.pyc"))

    entries = [
        *_base_dirs(),
        Entry("/root", mode=0o700),
        Entry("/lib"),
        Entry("/lib/x86_64-linux-gnu"),
        Entry("/lib64"),
    ]
    for parent in reversed([*base.parents][:-1]):
        entries.append(Entry(str(parent)))
    entries += [Entry(str(base)), Entry(str(base / "bin")), Entry(str(base / "lib"))]
    for exe in sorted((base / "bin").glob("python*")):
        if exe.is_symlink():
            entries.append(Entry(str(exe), link=os.readlink(exe)))
        elif _is_elf(exe):
            entries.append(Entry(str(exe), source=exe))
    for lib in sorted((base / "lib").glob("libpython*.so*")):
        entries.append(Entry(str(lib), source=lib, mode=0o755))
    entries += _tree(stdlib, skip_stdlib, skip_file)
    for parent in reversed([*venv.parents][:-1]):
        if not any(e.path == str(parent) for e in entries):
            entries.append(Entry(str(parent)))
    entries += _tree(venv, skip_venv, skip_file)
    seen: set[str] = set()
    unique = []
    for e in entries:
        if e.path not in seen:
            seen.add(e.path)
            unique.append(e)
    binaries = [
        e.source
        for e in unique
        if e.source is not None and (".so" in e.source.name or e.source.name == f"python{version}")
    ]
    system = Path("/lib/x86_64-linux-gnu")
    for name, path in sorted(_system_libs([b for b in binaries if _is_elf(b)]).items()):
        if str(path).startswith((str(base), str(venv))):
            continue  # already in the image (libpython, a wheel's bundled libraries)
        unique.append(Entry(str(system / name), source=path, mode=0o644))
    unique.append(Entry(str(LOADER), source=LOADER))
    return unique


def litellm_image(client: docker.DockerClient) -> str:
    """The real LiteLLM proxy as an image (see the module docstring); ENTRYPOINT `litellm`."""
    venv = litellm_venv()
    changes = [
        f"ENV PATH={venv}/bin:{PATH_ENV}",
        "ENV HOME=/root",
        "ENV LITELLM_LOCAL_MODEL_COST_MAP=True",
        f'ENTRYPOINT ["{venv}/bin/litellm"]',
    ]
    return build_image(client, "litellm", litellm_rootfs(), changes)


def clear_cache() -> None:
    shutil.rmtree(cache_dir(), ignore_errors=True)
