"""A post-import hook: run a callback right after a given module finishes importing.

This is what keeps activation cheap: `import aim_llama.auto` installs this finder and returns;
LlamaIndex, Aim and pydantic-settings are imported only when the application itself imports
`llama_index.core`. It imports nothing but `sys` and `_thread` (both already loaded at
interpreter start), so installing it costs microseconds — not even `typing` is imported.
"""

from __future__ import annotations

import sys
from _thread import _local

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any


class _NotifyingLoader:
    """Wraps the real loader; after `exec_module` it restores the real loader and calls back."""

    def __init__(self, loader: Any, callback: Callable[[], None],
                 finder: PostImportFinder | None = None) -> None:
        self._loader = loader
        self._callback = callback
        self._finder = finder

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            spec = getattr(module, "__spec__", None)
            if spec is not None:
                spec.loader = self._loader
            module.__loader__ = self._loader
        except Exception:
            pass
        try:
            self._loader.exec_module(module)
        except BaseException:
            # The import failed (and Python drops the half-made module): watch again, so an
            # application that retries the import is still instrumented when it succeeds.
            if self._finder is not None and self._finder not in sys.meta_path:
                sys.meta_path.insert(0, self._finder)
            raise
        self._callback()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class PostImportFinder:
    """A `sys.meta_path` entry that watches for one module name and removes itself once it fired."""

    def __init__(self, module_name: str, callback: Callable[[], None]) -> None:
        self.module_name = module_name
        self.callback = callback
        self._busy = _local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.module_name or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self:
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        remove(self)
        spec.loader = _NotifyingLoader(spec.loader, self.callback, self)
        return spec


_after: dict[str, list[Callable[[], None]]] = {}
_done: set[str] = set()


def initializing(module_name: str) -> bool:
    """Whether `module_name` is being imported right now (its code has not reached its end)."""
    if module_name in _done:
        return False
    module = sys.modules.get(module_name)
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def after_module(module_name: str, callback: Callable[[], None]) -> None:
    """Call `callback` when `module_name`, now mid-import, calls `module_done` at its end."""
    _after.setdefault(module_name, []).append(callback)


def module_done(module_name: str) -> None:
    """The last line of a module that may be mid-import when a post-import hook fires."""
    _done.add(module_name)
    for callback in _after.pop(module_name, ()):
        callback()


def remove(finder: PostImportFinder) -> None:
    """Take the finder off `sys.meta_path` (no-op if it is not there)."""
    try:
        sys.meta_path.remove(finder)
    except ValueError:
        pass


def when_imported(module_name: str, callback: Callable[[], None]) -> PostImportFinder | None:
    """Call `callback` now if `module_name` is imported, else right after it gets imported."""
    if module_name in sys.modules:
        callback()
        return None
    for finder in sys.meta_path:
        if isinstance(finder, PostImportFinder) and finder.module_name == module_name:
            return finder  # already waiting (one activation per process)
    finder = PostImportFinder(module_name, callback)
    sys.meta_path.insert(0, finder)
    return finder
