"""The model bundle store: versioned bundles, register, promote, roll back.

This module is the store only (torch, safetensors and filelock, imported where used):
a checkpoint becomes a bundle in `faultsense.export`, the ONNX file is made by
`faultsense.onnx_export`, and a W&B artifact by `faultsense.wandb_artifact`.

Layout of a registry root (default `models/`, or `$FAULTSENSE_ROOT/models`)::

    registry.json        {"current", "versions", "promoted", "history"}; the source of truth
    .lock                filelock serializing every write
    v1/ v2/ ...          bundles: weights.safetensors + bundle.json (+ model.onnx if exported)

A version exists only once it is listed in `registry.json`. Every write is atomic: a
bundle is staged in a hidden temp folder and `os.replace`d into `vN/`, then
`registry.json` is rewritten through a temp file + `os.replace` (one write records the
registration and, if asked, the promotion). A crash between the two leaves an unlisted
`vN/` folder that is ignored and whose number is never reused; the previous current
stays current. Nothing is unpickled: weights are safetensors, metadata is JSON.

Rollback semantics: `promoted` is a stack of the versions made current. `promote(v)`
pushes `v`; `rollback()` pops the current version and returns to the one promoted
before it (so repeated rollbacks walk back in time instead of bouncing between two
versions); `rollback(v)` makes `v` current and truncates the stack to its last
occurrence (or pushes it if it was never promoted).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import utc_now
from .errors import ModelError, RegistryError
from .fileio import atomic_write, fsync_dir, jsonable, sha256_file, write_json_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
LOCK_FILE = ".lock"
WEIGHTS_FILE = "weights.safetensors"
BUNDLE_FILE = "bundle.json"
ONNX_FILE = "model.onnx"
FORMAT = 1
LOCK_TIMEOUT_S = 120.0
REQUIRED_META = ("net_spec", "labels", "sample_rate", "clip_samples")
# bundle.json is written once, at registration; this field holds the sha256 of the rest.
BUNDLE_SHA_FIELD = "bundle_sha256"
_REGISTRY_FIELDS = (
    "version",
    "weights_sha256",
    "created_at",
    "git_commit",
    "onnx",
    BUNDLE_SHA_FIELD,
)
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


def default_registry_dir() -> Path:
    """`$FAULTSENSE_ROOT/models` when FAULTSENSE_ROOT is set, else `./models`."""
    return Path(os.environ.get("FAULTSENSE_ROOT", ".")) / "models"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_json_sha256(meta: Mapping[str, Any]) -> str:
    """sha256 of a bundle.json's content less its own `bundle_sha256` field, as canonical
    JSON (sorted keys, no spaces), so formatting does not matter but any value does."""
    body = {k: v for k, v in meta.items() if k != BUNDLE_SHA_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=jsonable)
    return _sha256_bytes(text.encode("utf-8"))


def git_commit() -> str | None:
    """Commit of the FaultSense checkout (with `-dirty` if it has local changes), or None."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None


def fault_point(name: str) -> None:
    """Test hook: `FAULTSENSE_FAULT_POINT=<name>` SIGKILLs this process when it reaches
    `name` (tests/test_fault_injection.py proves a crash there leaves a consistent state)."""
    if os.environ.get("FAULTSENSE_FAULT_POINT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def check_version(version: str) -> str:
    """Return `version` if it looks like `v<N>`; it is used as a folder name, so be strict."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise RegistryError(f"Invalid model version {version!r}: expected v1, v2, ...")
    return version


def _version_number(name: str) -> int | None:
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Bundle:
    """A registered bundle folder: `meta` is its bundle.json."""

    version: str
    path: Path
    meta: dict[str, Any]

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def sample_rate(self) -> int:
        return int(self.meta["sample_rate"])

    @property
    def clip_samples(self) -> int:
        return int(self.meta["clip_samples"])

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.meta.get("metrics") or {})

    @property
    def onnx_path(self) -> Path | None:
        onnx = self.meta.get("onnx")
        return self.path / onnx["file"] if onnx else None

    def read_weights(self) -> bytes:
        """Weights bytes after checking their sha256 against bundle.json (RegistryError if not)."""
        try:
            data = self.weights_path.read_bytes()
        except OSError as err:
            raise RegistryError(
                f"Bundle {self.version} at {self.path} is incomplete: cannot read "
                f"{WEIGHTS_FILE} ({err.strerror or err})."
            ) from None
        expected = self.meta.get("weights_sha256")
        actual = _sha256_bytes(data)
        if actual != expected:
            raise RegistryError(
                f"Bundle {self.version}: {self.weights_path} does not match its recorded "
                f"sha256 (expected {expected}, got {actual}); it was modified or is half-written. "
                "Refusing to load it."
            )
        return data

    def verify(self) -> None:
        """Raise RegistryError unless the weights (and ONNX file, if any) match bundle.json."""
        self.read_weights()
        onnx = self.meta.get("onnx")
        if onnx:
            path = self.path / onnx["file"]
            if not path.is_file() or sha256_file(path) != onnx.get("sha256"):
                raise RegistryError(
                    f"Bundle {self.version}: {path} is missing or does not match its recorded sha256."
                )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Verified weights as a CPU state dict (safetensors: nothing is unpickled)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        data = self.read_weights()
        try:
            return load(data)
        except (SafetensorError, ValueError) as err:
            raise RegistryError(
                f"Bundle {self.version}: {self.weights_path} is corrupt: {err}"
            ) from None

    def load_net(self) -> nn.Module:
        """Verify sha256, rebuild the FaultNet from `net_spec` and load the weights; eval mode."""
        from .models.net import build_net

        state = self.state_dict()
        net = build_net(copy.deepcopy(self.meta["net_spec"]))
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ModelError(
                f"Bundle {self.version}: weights do not fit the architecture in bundle.json: {err}"
            ) from None
        return net.eval()


class Registry:
    """The model registry under `root`. Reads need no lock; writes take `root/.lock`."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_registry_dir()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- state file -------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.root / REGISTRY_FILE

    def _read_state(self) -> dict[str, Any]:
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {
                "format": FORMAT,
                "current": None,
                "versions": [],
                "promoted": [],
                "history": [],
            }
        except OSError as err:
            raise RegistryError(f"Cannot read {self.state_path}: {err.strerror or err}") from None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as err:
            raise RegistryError(f"{self.state_path} is not valid JSON: {err}") from None
        if not isinstance(state, dict) or not isinstance(state.get("versions"), list):
            raise RegistryError(f"{self.state_path} is not a FaultSense registry file.")
        state.setdefault("promoted", [])
        state.setdefault("history", [])
        return state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.root / LOCK_FILE), timeout=LOCK_TIMEOUT_S):
                yield
        except Timeout:
            raise RegistryError(
                f"Registry {self.root} is locked by another process for over {LOCK_TIMEOUT_S:g} s."
            ) from None

    # -- reads ------------------------------------------------------------------------

    def current_version(self) -> str | None:
        return self._read_state().get("current")

    def history(self) -> list[dict[str, Any]]:
        return list(self._read_state()["history"])

    def versions(self) -> list[str]:
        return list(self._read_state()["versions"])

    def get(self, version: str) -> Bundle:
        """The registered bundle `version`; RegistryError if unknown or half-written."""
        return self._get(version, self._read_state())

    def _get(self, version: str, state: Mapping[str, Any]) -> Bundle:
        check_version(version)
        if version not in state["versions"]:
            known = ", ".join(state["versions"]) or "none"
            raise RegistryError(
                f"Model version {version} is not registered in {self.root} (registered: {known})."
            )
        path = self.root / version
        meta_path = path / BUNDLE_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RegistryError(
                f"Bundle {version} is half-written or deleted: {meta_path} is missing."
            ) from None
        except (OSError, json.JSONDecodeError) as err:
            raise RegistryError(f"Bundle {version}: cannot read {meta_path}: {err}") from None
        missing = [k for k in (*REQUIRED_META, "weights_sha256") if k not in meta]
        if missing or meta.get("version") != version:
            raise RegistryError(
                f"Bundle {version}: {meta_path} is inconsistent "
                f"(missing {missing or 'nothing'}, version field {meta.get('version')!r})."
            )
        recorded = meta.get(BUNDLE_SHA_FIELD)  # absent in bundles registered before it existed
        if recorded is not None and recorded != bundle_json_sha256(meta):
            raise RegistryError(
                f"Bundle {version}: {meta_path} does not match its recorded sha256: it is "
                "corrupt or was edited after registration (labels, net_spec, ...). "
                "Refusing to load it; register the model again instead of editing bundle.json."
            )
        return Bundle(version=version, path=path, meta=meta)

    def current(self) -> Bundle:
        """The current bundle; RegistryError if nothing was promoted yet."""
        state = self._read_state()
        if not state.get("current"):
            raise RegistryError(
                f"No current model in {self.root}: train one (`make train`) or promote a "
                "version (`faultsense models promote vN`)."
            )
        return self._get(state["current"], state)

    def list(self) -> list[dict[str, Any]]:
        """One summary per registered version, oldest first."""
        state = self._read_state()
        rows = []
        for version in state["versions"]:
            try:
                meta = self._get(version, state).meta
            except RegistryError as err:
                rows.append({"version": version, "error": str(err), "current": False})
                continue
            rows.append(
                {
                    "version": version,
                    "created_at": meta.get("created_at"),
                    "metrics": meta.get("metrics") or {},
                    "parent_version": meta.get("parent_version"),
                    "weights_sha256": meta.get("weights_sha256"),
                    "onnx": bool(meta.get("onnx")),
                    "current": version == state.get("current"),
                }
            )
        return rows

    # -- writes -----------------------------------------------------------------------

    def register(
        self,
        net: nn.Module,
        meta: Mapping[str, Any],
        *,
        promote: bool = False,
        reason: str = "",
        onnx: bool = False,
    ) -> str:
        """Write `net`'s weights and `meta` as the next version; return it (`v1`, `v2`, ...).

        `meta` needs `net_spec`, `labels`, `sample_rate`, `clip_samples`; the registry sets
        `version`, `weights_sha256`, `created_at`, `git_commit` and `onnx` itself, and
        `parent_version` to the current version unless `meta` names one. With `onnx`, the
        same module is exported to ONNX and checked against PyTorch before anything is
        registered (a failed export or parity check raises ModelError; nothing is written).
        """
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise RegistryError(f"Cannot register a bundle without {', '.join(missing)} in meta.")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            # The heavy writes happen outside the lock; only numbering + renames are serialized.
            bundle = self._stage(net, meta, staging, onnx=onnx)
            with self._locked():
                state = self._read_state()
                version = f"v{self._next_number(state)}"
                bundle = {"version": version, **bundle}
                bundle.setdefault("parent_version", state.get("current"))
                self._write_bundle_json(staging / BUNDLE_FILE, bundle)
                os.replace(staging, self.root / version)
                fsync_dir(self.root)
                fault_point("registry_commit")  # bundle in place, registry.json not yet
                state["versions"].append(version)
                self._record(state, "register", version, reason)
                if promote:
                    self._set_current(state, version, "promote", reason, push=True)
                write_json_atomic(self.state_path, state)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("Registered %s in %s%s", version, self.root, " (current)" if promote else "")
        return version

    @classmethod
    def _stage(
        cls, net: nn.Module, meta: Mapping[str, Any], staging: Path, *, onnx: bool
    ) -> dict[str, Any]:
        """Write the weights (and ONNX file) into `staging`; return bundle.json less its
        version and parent."""
        weights_sha = cls._write_weights(net, staging / WEIGHTS_FILE)
        # The registry owns these fields: a copied bundle.json cannot smuggle stale ones in.
        bundle = {k: v for k, v in meta.items() if k not in _REGISTRY_FIELDS}
        bundle["weights_sha256"] = weights_sha
        bundle["created_at"] = utc_now()
        bundle["git_commit"] = git_commit()
        if onnx:
            from .onnx_export import export_onnx

            bundle["onnx"] = export_onnx(net, int(meta["clip_samples"]), staging / ONNX_FILE)
        return bundle

    def promote(self, version: str, reason: str = "") -> str:
        """Make `version` current after verifying its files; returns it."""
        with self._locked():
            state = self._read_state()
            self._get(version, state).verify()
            self._set_current(state, version, "promote", reason, push=True)
            write_json_atomic(self.state_path, state)
        log.info("Promoted %s in %s", version, self.root)
        return version

    def rollback(self, version: str | None = None, reason: str = "") -> str:
        """Go back to the previously promoted version, or to `version`; returns the new current."""
        with self._locked():
            state = self._read_state()
            stack: list[str] = state["promoted"]
            if version is None:
                if len(stack) < 2:
                    raise RegistryError(
                        f"Nothing to roll back to in {self.root}: no version was promoted "
                        f"before {state.get('current') or 'the current one'}."
                    )
                target = stack[-2]
            else:
                target = check_version(version)
            self._get(target, state).verify()
            if version is None:
                stack.pop()
            elif target in stack:
                del stack[len(stack) - stack[::-1].index(target) :]
            else:
                stack.append(target)
            self._set_current(state, target, "rollback", reason, push=False)
            write_json_atomic(self.state_path, state)
        log.info("Rolled back %s to %s", self.root, target)
        return target

    # -- helpers ----------------------------------------------------------------------

    def _next_number(self, state: Mapping[str, Any]) -> int:
        # Folders left by a crash after their rename count too: a number is never reused.
        names = set(state["versions"]) | {p.name for p in self.root.iterdir() if p.is_dir()}
        numbers = [n for n in map(_version_number, names) if n is not None]
        return max(numbers, default=0) + 1

    def _record(self, state: dict[str, Any], action: str, version: str, reason: str) -> None:
        state["history"].append(
            {
                "at": utc_now(),
                "action": action,
                "version": version,
                "previous": state.get("current"),
                "reason": reason,
            }
        )

    def _set_current(
        self, state: dict[str, Any], version: str, action: str, reason: str, *, push: bool
    ) -> None:
        self._record(state, action, version, reason)
        state["current"] = version
        if push:
            state["promoted"].append(version)

    @staticmethod
    def _write_weights(net: nn.Module, path: Path) -> str:
        from safetensors.torch import save

        # Clone: safetensors refuses tensors that share storage (tied weights, views).
        state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        data = save(state, metadata={"format": "pt"})
        atomic_write(path, data)
        return _sha256_bytes(data)

    @staticmethod
    def _write_bundle_json(path: Path, bundle: Mapping[str, Any]) -> None:
        try:
            # Hashed as it will read back (tuples become lists, numpy scalars numbers).
            stored = json.loads(json.dumps(bundle, default=jsonable))
        except (TypeError, ValueError) as err:
            raise RegistryError(f"Bundle metadata cannot be written as JSON: {err}") from None
        stored[BUNDLE_SHA_FIELD] = bundle_json_sha256(stored)
        atomic_write(path, json.dumps(stored, indent=2) + "\n")
