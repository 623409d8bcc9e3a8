"""Derived hardware profiles: a captured profile's GPUs on another driver, or with GPUs lost.

A driver rollout needs "the same GPUs on a newer driver" and "the same host, one GPU fewer" for
every generation in tests/lab/hardware/, and nobody captured those. They are derived from the real
captures by substitution only: the driver version (query.csv's driver_version column, and the
nvidia-smi header's "NVIDIA-SMI" and "Driver Version"), the header's "CUDA Version", and the last
GPUs' rows and table blocks dropped. Everything else (names, UUIDs, bus ids, memory, the table
layout of the captured driver's nvidia-smi) stays the capture's. Each derived profile is written
into a lab's own directory, never into the repository, with a README.md saying what it came from.

A host that lost every GPU answers as nvidia-smi does then: "No devices were found", exit 6.
"""

from __future__ import annotations

import re
from pathlib import Path

HARDWARE = Path(__file__).parent / "hardware"
NO_DEVICES = "No devices were found\n"  # nvidia-smi's words, and its exit status 6, with no GPU left


def profile_dir(profile: str, derived: Path | None = None) -> Path:
    """Where *profile*'s files are: a lab's derived profiles first, then the captures."""
    if derived is not None and (derived / profile).is_dir():
        return derived / profile
    return HARDWARE / profile


def capture_driver(query_csv: str) -> str:
    """The driver version in a captured ``--query-gpu`` CSV (its first GPU's row)."""
    rows = [line for line in query_csv.splitlines()[1:] if line.strip()]
    if not query_csv.startswith("index,") or not rows:
        raise ValueError(f"not a --query-gpu capture with GPUs: {query_csv.strip()[:80]!r}")
    return rows[0].split(", ")[4]


def capture_cuda(nvidia_smi_txt: str) -> str:
    m = re.search(r"CUDA Version:\s*(\d+\.\d+)", nvidia_smi_txt)
    if not m:
        raise ValueError("no 'CUDA Version' in the nvidia-smi capture")
    return m.group(1)


def derive_query_csv(text: str, *, driver: str, drop_gpus: int = 0) -> str:
    """A ``--query-gpu`` capture on *driver*, its last *drop_gpus* GPUs gone (pure)."""
    header, *rows = [line for line in text.splitlines() if line.strip()]
    if drop_gpus >= len(rows):
        return NO_DEVICES
    kept = []
    for row in rows[:len(rows) - drop_gpus]:
        cells = row.split(", ")
        cells[4] = driver
        kept.append(", ".join(cells))
    return "\n".join([header, *kept]) + "\n"


def _swap(line: str, old: str, new: str) -> str:
    """*old* → *new* wherever it stands alone in a table line, the padding after it adjusted so the
    table's columns stay where they were."""
    def pad(m: re.Match) -> str:
        return new + " " * max(1, len(old) + len(m[1]) - len(new))
    return re.sub(rf"(?<=\s){re.escape(old)}( *)", pad, line)


def derive_nvidia_smi_txt(text: str, *, driver: str, cuda: str, drop_gpus: int = 0) -> str:
    """A plain ``nvidia-smi`` capture with *driver* and *cuda* in its header, its last *drop_gpus*
    GPUs' blocks gone from the GPU table (pure)."""
    lines = text.splitlines()
    if drop_gpus:
        rule = next(i for i, line in enumerate(lines) if line.startswith("|="))
        end = next((i for i in range(rule + 1, len(lines)) if not lines[i].strip()), len(lines))
        starts = [i for i in range(rule + 1, end) if re.match(r"\|\s+\d+\s+[A-Za-z]", lines[i])]
        if drop_gpus >= len(starts):
            return NO_DEVICES
        lines = lines[:starts[len(starts) - drop_gpus]] + lines[end:]
    old_driver = re.search(r"Driver Version:\s*(\S+)", text).group(1)
    old_cuda = capture_cuda(text)
    out = []
    for line in lines:
        if "Driver Version:" in line:
            line = _swap(_swap(line, old_driver, driver), old_cuda, cuda)
        out.append(line)
    return "\n".join(out) + "\n"


def derive_profile(base: str, into: Path, *, driver: str | None = None, cuda: str | None = None,
                   drop_gpus: int = 0) -> str:
    """Write the profile "*base* on *driver* / *cuda*, less its last *drop_gpus* GPUs" under *into*
    (a lab's own directory) and return its name, e.g. ``a100-sxm4-80gb@580.65.06-cuda13.0-lost1``.
    *driver* and *cuda* left out keep the base's; *base* may itself be one derived under *into*."""
    src = profile_dir(base, into)
    query, table = (src / "query.csv").read_text(), (src / "nvidia-smi.txt").read_text()
    old_driver, old_cuda = capture_driver(query), capture_cuda(table)
    driver, cuda = driver or old_driver, cuda or old_cuda
    name = f"{base}@{driver}-cuda{cuda}" + (f"-lost{drop_gpus}" if drop_gpus else "")
    dest = into / name
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "query.csv").write_text(derive_query_csv(query, driver=driver, drop_gpus=drop_gpus))
    (dest / "nvidia-smi.txt").write_text(derive_nvidia_smi_txt(table, driver=driver, cuda=cuda, drop_gpus=drop_gpus))
    if (dest / "query.csv").read_text() == NO_DEVICES:
        (dest / "exit").write_text("6\n")
    lost = f"; its last {drop_gpus} GPU(s) dropped (query.csv rows and nvidia-smi table blocks)" if drop_gpus else ""
    (dest / "README.md").write_text(
        f"Derived by tests/lab/profiles.py:derive_profile from {src} (query.csv, nvidia-smi.txt):\n"
        f"driver {old_driver} -> {driver} (query.csv driver_version column, nvidia-smi header), "
        f"CUDA Version {old_cuda} -> {cuda} (nvidia-smi header){lost}.\n"
        "Everything else, the table layout of the captured driver included, is the capture's.\n")
    return name


# ---------------------------------------------------------------- sick GPUs

def derive_health_csv(text: str, changes: dict[str, str], gpu: int | None = None) -> str:
    """A health ``--query-gpu`` CSV with each field of *changes* set (every GPU's, or GPU *gpu*'s only),
    in nvidia-smi's own words for it (pure). The columns are found by their header name."""
    header, *rows = [line for line in text.splitlines() if line.strip()]
    names = [h.split(" [")[0] for h in header.split(", ")]
    unknown = set(changes) - set(names)
    if unknown:
        raise ValueError(f"no such column: {sorted(unknown)}")
    out = [header]
    for row in rows:
        cells = row.split(", ")
        if gpu is None or int(cells[names.index("index")]) == gpu:
            for name, value in changes.items():
                cells[names.index(name)] = value
        out.append(", ".join(cells))
    return "\n".join(out) + "\n"


def nvlink_status(gpus: int, links: int = 18, down: dict[int, set[int]] | None = None, speed: str = "26.562 GB/s") -> str:
    """``nvidia-smi nvlink -s`` in NVIDIA's documented format: a ``GPU N: …`` line per GPU, then
    ``Link L: <speed>`` per link, ``<inactive>`` for a link that is down (pure)."""
    down = down or {}
    out = []
    for g in range(gpus):
        out.append(f"GPU {g}: NVIDIA GPU (UUID: GPU-00000000-0000-0000-0000-{g:012d})")
        out += [f"\t Link {link}: {'<inactive>' if link in down.get(g, ()) else speed}" for link in range(links)]
    return "\n".join(out) + "\n"


def xid_line(pci: str, xid: int, message: str, at: float = 1234.5) -> str:
    """A kernel log line of an Xid event in the driver's format, e.g. ``NVRM: Xid (PCI:0000:3b:00): 79, pid=…``."""
    return f"[{at:12.6f}] NVRM: Xid (PCI:{pci}): {xid}, pid=0, name=fleetctl-lab, {message}\n"


HEALTH_CAPTURE = Path(__file__).parents[1] / "data" / "health" / "h100-sxm-2026-12" / "health.csv"


def health_for_every_gpu(query_csv: str, health_csv: str) -> str:
    """The captured GPU's health row, given to each GPU of a ``--query-gpu`` capture (its index and bus id) (pure)."""
    header, row = [line for line in health_csv.splitlines() if line.strip()][:2]
    cells = row.split(", ")
    rows = []
    for line in [line for line in query_csv.splitlines()[1:] if line.strip()]:
        gpu = line.split(", ")
        rows.append(", ".join([gpu[0], gpu[6], *cells[2:]]))
    return "\n".join([header, *rows]) + "\n"


def derive_health(base: str, into: Path, name: str, *, changes: dict[str, str] | None = None, gpu: int | None = None,
                  nvswitch: bool = False, nvlink_down: dict[int, set[int]] | None = None) -> str:
    """Write profile *name* under *into*: *base*'s GPUs (its query.csv and nvidia-smi.txt as they are), with the
    H100 health capture's values for each GPU, *changes* made to GPU *gpu*'s (every GPU's where None), and
    on *nvswitch* the fabric Completed and every GPU's 18 NVLinks up (*nvlink_down*: {gpu: links down})."""
    src = profile_dir(base, into)
    dest = into / name
    dest.mkdir(parents=True, exist_ok=True)
    query = (src / "query.csv").read_text()
    for f in ("query.csv", "nvidia-smi.txt", "exit"):
        if (src / f).exists():
            (dest / f).write_text((src / f).read_text())
    health = health_for_every_gpu(query, HEALTH_CAPTURE.read_text())
    said = ["each GPU's health row: the H100 capture's (tests/data/health/h100-sxm-2026-12/health.csv), "
            "its index and bus id from query.csv"]
    if nvswitch:
        health = derive_health_csv(health, {"fabric.state": "Completed", "fabric.status": "Success"})
        gpus = len(health.strip().splitlines()) - 1
        (dest / "nvlink-s.txt").write_text(nvlink_status(gpus, down=nvlink_down))
        said.append("fabric.state Completed and fabric.status Success on every GPU (an NVSwitch system, NVML's "
                    "documented states); nvlink-s.txt: 18 links per GPU in nvidia-smi nvlink -s's format"
                    + (f", links down: {nvlink_down}" if nvlink_down else ""))
    if changes:
        health = derive_health_csv(health, changes, gpu)
        said.append(f"changed on {'every GPU' if gpu is None else f'GPU {gpu}'}: "
                    + ", ".join(f"{k} = {v}" for k, v in changes.items()))
    (dest / "health.csv").write_text(health)
    (dest / "README.md").write_text(f"Derived by tests/lab/profiles.py:derive_health from {src}.\n"
                                    + "".join(f"- {s}\n" for s in said) + "Nothing else is derived.\n")
    return name
