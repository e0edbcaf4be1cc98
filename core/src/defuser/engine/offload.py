"""Defusing modules of a model dispatched with accelerate (``device_map``, CPU or disk offload).

accelerate keeps an offloaded module's parameters on the ``meta`` device and attaches an
``AlignDevicesHook`` (``module._hf_hook``) whose ``weights_map`` (a ``PrefixedDataset`` over
a dict or an ``OffloadedWeightsLoader``) loads them at each forward: on every module with
direct tensors, or once for a whole block (``place_submodules``, ``preload_module_classes``).
Modules kept on a device get an execution-device hook that only moves inputs.

:func:`dispatched_conversion` wraps the defusion of one candidate so the result sits where
the fused module sat, as if accelerate had dispatched the defused model:

1. the candidate's offloaded tensors are loaded from the store onto the CPU (one module at
   a time) so the normal defusion can read them;
2. every new per-expert tensor is written to the same store under its full name (the dict,
   or accelerate's ``offload_weight`` in the offload folder with its index), put back on
   ``meta``, and its new module gets an offload hook reading that name; new modules without
   tensors get an execution-device hook; nothing changes for a block-wide hook but the store;
3. the fused tensors go back to ``meta``.  With ``cleanup_original`` the fused entries leave
   the store too (and their own files in the offload folder are deleted).

Any failure puts the store back as it was (entries and files written are removed); the
caller restores the module from its snapshot.  Fusing back (:mod:`defuser.engine.fuse_back`)
takes the same steps with the defused module as the candidate and the fused module as its
replacement: stale fused entries under the same names are replaced (their own files set
aside until the writes are committed) and the per-expert entries are dropped.  Modules on a device need nothing special:
their per-expert tensors are views or copies made on the fused tensor's own device.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from defuser.engine.candidates import Candidate

__all__ = ["OffloadError", "Placement", "dispatched_conversion"]

logger = logging.getLogger(__name__)


class OffloadError(RuntimeError):
    """A dispatched module's offload store cannot take the defused weights."""


def _align_hooks(module: nn.Module) -> list[Any]:
    """The ``AlignDevicesHook`` s attached to ``module`` (inside a ``SequentialHook`` too)."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook

    hooks = list(getattr(hook, "hooks", (hook,)))
    return [entry for entry in hooks if isinstance(entry, AlignDevicesHook)]


def _offload_hook(module: nn.Module) -> Any | None:
    return next((hook for hook in _align_hooks(module) if hook.offload), None)


def _direct_tensors(module: nn.Module, buffers: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in module._parameters.items():
        if tensor is not None:
            yield name, tensor
    if buffers:
        for name, tensor in module._buffers.items():
            if tensor is not None and name not in module._non_persistent_buffers_set:
                yield name, tensor


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = value
    else:
        module._buffers[name] = value


def _as_meta(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(meta, requires_grad=tensor.requires_grad)
    return meta


@dataclass
class _Owner:
    """A module whose ``AlignDevicesHook`` offloads tensors of the candidate."""

    path: str  # relative to the candidate ("" for the candidate itself); for an ancestor, its full path
    module: nn.Module
    hook: Any
    ancestor: bool = False

    @property
    def store(self) -> Any:
        from accelerate.utils import PrefixedDataset

        weights_map = self.hook.weights_map
        return weights_map.dataset if isinstance(weights_map, PrefixedDataset) else weights_map

    @property
    def map_prefix(self) -> str:
        """The key prefix of this owner's tensors in :attr:`store`."""
        from accelerate.utils import PrefixedDataset

        weights_map = self.hook.weights_map
        return weights_map.prefix if isinstance(weights_map, PrefixedDataset) else ""

    def candidate_prefix(self, candidate_path: str) -> str:
        """The store key prefix of the candidate module, derived from this owner's prefix."""
        prefix = self.map_prefix
        if self.ancestor:
            inside = candidate_path[len(self.path) + 1 :] if self.path else candidate_path
            return f"{prefix}{inside}."
        if not self.path:
            return prefix
        if not prefix.endswith(f"{self.path}."):
            raise OffloadError(
                f"the offload store of {self.path!r} is keyed {prefix!r}, not by module path: "
                "cannot name the defused weights"
            )
        return prefix[: -len(self.path) - 1]


@dataclass
class _Previous:
    """An entry that a write replaced: what the store held under ``key``, to put back on failure."""

    store: Any
    key: str
    value: Any = None  # the in-memory tensor, if any
    info: dict[str, Any] | None = None  # the loader's index entry, if any
    listed: bool = False  # in the loader's all_keys
    own_file: str | None = None  # the file that held only this entry ...
    set_aside: str | None = None  # ... moved here until the write is committed


class _StoreWrites:
    """Entries written to offload stores, undone on failure."""

    def __init__(self) -> None:
        self.added: list[tuple[Any, str, str | None]] = []  # (store, key, file written)
        self.replaced: list[_Previous] = []

    def write(self, store: Any, key: str, tensor: torch.Tensor, like_key: str | None, replace: bool = False) -> None:
        """Put ``tensor`` into ``store`` under ``key``; ``like_key`` (a fused entry) says where.
        An entry already under ``key`` is an error, or with ``replace`` set aside (its own file
        too) until :meth:`commit` removes it or :meth:`rollback` puts it back."""
        from accelerate.utils import OffloadedWeightsLoader, offload_weight

        if _holds(store, key):
            if not replace:
                raise OffloadError(f"the offload store already holds {key!r}")
            self._set_aside(store, key)
        tensor = tensor.detach()
        if isinstance(store, OffloadedWeightsLoader):
            # Next to the fused entry: in the loader's memory, or in its offload folder.
            in_memory = like_key in store.state_dict if like_key is not None else store.save_folder is None
            if in_memory:
                store.state_dict[key] = tensor.cpu()
                store.all_keys.append(key)
                self.added.append((store, key, None))
                return
            if store.save_folder is None:
                raise OffloadError(
                    f"{like_key!r} is offloaded to disk without an offload folder to write the defused weights "
                    "to: load or dispatch the model with an offload folder"
                )
            path = os.path.join(store.save_folder, f"{key}.dat")
            self.added.append((store, key, path))
            offload_weight(tensor, key, store.save_folder, index=store.index)
            store.all_keys.append(key)
            return
        if isinstance(store, MutableMapping):
            store[key] = tensor.cpu()
            self.added.append((store, key, None))
            return
        raise OffloadError(f"cannot write defused weights into an offload store of type {type(store).__name__}")

    def _set_aside(self, store: Any, key: str) -> None:
        from accelerate.utils import OffloadedWeightsLoader

        if isinstance(store, OffloadedWeightsLoader):
            previous = _Previous(store, key, store.state_dict.get(key), store.index.get(key), key in store.all_keys)
            if previous.info is not None and store.save_folder is not None:
                previous.own_file = _own_file(str(store.save_folder), key, previous.info)
            if previous.own_file is not None:
                # offload_weight writes ``<key>.dat``, possibly this very file: keep it apart.
                previous.set_aside = f"{previous.own_file}.defuser-previous"
                os.replace(previous.own_file, previous.set_aside)
        elif isinstance(store, MutableMapping):
            previous = _Previous(store, key, store[key])
        else:
            raise OffloadError(f"cannot replace {key!r} in an offload store of type {type(store).__name__}")
        self.replaced.append(previous)
        _forget(store, key)

    def rollback(self) -> None:
        """Remove every entry and file written, and put back every entry replaced."""
        from accelerate.utils import OffloadedWeightsLoader

        for store, key, path in reversed(self.added):
            _forget(store, key)
            if path is not None and os.path.isfile(path):
                os.remove(path)
        self.added.clear()
        for previous in reversed(self.replaced):
            store, key = previous.store, previous.key
            if previous.set_aside is not None:
                os.replace(previous.set_aside, previous.own_file)
            if not isinstance(store, OffloadedWeightsLoader):
                store[key] = previous.value
                continue
            if previous.value is not None:
                store.state_dict[key] = previous.value
            if previous.info is not None:
                store.index[key] = previous.info
            if previous.listed:
                store.all_keys.append(key)
        self.replaced.clear()

    def commit(self) -> None:
        """Record disk entries in ``index.json`` where the offload folder keeps one; remove
        the files of replaced entries that no entry uses any more."""
        from accelerate.utils import save_offload_index

        by_folder: dict[str, dict[str, Any]] = {}
        for store, key, path in self.added:
            if path is not None and os.path.isfile(os.path.join(store.save_folder, "index.json")):
                by_folder.setdefault(store.save_folder, {})[key] = store.index[key]
        for folder, entries in by_folder.items():
            save_offload_index(entries, folder)
        stale: dict[str, list[str]] = {}  # replaced disk entries now held in memory
        for previous in self.replaced:
            if previous.set_aside is not None:
                os.remove(previous.set_aside)
            folder = getattr(previous.store, "save_folder", None)
            if previous.info is not None and folder is not None and previous.key not in by_folder.get(folder, {}):
                stale.setdefault(str(folder), []).append(previous.key)
        for folder, keys in stale.items():
            _remove_from_index_file(folder, keys)
        self.replaced.clear()


def _holds(store: Any, key: str) -> bool:
    from accelerate.utils import OffloadedWeightsLoader

    if isinstance(store, OffloadedWeightsLoader):
        return key in store.state_dict or key in store.index
    return key in store


def _forget(store: Any, key: str) -> None:
    from accelerate.utils import OffloadedWeightsLoader

    if isinstance(store, OffloadedWeightsLoader):
        store.state_dict.pop(key, None)
        store.index.pop(key, None)
        if key in store.all_keys:
            store.all_keys.remove(key)
    elif isinstance(store, MutableMapping):
        store.pop(key, None)


def _own_file(folder: str, key: str, info: dict[str, Any]) -> str | None:
    """The file holding only the tensor ``key`` in the offload ``folder`` (``.dat``, or a
    per-tensor safetensors file written while loading), or None (a checkpoint file)."""
    path = info.get("safetensors_file") or os.path.join(folder, f"{key}.dat")
    own = {os.path.realpath(os.path.join(folder, f"{key}{suffix}")) for suffix in (".dat", ".safetensors")}
    return path if os.path.realpath(path) in own and os.path.isfile(path) else None


def _drop_entries(store: Any, keys: list[str]) -> None:
    """Remove the fused ``keys`` from ``store``, with the files of the offload folder that hold
    only one of them (never a checkpoint file), and from its ``index.json``."""
    from accelerate.utils import OffloadedWeightsLoader

    folder = store.save_folder if isinstance(store, OffloadedWeightsLoader) else None
    removed = []
    for key in keys:
        info = store.index.get(key) if isinstance(store, OffloadedWeightsLoader) else None
        _forget(store, key)
        if folder is None or info is None:
            continue
        removed.append(key)
        path = _own_file(str(folder), key, info)
        if path is not None:
            os.remove(path)
    if removed:
        _remove_from_index_file(str(folder), removed)


def _remove_from_index_file(folder: str, keys: list[str]) -> None:
    """Remove ``keys`` from the ``index.json`` of the offload ``folder``, where it keeps one."""
    index_file = os.path.join(folder, "index.json")
    if not os.path.isfile(index_file):
        return
    with open(index_file, encoding="utf-8") as handle:
        index = json.load(handle)
    for key in keys:
        index.pop(key, None)
    with open(index_file, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2)


@dataclass
class Placement:
    """What :func:`dispatched_conversion` yields: call :meth:`place` with the replacement."""

    candidate: Candidate
    owners: list[_Owner] = field(default_factory=list)
    active: bool = False
    # (module, name, meta tensor, loaded tensor, store, key) for each tensor loaded from a store
    loaded: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor, Any, str]] = field(default_factory=list)
    writes: _StoreWrites = field(default_factory=_StoreWrites)
    consumed: list[tuple[Any, str]] = field(default_factory=list)
    # Entries already under a new tensor's name are replaced (fusing back: the fused entries
    # a conversion without cleanup_original left behind hold the weights before any edit).
    replace_entries: bool = False
    # The candidate's tree before defusion: module ids, and (module id, name) -> tensor id.
    modules_before: set[int] = field(default_factory=set)
    tensors_before: dict[tuple[int, str], int] = field(default_factory=dict)

    def record_before(self) -> None:
        """Remember the fused tree (after loading), to tell new modules and tensors apart."""
        for module in self.candidate.module.modules():
            self.modules_before.add(id(module))
            for name, tensor in _direct_tensors(module):
                self.tensors_before[(id(module), name)] = id(tensor)

    def place(self, replacement: nn.Module) -> None:
        """Put ``replacement``'s new tensors where the fused ones were and hook them up."""
        if not self.active:
            return
        fused_forward = self.candidate.module.__dict__.get("forward")
        if fused_forward is not None and replacement.__dict__.get("forward") is fused_forward:
            # accelerate's hooked forward is an instance attribute bound to the fused module;
            # copied along with the plain attributes it would keep running the fused module.
            del replacement.__dict__["forward"]
        kept = {id(module) for module in replacement.modules()}
        new_modules = [
            (path, module) for path, module in replacement.named_modules() if id(module) not in self.modules_before
        ]
        self._remember_consumed(replacement)
        covering = next((owner for owner in self.owners if owner.hook.place_submodules and not owner.path), None)
        covering = next((owner for owner in self.owners if owner.ancestor), covering)
        inside = [owner for owner in self.owners if not owner.ancestor]
        consumed = [owner for owner in inside if id(owner.module) not in kept]
        source = covering or (consumed or inside or [None])[0]
        if source is None:
            # Nothing of it is offloaded: new modules get the execution-device hooks only.
            self._hook_on_device(replacement, new_modules)
            return
        prefix = source.candidate_prefix(self.candidate.path)
        like_key = next((key for *_, store, key in self.loaded if store is source.store), None)
        moved: list[tuple[nn.Module, str, torch.Tensor]] = []
        for path, module in replacement.named_modules():
            for name, tensor in list(_direct_tensors(module, buffers=source.hook.offload_buffers)):
                if self.tensors_before.get((id(module), name)) == id(tensor):
                    continue
                if tensor.device.type == "meta":
                    raise OffloadError(f"{_join(self.candidate.path, path, name)} has no value to offload")
                self.writes.write(source.store, prefix + _join(path, name), tensor, like_key, self.replace_entries)
                moved.append((module, name, tensor))
        for module, name, tensor in moved:
            _set_tensor(module, name, _as_meta(tensor))
        if covering is not None:
            # A block-wide hook loads every tensor under it by name: an ancestor's keeps doing
            # so; the candidate's own one is given to its replacement.
            if not covering.ancestor and replacement is not self.candidate.module:
                _attach(replacement, _offload_hook_like(covering.hook, source.store, prefix, place_submodules=True))
            return
        holders = {id(module) for module, _, _ in moved}
        for path, module in new_modules:
            if id(module) in holders:
                _attach(module, _offload_hook_like(source.hook, source.store, f"{prefix}{path}." if path else prefix))
        self._hook_on_device(replacement, new_modules)

    def _remember_consumed(self, replacement: nn.Module) -> None:
        live = {
            (id(module), name): tensor for module in replacement.modules() for name, tensor in _direct_tensors(module)
        }
        for module, name, _, loaded, store, key in self.loaded:
            if live.get((id(module), name)) is not loaded:
                self.consumed.append((store, key))

    def _hook_on_device(self, replacement: nn.Module, new_modules: list[tuple[str, nn.Module]]) -> None:
        """New modules with state get the execution-device hook dispatch would give them."""
        hooks = _align_hooks(self.candidate.module) or next(
            (_align_hooks(owner.module) for owner in self.owners if not owner.ancestor), []
        )
        if not hooks:
            return
        reference = hooks[0]
        for _, module in new_modules:
            holds_state = next(module.parameters(), None) is not None or next(module.buffers(), None) is not None
            if "_hf_hook" in module.__dict__ or not holds_state:
                continue
            io_same_device = reference.io_same_device if module is replacement else False
            _attach(module, _execution_hook(reference, io_same_device))

    def restore_loaded(self) -> None:
        """Put the fused modules' tensors back on ``meta`` (as accelerate keeps them)."""
        for module, name, original, loaded, _, _ in reversed(self.loaded):
            holder = module._parameters if name in module._parameters else module._buffers
            if holder.get(name) is loaded:
                holder[name] = original
        self.loaded.clear()


def _execution_hook(reference: Any, io_same_device: bool) -> Any:
    from accelerate.hooks import AlignDevicesHook

    return AlignDevicesHook(
        execution_device=reference.execution_device,
        io_same_device=io_same_device,
        skip_keys=reference.skip_keys,
        tied_params_map=reference.tied_params_map,
    )


def _offload_hook_like(hook: Any, store: Any, prefix: str, place_submodules: bool = False) -> Any:
    """An offload hook configured like ``hook``, reading ``store`` under ``prefix``."""
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import PrefixedDataset

    return AlignDevicesHook(
        execution_device=hook.execution_device,
        offload=True,
        weights_map=PrefixedDataset(store, prefix),
        offload_buffers=hook.offload_buffers,
        place_submodules=place_submodules,
        skip_keys=hook.skip_keys,
        tied_params_map=hook.tied_params_map,
    )


def _attach(module: nn.Module, hook: Any) -> None:
    from accelerate.hooks import add_hook_to_module

    add_hook_to_module(module, hook, append=True)


def _find_owners(model: nn.Module | None, candidate: Candidate) -> tuple[list[_Owner], bool]:
    """Offloading hooks over the candidate (ancestors with block-wide hooks, then its own
    modules), and whether any accelerate hook touches it at all."""
    owners: list[_Owner] = []
    hooked = False
    if model is not None and candidate.path:
        parts = candidate.path.split(".")
        for depth in range(len(parts)):
            path = ".".join(parts[:depth])
            try:
                ancestor = model.get_submodule(path)
            except AttributeError:
                break
            hook = _offload_hook(ancestor)
            if hook is not None and hook.place_submodules:
                owners.append(_Owner(path, ancestor, hook, ancestor=True))
                hooked = True
    for path, module in candidate.module.named_modules():
        if "_hf_hook" not in module.__dict__:
            continue
        hooked = True
        hook = _offload_hook(module)
        if hook is not None and hook.weights_map is not None:
            owners.append(_Owner(path, module, hook))
    return owners, hooked


def _owned_modules(owner: _Owner, candidate: Candidate) -> Iterator[tuple[nn.Module, str]]:
    """``(module, its key prefix in the owner's store)`` for each module of the candidate whose
    tensors ``owner`` offloads."""
    if owner.ancestor:
        prefix, reach = owner.candidate_prefix(candidate.path), candidate.module.named_modules()
    else:
        prefix = owner.map_prefix
        reach = owner.module.named_modules() if owner.hook.place_submodules else iter([("", owner.module)])
    for path, module in reach:
        yield module, f"{prefix}{path}." if path else prefix


def _load(placement: Placement) -> None:
    """Load the candidate's offloaded tensors onto the CPU, each once, in place of the meta ones."""
    seen: set[tuple[int, str]] = set()
    for owner in placement.owners:
        for module, prefix in _owned_modules(owner, placement.candidate):
            for name, tensor in list(_direct_tensors(module, buffers=owner.hook.offload_buffers)):
                if (id(module), name) in seen or tensor.device.type != "meta":
                    continue
                seen.add((id(module), name))
                key = prefix + name
                value = owner.store[key].to("cpu")
                if isinstance(tensor, nn.Parameter):
                    value = nn.Parameter(value, requires_grad=tensor.requires_grad)
                placement.loaded.append((module, name, tensor, value, owner.store, key))
                _set_tensor(module, name, value)


@contextmanager
def dispatched_conversion(
    model: nn.Module | None, candidate: Candidate, cleanup_original: bool = False, replace_entries: bool = False
) -> Iterator[Placement]:
    """Around the defusion of ``candidate`` in a model dispatched with accelerate: load its
    offloaded tensors, and (through :meth:`Placement.place`) store and hook the new ones.
    Fusing back runs through here too, with the defused module as ``candidate`` and the
    fused module as its replacement (``replace_entries``: stale fused entries are replaced).

    A no-op for modules without accelerate hooks.  On failure every store write is undone and
    the fused tensors are back on ``meta``; the caller restores the module itself.
    """
    owners, hooked = _find_owners(model, candidate)
    placement = Placement(candidate, owners, active=hooked, replace_entries=replace_entries)
    if not hooked:
        yield placement
        return
    try:
        _load(placement)
        placement.record_before()
        yield placement
    except BaseException:
        placement.writes.rollback()
        placement.restore_loaded()
        raise
    placement.restore_loaded()
    placement.writes.commit()
    if cleanup_original:
        by_store: dict[int, tuple[Any, list[str]]] = {}
        for store, key in placement.consumed:
            by_store.setdefault(id(store), (store, []))[1].append(key)
        for store, keys in by_store.values():
            _drop_entries(store, keys)
    logger.debug("placed the defused weights of %s like its fused ones", candidate.path)
