"""Patching vLLM without importing it: a target in a module that vLLM has not imported yet is patched by
an import hook right after vLLM imports that module itself. Every patch is recorded and reversible.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

from tensortap.integrations.vllm.state import log

_ABSENT = object()
PATCHES: list[tuple[object, str, object]] = []  # (owner, attribute, what to put back), in patch order
_LOCK = threading.RLock()


def patch(owner, attribute: str, make_wrapper) -> None:
    """Replace `owner.attribute` by `make_wrapper(original)`. An attribute that already holds a tensortap
    wrapper (a name another module imported from a patched one) is left as it is, and restored to the
    original by `restore_all`."""
    current = getattr(owner, attribute)
    original = getattr(current, "__tensortap_original__", None)
    if original is not None:
        PATCHES.append((owner, attribute, original))
        return
    wrapper = make_wrapper(current)
    wrapper.__tensortap_original__ = current
    PATCHES.append((owner, attribute, vars(owner).get(attribute, _ABSENT)))
    setattr(owner, attribute, wrapper)


def restore_all() -> None:
    while PATCHES:
        owner, attribute, saved = PATCHES.pop()
        if saved is _ABSENT:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, saved)


def apply(module, entries) -> None:
    """Patch `entries` ((dotted path in the module, wrapper factory), ...) of an imported module; what this
    vLLM build lacks is logged and not captured."""
    for path, make_wrapper in entries:
        try:
            owner = module
            *parents, attribute = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            if getattr(owner, attribute) is None:  # an optional kernel this build lacks (flashinfer)
                continue
            patch(owner, attribute, make_wrapper)
        except Exception as exc:
            log.warning("tensortap: %s.%s not patched (%s: %s)", module.__name__, path, type(exc).__name__, exc)


class ImportHook(importlib.abc.MetaPathFinder):
    """Patches `pending[module name]` right after that module is executed, whoever imports it."""

    def __init__(self, pending: dict[str, list]):
        self.pending = pending

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, self, name)
        return spec

    def loaded(self, name: str, module) -> None:
        with _LOCK:
            entries = self.pending.pop(name, None)
            if entries:
                apply(module, entries)
            if not self.pending:
                uninstall(self)


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then the hook's patches; every other attribute is the real loader's."""

    def __init__(self, loader, hook: ImportHook, name: str):
        self._loader, self._hook, self._name = loader, hook, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._hook.loaded(self._name, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def install(pending: dict[str, list]) -> ImportHook | None:
    """Patch what is imported already; hook the rest. Returns the hook (None when nothing is pending)."""
    with _LOCK:
        for name in [n for n in pending if n in sys.modules]:
            apply(sys.modules[name], pending.pop(name))
        if not pending:
            return None
        hook = ImportHook(pending)
        sys.meta_path.insert(0, hook)
        return hook


def uninstall(hook: ImportHook | None) -> None:
    with _LOCK:
        if hook is not None and hook in sys.meta_path:
            sys.meta_path.remove(hook)


def hooks() -> list[ImportHook]:
    return [finder for finder in sys.meta_path if isinstance(finder, ImportHook)]
