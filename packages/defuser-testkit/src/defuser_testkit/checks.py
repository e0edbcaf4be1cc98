"""Conformance checks a plugin runs on its model types.

Each check builds what it needs from a *factory*: a zero-argument callable returning a fresh
tiny model (same seed, same weights every call).  Checks assert real behaviour: outputs
equal before and after, names and shapes present, per-expert weights equal to their slice of
the fused tensor (computed here independently of defuser's own slicing code).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defuser import convert_model, find_candidates, replace_fused_blocks, restore_fused_blocks
from defuser.plugin import DefusedExperts, ExpertsLayout, layer_index, tiny_forward

__all__ = [
    "ATOL",
    "TinyConfigInvalid",
    "assert_converts_equal",
    "assert_generate_same",
    "assert_max_layers",
    "assert_meta_conversion",
    "assert_no_fused_names",
    "assert_preload_loads_both_layouts",
    "assert_saves_and_reloads",
    "expected_expert_weights",
    "fused_names_of",
    "model_output",
    "preload_patched",
    "zero_identity_rows",
]

ATOL = 1e-5
ModelFactory = Callable[[], nn.Module]


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits, or the last hidden state for models without a head (no cache, no grad)."""
    return tiny_forward(model, inputs)


def _stored(fused: nn.Module, name: str) -> torch.Tensor:
    owner = fused
    *path, leaf = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, leaf).detach()


def expected_expert_weights(fused: nn.Module, layout: ExpertsLayout, expert: int) -> dict[str, torch.Tensor]:
    """The per-expert weights a fused module should defuse into, by meaning."""

    def slice_of(name: str) -> torch.Tensor:
        tensor = _stored(fused, name)
        if layout.flattened:
            tensor = tensor.reshape(layout.num_experts, -1, tensor.shape[-1])
        return tensor[expert]

    down = slice_of(layout.down_name)
    down_transposed = layout.is_transposed if layout.down_transposed is None else layout.down_transposed
    expected = {"down_proj": down.T if down_transposed else down}
    if layout.separate_gate_up:
        gate, up = slice_of(layout.gate_name), slice_of(layout.up_name)
        if layout.is_transposed:
            gate, up = gate.T, up.T
        expected.update(gate_proj=gate, up_proj=up)
        return expected
    first = slice_of(layout.gate_up_name if layout.has_gate else layout.up_name)
    if layout.is_transposed:
        first = first.T
    if not layout.has_gate:
        expected["up_proj"] = first
        return expected
    half = first.shape[0] // 2
    if layout.is_concatenated:
        halves = (first[:half], first[half:])
    else:
        halves = (first[0::2], first[1::2])
    gate, up = halves if layout.gate_first else halves[::-1]
    expected.update(gate_proj=gate, up_proj=up)
    return expected


def _fused_snapshot(model: nn.Module) -> dict[str, tuple[nn.Module, Any]]:
    return {c.path: (copy.deepcopy(c.module), c.layout) for c in find_candidates(model) if c.kind == "experts"}


def assert_converts_equal(factory: ModelFactory, inputs: dict[str, torch.Tensor], atol: float = ATOL) -> nn.Module:
    """Convert a fresh model: outputs equal, names and per-expert weights right, nothing
    fused left, a second conversion a no-op.  Returns the converted model."""
    model = factory()
    reference = model_output(model, inputs)
    candidates = find_candidates(model)
    assert candidates, f"{type(model).__name__}: no fused candidates detected"
    snapshot = _fused_snapshot(model)
    assert convert_model(model) is True
    modules = dict(model.named_modules())
    for path, (fused, layout) in snapshot.items():
        defused = modules[path]
        assert isinstance(defused, DefusedExperts), f"{path} is {type(defused).__name__}"
        assert len(defused) == layout.num_experts
        assert len(list(defused)) == layout.num_experts
        for index in range(layout.num_experts):
            for name, tensor in expected_expert_weights(fused, layout, index).items():
                linear = getattr(defused[index], name)
                assert isinstance(linear, nn.Linear), f"{path}.{index}.{name} is not nn.Linear"
                assert torch.equal(linear.weight, tensor), f"{path}.{index}.{name} differs from its fused slice"
    state = model.state_dict()
    for candidate in candidates:
        for key in _expected_keys(candidate):
            assert key in state, f"missing {key}"
        fused_keys = [key for key in state if key.startswith(f"{candidate.path}.") and _is_fused_key(key, candidate)]
        assert not fused_keys, f"fused tensors still saved: {fused_keys}"
    assert find_candidates(model) == [], "fused modules left after conversion"
    assert_no_fused_names(model, candidates)
    converted = model_output(model, inputs)
    difference = (converted - reference).abs().max().item()
    assert difference <= atol, f"outputs differ by {difference} after conversion"
    assert convert_model(model) is False, "second conversion changed something"
    return model


def fused_names_of(candidate: Any) -> list[str]:
    """Every (possibly dotted) fused tensor or Linear name a defused ``candidate`` must no
    longer answer: its layout's names, their ``_bias`` forms and the stock fused names."""
    layout = candidate.layout
    if candidate.kind == "dense":
        return [layout.fused_name]
    if candidate.kind == "parallel":
        return [layout.weight_name]
    names = {layout.gate_up_name, layout.gate_name, layout.up_name, layout.down_name, *_FUSED_LEAVES}
    return sorted(names | {f"{name}_bias" for name in names})


def assert_no_fused_names(model: nn.Module, candidates: list[Any]) -> None:
    """Defused means defused: no fused name resolves on the module that replaced each of
    ``candidates`` (``hasattr`` is False), for experts, dense MLPs and parallel experts."""
    modules = dict(model.named_modules())
    for candidate in candidates:
        module = modules.get(candidate.path)
        if module is None:
            continue
        for name in fused_names_of(candidate):
            owner: Any = module
            try:
                for part in name.split("."):
                    owner = getattr(owner, part)
            except AttributeError:
                continue
            raise AssertionError(f"{candidate.path}.{name} still resolves after conversion ({type(owner).__name__})")


def _expected_keys(candidate: Any) -> list[str]:
    path, layout = candidate.path, candidate.layout
    if candidate.kind == "experts":
        names = ("gate_proj", "up_proj", "down_proj") if layout.has_gate else ("up_proj", "down_proj")
        return [f"{path}.{index}.{name}.weight" for index in (0, layout.num_experts - 1) for name in names]
    if candidate.kind == "parallel":
        count = candidate.module._parameters[layout.weight_name].shape[0]
        return [f"{path}.{index}.linear.weight" for index in (0, count - 1)]
    return [f"{path}.gate_proj.weight", f"{path}.up_proj.weight"]


def _is_fused_key(key: str, candidate: Any) -> bool:
    leaf = key[len(candidate.path) + 1 :]
    if candidate.kind == "dense":
        return leaf.startswith(f"{candidate.layout.fused_name}.")
    if candidate.kind == "parallel":
        return leaf == candidate.layout.weight_name
    return not leaf.split(".")[0].isdigit() and leaf.split(".")[-1] in _FUSED_LEAVES | _declared_fused_leaves(
        candidate.layout
    )


_FUSED_LEAVES = {
    *("gate_up_proj", "up_proj", "down_proj", "gate_proj", "gate_up_proj_bias", "down_proj_bias"),
    *("w1", "v1", "w2"),  # DBRX's flattened experts
}


def _declared_fused_leaves(layout: Any) -> set[str]:
    # A plugin may declare tensor names of its own (``w_in``); a dotted name ends in its leaf.
    names = {getattr(layout, field, None) for field in ("gate_up_name", "gate_name", "up_name", "down_name")}
    leaves = {name.rsplit(".", 1)[-1] for name in names if name}
    return leaves | {f"{leaf}_bias" for leaf in leaves}


def assert_generate_same(factory: ModelFactory, inputs: dict[str, torch.Tensor], new_tokens: int = 6) -> None:
    """Greedy ``generate()`` gives the same tokens before and after conversion."""
    model = factory()
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model.generate(**inputs, **settings)
    assert convert_model(model)
    with torch.no_grad():
        after = model.generate(**inputs, **settings)
    assert torch.equal(before, after), f"generate() differs: {before.tolist()} vs {after.tolist()}"


def assert_meta_conversion(factory: ModelFactory) -> None:
    """Conversion of a meta-device model builds the structure and allocates nothing."""
    with torch.device("meta"):
        model = factory()
    assert convert_model(model) is True
    assert find_candidates(model) == []
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in model.parameters()), "conversion allocated real parameters"
    assert tensors, "model has no tensors"
    assert any(isinstance(m, DefusedExperts) for m in model.modules()) or any(
        name.endswith(("gate_proj", ".linear")) for name, _ in model.named_modules()
    )


def assert_max_layers(factory: ModelFactory, inputs: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    """``max_layers=1`` converts layer 0 only; the rest keep their fused form and the
    mixed model still matches."""
    model = factory()
    reference = model_output(model, inputs)
    before = find_candidates(model)
    assert convert_model(model, max_layers=1) is True
    left = {c.path for c in find_candidates(model)}
    for candidate in before:
        in_first = layer_index(candidate.path) == 0
        assert (candidate.path in left) != in_first, f"{candidate.path}: max_layers=1 handled it wrongly"
    difference = (model_output(model, inputs) - reference).abs().max().item()
    assert difference <= atol, f"mixed fused/defused model differs by {difference}"


@contextlib.contextmanager
def preload_patched(model_type: str) -> Iterator[None]:
    """``replace_fused_blocks(model_type)`` for the duration of a block, then undone."""
    assert replace_fused_blocks(model_type) is True
    try:
        yield
    finally:
        restore_fused_blocks(model_type)


def assert_preload_loads_both_layouts(
    factory: ModelFactory,
    model_type: str,
    inputs: dict[str, torch.Tensor],
    tmp_path: Path,
    extra_checkpoints: Callable[[nn.Module, Path], dict[str, Path]] | None = None,
    atol: float = ATOL,
) -> None:
    """A stock model saved per-expert (transformers' default) and fused loads into the
    pre-load patched class with equal outputs and defused blocks; so do ``extra_checkpoints``."""
    stock = factory()
    reference = model_output(stock, inputs)
    checkpoints = {"per-expert": tmp_path / "per_expert", "fused": tmp_path / "fused"}
    stock.save_pretrained(checkpoints["per-expert"])
    stock.save_pretrained(checkpoints["fused"], save_original_format=False)
    if extra_checkpoints is not None:
        checkpoints.update(extra_checkpoints(stock, tmp_path))
    stock_class = type(stock)
    stock_candidates = find_candidates(stock)
    with preload_patched(model_type):
        built = factory()
        assert find_candidates(built) == [], "direct construction still built fused blocks"
        assert_no_fused_names(built, stock_candidates)
        for name, folder in checkpoints.items():
            # The config object, not config.json: a tiny config may not survive its own JSON
            # (derived values lost, validation refusing it), and this check is about weights.
            loaded = stock_class.from_pretrained(folder, config=copy.deepcopy(stock.config)).eval()
            assert find_candidates(loaded) == [], f"{name} checkpoint: fused blocks after patched load"
            assert any(isinstance(m, DefusedExperts) for m in loaded.modules()) or any(
                n.endswith(("gate_proj", ".linear")) for n, _ in loaded.named_modules()
            )
            assert_no_fused_names(loaded, stock_candidates)
            difference = (model_output(loaded, inputs) - reference).abs().max().item()
            assert difference <= atol, f"{name} checkpoint: outputs differ by {difference}"
    after = factory()
    assert find_candidates(after), "restore left the classes patched"


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"save_pretrained wrote no safetensors file into {folder}: {sorted(p.name for p in folder.iterdir())}"
    saved: dict[str, torch.Tensor] = {}
    for file in files:
        saved.update(load_file(file))
    return saved


def zero_identity_rows(model: nn.Module) -> None:
    """Zero the rows identity experts hold past the routed ones in a fused tensor (LongCat-Flash
    before 5.25.0): never read, dropped by conversion and saved as zeros (as ``fuse_model``
    leaves them), so stock's save of the fused model holds zeros there too."""
    for candidate in find_candidates(model):
        routed = getattr(candidate.layout, "num_experts", 0)
        if candidate.kind == "experts" and candidate.layout.identity_experts:
            for tensor in candidate.module.parameters():
                if tensor.shape[0] > routed:
                    tensor.data[routed:] = 0


class TinyConfigInvalid(AssertionError):
    """The tiny config of a model type fails transformers' own validation, so it cannot be saved."""


def assert_saves_and_reloads(
    factory: ModelFactory,
    model_type: str,
    tmp_path: Path,
    inputs: dict[str, torch.Tensor] | None = None,
    atol: float = ATOL,
) -> None:
    """A converted model saves (safetensors) the checkpoint stock transformers saves for the
    fused model: the same keys, tensors equal to the last bit (so plain transformers loads it);
    with ``inputs`` (the plugin patches ``model_type`` before load) it also reloads defused,
    with every defused tensor and the outputs equal.  Raises :class:`TinyConfigInvalid` when
    the model's config fails transformers' own validation (which ``save_pretrained`` runs first).
    """
    model = factory()
    validate = getattr(model.config, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as error:
            reason = " ".join(str(error).split())  # one line: pytest shows a skip reason's first line only
            raise TinyConfigInvalid(f"the tiny {model_type} config is refused by transformers: {reason}") from error
    zero_identity_rows(model)
    # Reloads get the config object (see assert_preload_loads_both_layouts).
    config = copy.deepcopy(model.config)
    reference = model_output(model, inputs) if inputs is not None else None
    model.save_pretrained(tmp_path / "stock")
    paths = [candidate.path for candidate in find_candidates(model)]
    assert convert_model(model) is True
    state = model.state_dict()
    defused_keys = [key for key in state if any(key.startswith(f"{path}.") for path in paths)]
    assert defused_keys, f"no tensors under the converted modules {paths}"
    model.save_pretrained(tmp_path / "defused")  # safetensors: transformers 5 writes no other format
    stock, saved = _saved_tensors(tmp_path / "stock"), _saved_tensors(tmp_path / "defused")
    missing, extra = sorted(set(stock) - set(saved)), sorted(set(saved) - set(stock))
    assert not missing and not extra, f"keys unlike stock's save: missing {missing[:4]}, extra {extra[:4]}"
    unequal = [key for key in stock if stock[key].shape != saved[key].shape or not torch.equal(stock[key], saved[key])]
    assert not unequal, f"tensors unlike stock's save of the fused model: {unequal[:4]}"
    if inputs is None:
        return
    with preload_patched(model_type):
        reloaded = type(model).from_pretrained(tmp_path / "defused", config=config).eval()
    assert find_candidates(reloaded) == [], "fused blocks after reloading into the patched classes"
    reloaded_state = reloaded.state_dict()
    for key in defused_keys:
        assert key in reloaded_state, f"{key} missing after reload"
        assert torch.equal(reloaded_state[key], state[key]), f"{key} differs after reload"
    difference = (model_output(reloaded, inputs) - reference).abs().max().item()
    assert difference <= atol, f"reloaded model differs by {difference}"
