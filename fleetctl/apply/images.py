"""How a container image comes to be on a host, and how a container reaches the host's GPUs: pure planners.

:func:`obtain` turns what the host has (the image present or not, the sha256 of a tarball already
pushed) into the :class:`~fleetctl.apply.execute.Action` list that gets the image there, one of three ways:

- the image is present: nothing runs (an image on the host is never pulled again);
- a tarball is given (the air-gapped path): it is pushed like the wheelhouse — copied only where the
  host lacks that sha256 — then ``<runtime> load -i`` reads it, and the image named must then be
  present: a tarball that held another image fails with the tags it did hold;
- otherwise ``<runtime> pull``, through a registry mirror where one is set (:func:`mirrored`, then
  tagged back to the name the compose file and unit run). The pull is the plan's reading action: a
  failed pull becomes a failed step whose detail is the registry's own message
  (:func:`pull_failure`, :func:`pull_failed_detail`), not "exit status 1".

How a container reaches the host's GPUs (``gpu_run_args``, ``gpu_refusal``) is pure and lives in
:mod:`fleetctl.decide.container`, where the resolver can read it; it is re-exported here.

Nothing here touches a host; the only I/O is hashing the local tarball.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from fleetctl.apply.execute import Action
from fleetctl.decide.container import CDI_ALL, RUNTIMES, gpu_compose, gpu_refusal, gpu_run_args  # noqa: F401 - re-exported
from fleetctl.reach.connection import Result

DETAIL_CHARS = 400  # of the registry's message kept in a step's detail (the tail keeps the rest)

# docker's reference grammar: the first path component names a registry host where it has a '.' or a
# ':' (a port), is 'localhost', or has an upper-case letter; otherwise the name is Docker Hub's.
_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_REPO_TAGS = r'"RepoTags":(\[[^]]*]|null)'  # in a `docker save` archive's manifest.json: the names it holds
_CONTROL = re.compile(r"[\x00-\x1f\x7f\s]")  # no image name or mirror has these


@dataclass(frozen=True)
class Obtaining:
    """How an image comes to be on a host: the actions (none where it is present) and which way, in words."""

    image: str
    actions: tuple[Action, ...]
    note: str  # "image X present: no pull", "load X from T (pushed)", "pull X"


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def q(value) -> str:
    return shlex.quote(str(value))


def obtain(runtime: str, image: str, *, present: bool, tarball: Path | None = None, remote_dir: str = "",
           have_sha: str | None = None, mirror: str | None = None) -> Obtaining:
    """The actions that get *image* onto a host whose engine is *runtime*.

    *present*: the host's engine has *image* now. *tarball*: a local ``<runtime> save`` archive
    holding it, pushed to *remote_dir* unless the host's copy there has sha256 *have_sha* already.
    *mirror*: a registry host[/path] that Docker Hub names are pulled through.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not {' or '.join(RUNTIMES)}")
    if not image or _CONTROL.search(image):
        raise ValueError(f"image {image!r} is not an image name")
    if present:
        return Obtaining(image, (), f"image {image} present: no pull")
    if tarball is not None:
        return _load(runtime, image, Path(tarball), remote_dir, have_sha)
    source = mirrored(image, mirror)
    pull = Action("the image the stack runs in is not on the host", f"{runtime} pull -q {q(source)}",
                  change=f"pull {source}", reads=True)  # judged by pull_failure: the registry's message
    if source == image:
        return Obtaining(image, (pull,), f"pull {image}")
    tag = Action("the compose file and unit run the image by its own name", f"{runtime} tag {q(source)} {q(image)}",
                 change=f"tag {source} as {image}", fails=f"tagging {source} as {image} failed")
    return Obtaining(image, (pull, tag), f"pull {image} through the mirror {mirror}")



def _load(runtime: str, image: str, tarball: Path, remote_dir: str, have_sha: str | None) -> Obtaining:
    if not remote_dir.startswith("/"):
        raise ValueError(f"remote_dir {remote_dir!r} is not an absolute path on the host")
    remote = f"{remote_dir.rstrip('/')}/{tarball.name}"
    sha = file_sha256(tarball)
    pushes = []
    if have_sha != sha:
        # Not judged by its exit: where the directory cannot be made, the copy into it names the cause.
        pushes = [Action("the image tarballs' directory on the host", f"mkdir -p {q(remote_dir)}",
                         change=f"create {remote_dir}"),
                  Action("the host lacks it (by sha256)", remote, put=tarball, sha256=sha,
                         change=f"copy {tarball.name}")]
    load = Action("the air-gapped path: the image comes from a tarball, never a registry",
                  f"{runtime} load -i {q(remote)}", change=f"load {image} from {tarball.name}",
                  fails=f"{runtime} load -i {remote} failed: "
                        f"the engine could not read {tarball.name} as an image archive")
    check = Action(f"{tarball.name} must hold {image}", loaded_check(runtime, image, remote),
                   fails=f"{tarball.name} holds no image named {image} (it loaded, under other names: see the output); "
                         f"save that image itself: `{runtime} save -o {tarball.name} {image}`")
    how = "pushed" if pushes else "already on the host by sha256"
    return Obtaining(image, (*pushes, load, check), f"load {image} from {tarball.name} ({how})")


def loaded_check(runtime: str, image: str, archive: str) -> str:
    """Exit 0 where *image* is in the engine; else print the tags the archive holds (its manifest.json) and fail."""
    return (f"{runtime} image inspect --format '{{{{.Id}}}}' {q(image)} >/dev/null 2>&1 || "
            f"{{ echo {q(f'no image {image} in the engine after the load; {archive} holds:')} "
            f"$(tar -xOf {q(archive)} manifest.json 2>/dev/null | grep -oE {q(_REPO_TAGS)} || echo 'no tags') >&2; "
            f"exit 1; }}")


@dataclass(frozen=True)
class ImageState:
    """What a host's engine has of one image (:func:`image_state_script`, :func:`parse_image_state`)."""

    present: bool = False
    image_id: str | None = None  # the engine's id of the image (a changed image is another id)
    tarball_sha: str | None = None  # sha256 of the tarball already pushed, where one was asked for


def image_state_script(runtime: str, image: str, tarball: str | None = None) -> str:
    """Read-only lines printing the ``@@image`` (and ``@@image-tarball``) sections; they can join a longer
    state script, whose other sections :func:`parse_image_state` passes over."""
    lines = [f"echo @@image; {runtime} image inspect --format '{{{{.Id}}}}' {q(image)} 2>/dev/null"]
    if tarball:
        lines.append(f"echo @@image-tarball; sha256sum -- {q(tarball)} 2>/dev/null")
    return "\n".join([*lines, "true"])


def at_sections(text: str) -> dict[str, list[str]]:
    """A state script's output → its ``@@name`` sections' lines, as printed."""
    sections: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("@@"):
            name = line[2:].strip()
            sections[name] = []
        elif name:
            sections[name].append(line)
    return sections


def parse_image_state(text: str) -> ImageState:
    """image_state_script's output (alone or among other ``@@`` sections) → an ImageState."""
    sections = {k: [line.strip() for line in v if line.strip()] for k, v in at_sections(text).items()}
    # docker prints sha256:<hex>, podman the bare hex
    ids = [line for line in sections.get("image", []) if re.fullmatch(r"(sha256:)?[0-9a-f]{64}", line)]
    shas = [line.split()[0] for line in sections.get("image-tarball", []) if re.fullmatch(r"[0-9a-f]{64}\s.*", line)]
    return ImageState(present=bool(ids), image_id=ids[0] if ids else None, tarball_sha=shas[0] if shas else None)


def mirrored(image: str, mirror: str | None) -> str:
    """*image* as pulled through *mirror* (``host[:port][/path]``): Docker Hub names only, official ones under
    ``library/``; a name that already names a registry host other than Docker Hub is left alone."""
    if not mirror:
        return image
    mirror = mirror.strip().rstrip("/")
    if "://" in mirror or not mirror or _CONTROL.search(mirror):
        raise ValueError(f"registry mirror {mirror!r} is not a registry host[:port][/path] (no scheme)")
    first, _, rest = image.partition("/")
    if rest and first in _HUB_HOSTS:
        path = rest
    elif rest and _names_registry(first):
        return image
    else:
        path = image
    if "/" not in path.split("@")[0].split(":")[0]:
        path = f"library/{path}"
    return f"{mirror}/{path}"


def _names_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component != component.lower()


def pull_failure(result: Result | None, image: str) -> str | None:
    """The failed step's detail where the pull (the reading action :func:`obtain` plans) failed; None where it
    pulled, or no pull ran (present, or loaded)."""
    if result is None or result.ok:
        return None
    return pull_failed_detail(result.stderr or result.stdout, image=image)


def pull_failed_detail(stderr: str, *, image: str = "") -> str:
    """A failed pull in one line, carrying the registry's own message: the last line that reports an error
    (the daemon's ``Error response from daemon: …``, podman's ``Error: …``), else the last line said."""
    lines = [line.strip() for line in _ANSI.sub("", stderr).replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b|\bdenied\b|\bunauthorized\b", line, re.I)]
    said = (errors or lines or [""])[-1]
    if len(said) > DETAIL_CHARS:
        said = said[:DETAIL_CHARS] + "…"
    what = f"pulling {image}" if image else "the pull"
    return f"{what} failed: {said}" if said else f"{what} failed, and the engine said nothing"
