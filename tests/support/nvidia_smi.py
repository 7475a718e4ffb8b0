"""A stand-in `nvidia-smi` for tests: a shell script that prints captured real output.

The test machine has no GPU. `write_stand_in(bin_dir, gpu=…, apps=…)` writes
`bin_dir/nvidia-smi`, which answers the two CSV queries `controller.drivers.gpu`
makes with the given text — by default the real H100 captures in
`tests/data/nvidia-smi/` (copied from ../shared/reference/nvidia-smi/) — and
applies `--format=csv,noheader,nounits` the way nvidia-smi documents it: the
header line dropped, the ` MiB` unit suffixes removed. It is not an emulator:
it ignores which fields are asked for. Anything else it is asked exits 2, and
`exit_status` makes it fail like a driver that is not loaded.
"""

from __future__ import annotations

import shlex
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "nvidia-smi"


def fixture(name: str) -> str:
    return (DATA / name).read_text()


def write_stand_in(
    bin_dir: Path,
    *,
    gpu: str | None = None,
    apps: str | None = None,
    exit_status: int = 0,
    message: str = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
) -> Path:
    """Write `bin_dir/nvidia-smi`; return its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    gpu_file = bin_dir / "query-gpu.csv"
    apps_file = bin_dir / "query-apps.csv"
    gpu_file.write_text(fixture("query-gpu-busy.csv") if gpu is None else gpu)
    apps_file.write_text(fixture("query-apps-busy.csv") if apps is None else apps)
    script = bin_dir / "nvidia-smi"
    script.write_text(
        f"""#!/bin/sh
# Stand-in for nvidia-smi (tests/support/nvidia_smi.py): prints captured output, applies --format.
if [ {exit_status} -ne 0 ]; then echo {shlex.quote(message)}; exit {exit_status}; fi
file=""; format=csv
for arg in "$@"; do
  case "$arg" in
    --query-gpu=*) file={shlex.quote(str(gpu_file))} ;;
    --query-compute-apps=*) file={shlex.quote(str(apps_file))} ;;
    --format=*) format="${{arg#--format=}}" ;;
  esac
done
[ -n "$file" ] || {{ echo "stand-in nvidia-smi: unsupported arguments: $*" >&2; exit 2; }}
case ",$format," in *,noheader,*) skip=2 ;; *) skip=1 ;; esac
case ",$format," in
  *,nounits,*) tail -n +$skip "$file" | sed 's/ MiB//g' ;;
  *) tail -n +$skip "$file" ;;
esac
"""
    )
    script.chmod(0o755)
    return script
