"""One registry per component kind; a component is built from config in one hop.

``BACKBONES.build("yolov8", variant="n")`` checks the keyword arguments against the constructor's
signature (unknown keys get a "did you mean" hint, keys listed in :data:`RENAMED_KEYS` name their
new spelling, simple annotations are type-checked) and then calls the constructor with plain
keyword arguments. No scopes, no string routing beyond the name.
"""
from __future__ import annotations

import inspect
import json
import typing
from typing import Any, Callable, Dict, Mapping, TypeVar

from vfmkd.core.errors import ConfigError, did_you_mean

T = TypeVar("T")

# Config keys that were renamed, old -> new, for every registry kind. A model size is `variant`
# everywhere (students and teachers). The hint is only given where the old key is not a parameter
# of the constructor and the new one is, so a component that really takes `scale` is unaffected.
RENAMED_KEYS: Dict[str, str] = {"model_type": "variant", "scale": "variant", "model_name": "variant"}
RENAME_REASONS: Dict[str, str] = {"variant": "one name for a model size across students and teachers"}


def _yaml_scalar(value: Any) -> str:
    """``value`` as it would be written after ``key:`` in a YAML file (strings unquoted)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of a config value against a constructor annotation."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, (str, dict))
    if origin in (dict, typing.Mapping) or annotation is dict:
        return hasattr(value, "keys")
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


class Registry:
    """Maps a ``type`` name from config to a class (or factory function)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({self._entries[name]} and {obj})")
            self._entries[name] = obj  # type: ignore[assignment]
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Callable[..., Any]]]:
        """(name, class or factory) pairs in registration order."""
        return list(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} type '{name}'.{did_you_mean(name, self._entries)} "
                f"Registered {self.kind}s: {', '.join(self.names())}. A custom one must be registered with "
                f"@{self.kind.upper()}S.register('{name}') in a module that is imported before building."
            )
        return self._entries[name]

    def check_kwargs(self, name: str, kwargs: Mapping[str, Any], where: str = "") -> None:
        """Raise ConfigError for keys the constructor does not take or values of the wrong type.

        A key of :data:`RENAMED_KEYS` that the constructor does not name while it names the new key
        gets a hint with the line to write instead (checked before anything else, also for
        constructors that take ``**kwargs``).
        """
        target = self.get(name)
        fn = target.__init__ if inspect.isclass(target) else target
        sig = inspect.signature(fn)
        params = {k: p for k, p in sig.parameters.items() if k != "self"}
        named = {k for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        for key, value in kwargs.items():
            new = RENAMED_KEYS.get(key)
            if new is not None and key not in named and new in named:
                why = f" ({RENAME_REASONS[new]})" if new in RENAME_REASONS else ""
                raise ConfigError(
                    f"{where or f'{self.kind} {name!r}'}: key '{key}' was renamed to '{new}'{why}: "
                    f"write {new}: {_yaml_scalar(value)}."
                )
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable forward refs: skip type checks, keep key checks
            hints = {}
        loc = f"{where}: " if where else ""
        for key, value in kwargs.items():
            if key not in params:
                raise ConfigError(
                    f"{loc}unknown key '{key}' for {self.kind} '{name}'.{did_you_mean(key, params)} "
                    f"Valid keys: {', '.join(params)}."
                )
            ann = hints.get(key, params[key].annotation)
            if not _type_ok(value, ann):
                raise ConfigError(
                    f"{loc}'{key}' of {self.kind} '{name}' must be {getattr(ann, '__name__', ann)}, "
                    f"got {value!r} ({type(value).__name__})."
                )
        missing = [
            k for k, p in params.items()
            if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD and k not in kwargs
        ]
        if missing:
            raise ConfigError(f"{loc}{self.kind} '{name}' needs the key(s): {', '.join(missing)}.")

    def build(self, name: str, where: str = "", **kwargs: Any) -> Any:
        self.check_kwargs(name, kwargs, where)
        try:
            return self.get(name)(**kwargs)
        except ConfigError:
            raise
        except ValueError as err:  # a constructor refusing its arguments: a config mistake, named by its key
            raise ConfigError(f"{where or f'{self.kind} {name!r}'}: {err}") from err


BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
TEACHERS = Registry("teacher")
LOSSES = Registry("loss")
TASKS = Registry("task")  # what a head is for: vfmkd.tasks (one file per task)
