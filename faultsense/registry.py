"""Versioned model bundles: export from a checkpoint, register, promote, roll back.

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
import datetime as dt
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

from .errors import ModelError, RegistryError
from .fileio import fsync_dir as _fsync_dir
from .fileio import jsonable as _jsonable
from .fileio import sha256_file as _sha256_file
from .fileio import write_json_atomic

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
_REGISTRY_FIELDS = ("version", "weights_sha256", "created_at", "git_commit", "onnx")
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
# ONNX Runtime and PyTorch use different kernels (e.g. for the FFT): agree to this.
ONNX_PARITY_ATOL = 1e-3


def default_registry_dir() -> Path:
    """`$FAULTSENSE_ROOT/models` when FAULTSENSE_ROOT is set, else `./models`."""
    return Path(os.environ.get("FAULTSENSE_ROOT", ".")) / "models"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
            if not path.is_file() or _sha256_file(path) != onnx.get("sha256"):
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
            weights_sha = self._write_weights(net, staging / WEIGHTS_FILE)
            # The registry owns these fields: a copied bundle.json cannot smuggle stale ones in.
            bundle = {k: v for k, v in meta.items() if k not in _REGISTRY_FIELDS}
            bundle["weights_sha256"] = weights_sha
            bundle["created_at"] = _now()
            bundle["git_commit"] = git_commit()
            if onnx:
                bundle["onnx"] = export_onnx(net, meta, staging / ONNX_FILE)
            with self._locked():
                state = self._read_state()
                version = f"v{self._next_number(state)}"
                bundle = {"version": version, **bundle}
                bundle.setdefault("parent_version", state.get("current"))
                self._write_bundle_json(staging / BUNDLE_FILE, bundle)
                os.replace(staging, self.root / version)
                _fsync_dir(self.root)
                fault_point("registry_commit")  # bundle in place, registry.json not yet
                state["versions"].append(version)
                self._record(state, "register", version, reason)
                if promote:
                    self._set_current(state, version, "promote", reason, push=True)
                write_json_atomic(self.state_path, state)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("Registered %s in %s%s", version, self.root, " (current)" if promote else "")
        _log_wandb_artifact(self.root / version, bundle, promoted=promote)
        return version

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
                "at": _now(),
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
        from safetensors.torch import save_file

        # Clone: safetensors refuses tensors that share storage (tied weights, views).
        state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt"})
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return _sha256_file(path)

    @staticmethod
    def _write_bundle_json(path: Path, bundle: Mapping[str, Any]) -> None:
        try:
            text = json.dumps(bundle, indent=2, default=_jsonable) + "\n"
        except (TypeError, ValueError) as err:
            raise RegistryError(f"Bundle metadata cannot be written as JSON: {err}") from None
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


# -- export from training ---------------------------------------------------------------


def export_checkpoint(ckpt_path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A Lightning checkpoint -> (eval-mode FaultNet, meta with net_spec/labels/rate/length).

    The checkpoint is read with `weights_only=True` (hparams are primitives), the
    FaultClassifier is rebuilt from its hparams only to obtain `net_spec()`, and the net's
    weights are taken from the checkpoint's `net.*` entries.
    """
    import torch

    from .models.classifier import FaultClassifier, build_net

    path = Path(ckpt_path)
    if not path.is_file():
        raise RegistryError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe files
        raise RegistryError(f"Checkpoint {path} cannot be loaded safely: {err}") from None
    hparams = dict(ckpt.get("hyper_parameters") or {})
    spec = ckpt.get("net_spec")
    if spec is None:  # older checkpoints: rebuild the module from its primitive hparams
        try:
            spec = FaultClassifier(**hparams).net_spec()
        except Exception as err:
            raise ModelError(
                f"Checkpoint {path}: cannot rebuild the model from its hparams: {err}"
            ) from None
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net = build_net(copy.deepcopy(spec))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"Checkpoint {path}: weights do not fit the net_spec: {err}") from None
    labels = ckpt.get("labels") or hparams.get("labels") or _labels(int(spec["num_classes"]))
    meta = {
        "net_spec": net.spec,
        "labels": list(labels),
        "sample_rate": int(spec["sample_rate"]),
        "clip_samples": int(spec["clip_samples"]),
        "metrics": {k: float(v) for k, v in (ckpt.get("metrics") or {}).items()},
        "checkpoint": {
            "file": path.name,
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
        },
    }
    return net.eval(), meta


def _labels(num_classes: int) -> list[str]:
    from .taxonomy import LABELS

    if num_classes != len(LABELS):
        raise ModelError(f"net_spec has {num_classes} classes but the taxonomy has {len(LABELS)}.")
    return list(LABELS)


def register_from_training(
    ckpt_path: str | os.PathLike[str],
    datamodule: Any,
    cfg: Any,
    metrics: Mapping[str, float],
) -> str:
    """Register the best checkpoint of a training run; returns its version.

    Promotes it when the registry has no current version, or when `cfg.promote` is true
    (default true: `make train` should make the fresh model the one served; retraining
    passes `promote: false` and promotes through its own gate). `cfg.export.onnx`
    adds an ONNX file checked against PyTorch.
    """
    net, meta = export_checkpoint(ckpt_path)
    config = _resolved_config(cfg)
    meta["labels"] = list(getattr(datamodule, "labels", meta["labels"]))
    # The run's final metrics (val + test) override the ones stored with the checkpoint.
    meta["metrics"] = {**meta.get("metrics", {}), **_float_metrics(metrics)}
    meta["data_fingerprint"] = getattr(datamodule, "fingerprint", None)
    meta["mapping"] = _plain(getattr(datamodule, "mapping", None))
    meta["config"] = config
    registry_dir = _cfg_get(cfg, "paths.registry_dir") or default_registry_dir()
    registry = Registry(registry_dir)
    promote = registry.current_version() is None or bool(_cfg_get(cfg, "promote", True))
    onnx = bool(_cfg_get(cfg, "export.onnx", False))
    return registry.register(
        net, meta, promote=promote, reason=f"trained: {Path(ckpt_path).name}", onnx=onnx
    )


def _resolved_config(node: Any) -> Any:
    """The config as plain data, resolved; an interpolation that cannot resolve here
    (e.g. `${hydra:...}` outside a Hydra run) is kept as its text instead of failing."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig | ListConfig):
        raw = OmegaConf.to_container(node, resolve=False)
        keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        out = {str(k): None for k in keys} if isinstance(node, DictConfig) else [None] * len(raw)
        for key in keys:
            try:
                value = _resolved_config(node[key])
            except Exception:  # omegaconf raises several types for failed interpolations
                value = raw[key]
            out[str(key) if isinstance(node, DictConfig) else key] = value
        return out
    if isinstance(node, Mapping):
        return {str(k): _resolved_config(v) for k, v in node.items()}
    return node


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            out[str(key)] = float(value)
    return out


def _cfg_get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for key in dotted.split("."):
        if node is None:
            return default
        node = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
    return default if node is None else node


def _plain(obj: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return obj


# -- ONNX ---------------------------------------------------------------------------------


def export_onnx(net: nn.Module, meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Export `net` (waveform [B, T] -> logits [B, C]) to ONNX and check it against PyTorch.

    Returns the bundle.json `onnx` entry. Raises ModelError if export fails or the
    outputs differ by more than ONNX_PARITY_ATOL.
    """
    import numpy as np
    import torch

    net = net.eval()
    clip = int(meta["clip_samples"])
    example = torch.randn(2, clip, generator=torch.Generator().manual_seed(0)) * 0.1
    opset = 18
    try:
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=["waveform"],
            output_names=["logits"],
            # Any batch size; the time axis stays clip_samples (the Predictor's window).
            dynamic_shapes={_forward_arg(net): {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    except Exception as err:
        raise ModelError(f"ONNX export of {type(net).__name__} failed: {err}") from None
    try:
        diff = onnx_parity(net, path, clip)
    except Exception as err:  # onnxruntime raises its own error types
        raise ModelError(f"Exported ONNX model cannot be run by onnxruntime: {err}") from None
    if not np.isfinite(diff) or diff > ONNX_PARITY_ATOL:
        raise ModelError(
            f"ONNX export differs from PyTorch by {diff:.3g} (> {ONNX_PARITY_ATOL:g}); not registered."
        )
    return {"file": path.name, "sha256": _sha256_file(path), "opset": opset, "max_abs_diff": diff}


def _forward_arg(net: nn.Module) -> str:
    import inspect

    return next(iter(inspect.signature(net.forward).parameters), "x")


def onnx_parity(net: nn.Module, path: Path, clip_samples: int, batch: int = 3) -> float:
    """Max |logits_onnx - logits_torch| on a fixed random batch of waveforms."""
    import numpy as np
    import onnxruntime as ort
    import torch

    waves = torch.randn(batch, clip_samples, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.inference_mode():
        expected = net.eval()(waves).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: waves.numpy()})[0]
    return float(np.max(np.abs(got - expected)))


# -- W&B ----------------------------------------------------------------------------------


def _log_wandb_artifact(folder: Path, bundle: Mapping[str, Any], *, promoted: bool) -> None:
    """Log a registered bundle as a W&B artifact when a run is active; best effort.

    The local registry is the source of truth; a failure here is only logged. wandb is
    imported only if something already imported it (an active run implies that).
    """
    import sys

    if "wandb" not in sys.modules:
        return
    try:
        import wandb

        run = wandb.run
        if run is None:
            return
        artifact = wandb.Artifact(
            name="faultsense-model",
            type="model",
            metadata={k: v for k, v in bundle.items() if k != "config"},
        )
        artifact.add_dir(str(folder))
        aliases = [str(bundle["version"])] + (["current"] if promoted else [])
        run.log_artifact(artifact, aliases=aliases)
    except Exception as err:  # never let tracking break registration
        log.warning("Could not log %s to W&B: %s", folder.name, err)
