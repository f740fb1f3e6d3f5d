"""Config plumbing shared by every entry point: Hydra configs as plain data, instantiate
with our errors unwrapped, and one CLI error exit.

Hydra and OmegaConf are imported inside the functions, so `faultsense.registry` and the
bundle loader can use `plain` without pulling them in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from .errors import FaultSenseError

T = TypeVar("T")

# Exit status of a CLI that stopped on a user error (bad config, data, audio, version).
EXIT_USER_ERROR = 2


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second: every timestamp the project writes."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def plain(value: Any) -> Any:
    """A DictConfig/ListConfig/Mapping/tuple tree as plain dicts, lists and primitives,
    interpolations resolved. Anything else is returned as it is."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def resolved_config(node: Any) -> Any:
    """The config as plain data, resolved where it can be: an interpolation that cannot
    resolve here (e.g. `${hydra:...}` outside a Hydra run) is kept as its text."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig | ListConfig):
        raw = OmegaConf.to_container(node, resolve=False)
        is_dict = isinstance(node, DictConfig)
        keys = list(node.keys()) if is_dict else range(len(node))
        out: Any = {} if is_dict else [None] * len(raw)
        for key in keys:
            try:
                value = resolved_config(node[key])
            except Exception:  # omegaconf raises several types for failed interpolations
                value = raw[key]
            out[str(key) if is_dict else key] = value
        return out
    if isinstance(node, Mapping):
        return {str(k): resolved_config(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [resolved_config(v) for v in node]
    return node


def instantiate(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a FaultSenseError raised while building comes out as
    itself (Hydra wraps it in InstantiationException), so CLIs can print it."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, FaultSenseError):
            raise err.__cause__ from None
        raise


def instantiate_all(group: Any) -> list[Any]:
    """Instantiate every node with a `_target_` in a config group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


@contextlib.contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Around a CLI's body: a FaultSenseError prints `prog: Type: message` on stderr and
    exits with EXIT_USER_ERROR, no traceback. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except FaultSenseError as err:
        print(f"{prog}: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def run_cli(prog: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` inside `exit_on_user_error(prog)`."""
    with exit_on_user_error(prog):
        return fn(*args)
