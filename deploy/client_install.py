"""What a client-only install holds: the dependency closure of the `client` extra, and its size on disk.

`pip install ".[client]"` installs the project's base dependencies, which are what a SuperNode needs (the
`client` extra adds nothing; its name says what the install is for); `.[server]` adds the server side
(Ray, transformers, open_clip, matplotlib). This module reads pyproject.toml and the metadata of the
distributions installed in this environment (no network, nothing installed) to list the closure of an
install's requirements and to sum the bytes of the files those distributions installed. The test of the
client-only install checks the ClientApp's imports against that closure (`tests/test_deploy.py`).

Usage: python -m deploy.client_install   # installed size of the client closure against the full one
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = Path(__file__).resolve().parent.parent
CLIENT = ("client",)
FULL = ("server", "client")
GPU_RUNTIME = ("nvidia-", "cuda-", "triton")  # what a CUDA build of torch adds; a CPU-only wheel has none of it


def requirements(extras: Sequence[str], project: Path = PROJECT) -> list[Requirement]:
    """The base dependencies of pyproject.toml plus those of `extras`."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    lines = list(meta["dependencies"])
    for extra in extras:
        lines += meta["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _applies(req: Requirement, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def closure(reqs: Iterable[Requirement]) -> set[str]:
    """Canonical names of the installed distributions these requirements pull in, transitively (with extras)."""
    found: set[str] = set()
    todo = [(req, ()) for req in reqs]
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in found:
            continue
        found.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this environment lacks: nothing of it can be imported either
        todo += [(Requirement(line), tuple(req.extras)) for line in requires]
    return {key.split("[")[0] for key in found}


def installed(names: Iterable[str]) -> set[str]:
    """The subset of `names` installed here."""
    out = set()
    for name in names:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        out.add(name)
    return out


def installed_bytes(names: Iterable[str]) -> int:
    """Bytes of every file the named installed distributions put on disk (RECORD entries that exist)."""
    total = 0
    for name in installed(names):
        for file in metadata.distribution(name).files or ():
            path = Path(file.locate())
            if path.is_file():
                total += path.stat().st_size
    return total


def module_distributions() -> dict[str, set[str]]:
    """Top-level module name -> canonical names of the installed distributions that provide it."""
    return {mod: {canonicalize_name(d) for d in dists} for mod, dists in metadata.packages_distributions().items()}


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    client, full = installed(closure(requirements(CLIENT))), installed(closure(requirements(FULL)))
    for label, names in (("client ([client])", client), ("full ([server])", full)):
        gpu = {n for n in names if n.startswith(GPU_RUNTIME)}
        print(
            f"{label}: {len(names)} distributions, {installed_bytes(names) / 2**30:.2f} GiB installed, "
            f"{installed_bytes(names - gpu) / 2**30:.2f} GiB without the CUDA runtime wheels torch pulls in"
        )
    print(f"server side only: {', '.join(sorted(full - client))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
