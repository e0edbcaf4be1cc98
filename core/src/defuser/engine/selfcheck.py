"""Run-time self-checks of a conversion: nothing lost, and the same outputs.

Two checks guard every module ``convert_model`` defuses, before its replacement is installed:

* **Conservation** (always): every parameter and buffer of the fused module that is not a
  fused tensor its layout consumes must be in the replacement under the same name relative
  to the module (the same object, or equal values).  A lost tensor (a norm, a scale) fails
  the module.
* **Numbers** (``DEFUSER_VERIFY``, on by default): the first module of each (class, plugin,
  kind, layout) of a conversion runs a small probe (a few tokens, in the module's own dtype
  and on its own device, routes reaching every expert of a module with up to
  :data:`PROBE_EXPERTS`, else that many spread from the first to the last, plus identity
  experts) through the fused module before defusion and through its replacement after; a
  difference beyond the dtype's tolerance fails the module, with the measured difference and,
  when flipping one layout flag (``gate_first``, ``is_concatenated``, an orientation) makes
  the outputs match, that flag.  Where the fused class has its own gate function (the defused
  experts join their gate and up outputs back before calling it, so misnamed halves give the
  same outputs), the probe also checks that the function is affine in the half the layout
  calls ``up``, as a gate function is and not in its gate half: a layout naming gate rows
  ``up_proj`` fails the module with the reading that fits.
  Those first modules are converted before all others and installed only once every one of
  them passed, so a failed probe leaves the whole model as it was.  Modules on the ``meta``
  device (or offloaded by accelerate, whose tensors wait on ``meta``) cannot run: their class
  is checked once per process on a tiny CPU model built from the model's config, before
  anything changes, or the log says why it was skipped.

A failing module is put back as it was and ``ConversionError`` names its path, class and what
failed.  ``DEFUSER_VERIFY=0`` turns the numeric check off; ``DEFUSER_VERIFY=all`` probes every
module and every expert (for debugging: a failure after the first modules rolls back that
module only).  The check costs one probe per class, whatever the number of layers (the
README's performance section has figures).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, ParallelLayout, resolve_tensor
from defuser.engine.layout import orient
from defuser.errors import ConversionError

__all__ = [
    "ENV_VERIFY",
    "PROBE_EXPERTS",
    "VERIFY_ALL",
    "VERIFY_FIRST",
    "VERIFY_OFF",
    "Probe",
    "SelfCheck",
    "SelfCheckError",
    "check_conservation",
    "consumed_names",
    "probe_inputs",
    "probed_experts",
    "relative_tolerance",
    "verify_mode",
]

logger = logging.getLogger(__name__)

ENV_VERIFY = "DEFUSER_VERIFY"
VERIFY_OFF = "0"
VERIFY_FIRST = "1"
VERIFY_ALL = "all"
_MODES = {
    "": VERIFY_FIRST,
    "1": VERIFY_FIRST,
    "on": VERIFY_FIRST,
    "true": VERIFY_FIRST,
    "yes": VERIFY_FIRST,
    "first": VERIFY_FIRST,
    "0": VERIFY_OFF,
    "off": VERIFY_OFF,
    "false": VERIFY_OFF,
    "no": VERIFY_OFF,
    "all": VERIFY_ALL,
}

# Largest accepted difference, relative to the reference's largest magnitude.  A wrong layout
# (gate and up swapped, a lost transpose or norm) differs by a good part of the output itself;
# the per-expert path rounds each route and its sum in the model's dtype, at most one unit in
# the last place per route (4 routes: 2^-7 in bfloat16, 2^-9 in float16; measured at most 0.007
# and 0.0006 over the census), and these bounds leave a margin of about 4 over that.
_RELATIVE_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 8e-3,
    torch.bfloat16: 3e-2,
}
_DEFAULT_TOLERANCE = 3e-2  # other (8-bit) dtypes


def relative_tolerance(dtype: torch.dtype) -> float:
    """How far, relative to the largest reference magnitude, a defused output of ``dtype`` may
    differ from the fused one: the last bits of narrow dtypes depend on the kernel's order."""
    return _RELATIVE_TOLERANCE.get(dtype, _DEFAULT_TOLERANCE)


# Routes per probe token: a quarter as many tokens as experts reached, each reached once, and
# the sum of routes exercised.
_PROBE_TOP_K = 4
# Experts a default probe reaches in a module with more (``DEFUSER_VERIFY=all`` reaches every
# one; None: always every one).  A probe reads the weights of each expert it reaches twice
# (fused and defused): every expert of a 64-expert module of hidden size 1024 costs about ten
# times the zero-copy conversion of a whole 2-layer model on this project's CPU machine
# (README, Performance), eight of them spread from the first to the last cost about what the
# conversion does.  Every expert is built by the same slicing of the same tensors; what could
# differ between experts sits at the ends (identity experts, the count), which the spread
# always includes.
PROBE_EXPERTS: int | None = 8


# Layout flags a declaration can get wrong without changing a single shape, so that only the
# outputs tell: when a probe's outputs differ, each is tried flipped to name the likely culprit.
_SUSPECT_FLAGS = ("gate_first", "is_concatenated", "is_transposed", "down_transposed", "transposed")
# Largest fused module (bytes of its tensors) whose failed probe is diagnosed by flipping flags.
SUSPECT_FLAGS_MAX_BYTES = 512 << 20


class SelfCheckError(RuntimeError):
    """The replacement of a fused module lost a tensor or computes something else."""


def verify_mode() -> str:
    """The numeric self-check mode from ``DEFUSER_VERIFY``: :data:`VERIFY_FIRST` (unset, ``1``),
    :data:`VERIFY_OFF` (``0``) or :data:`VERIFY_ALL` (``all``); anything else is a ValueError."""
    raw = os.environ.get(ENV_VERIFY, "")
    mode = _MODES.get(raw.strip().lower())
    if mode is None:
        raise ValueError(f"{ENV_VERIFY} must be 0 (off), 1 (first module of each class; default) or all, got {raw!r}")
    return mode


def consumed_names(candidate: Candidate) -> list[str]:
    """The (dotted) tensor names of ``candidate``'s module that its layout consumes."""
    return [tensor.name for tensor in candidate.layout.tensors()]


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def _on_meta(module: nn.Module) -> bool:
    return any(tensor.is_meta for tensor in _named_tensors(module).values())


def _same_values(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.shape != after.shape or before.dtype != after.dtype:
        return False
    if before.is_meta or after.is_meta:  # no values to compare: the shape is all there is
        return True
    return torch.equal(before.detach().cpu(), after.detach().cpu())


@dataclass
class Probe:
    """What :meth:`SelfCheck.prepare` recorded about one fused module before its defusion."""

    kept: dict[str, torch.Tensor]
    inputs: tuple[Any, ...] | None = None
    reference: list[torch.Tensor] | None = None
    # Set when only this attribute (a dense MLP's fused gate-up Linear) is probed, not the module.
    part: str | None = None


@contextlib.contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the probe; every flag restored after."""
    flags = [(module, module.training) for root in modules for module in root.modules()]
    try:
        for module, _ in flags:
            module.training = False
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def _tensors_of(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors_of(item)]
    return []


def _run(module: nn.Module, inputs: tuple[Any, ...], part: str | None = None) -> list[torch.Tensor]:
    # ``forward`` rather than ``__call__``: hooks a user registered on the module (activation
    # capture, say) must not see the probe.
    with _evaluating(module):
        if part is not None:
            output = _run_part(module, part, inputs)
        else:
            output = _reference_forward(module)(*inputs)
        return [tensor.detach() for tensor in _tensors_of(output)]


def _reference_forward(module: nn.Module) -> Any:
    """``module.forward``; for experts transformers dispatches by ``_experts_implementation``,
    their eager per-expert loop: the exact reference, and it reads each expert's weights in
    place where grouped_mm or batched_mm gather a copy per route (megabytes per probe at
    hidden size 1024, more than in-place relayout's whole buffer)."""
    from defuser._hf import eager_experts_forward

    eager = eager_experts_forward(type(module))
    if eager is None:
        return module.forward
    return eager.__get__(module, type(module))


def _run_part(module: nn.Module, part: str, inputs: tuple[Any, ...]) -> Any:
    """The output of ``module``'s fused Linear ``part``; on a split dense MLP (which answers no
    fused name) its halves joined in the fused order."""
    target = module._modules.get(part)
    if target is not None:
        return target.forward(*inputs)
    from defuser.engine.dense import split_dense_layout

    layout = split_dense_layout(module)
    if layout is None:
        raise AttributeError(f"{type(module).__name__} has no module {part!r}")
    gate, up = module._modules["gate_proj"], module._modules["up_proj"]
    first, second = (gate, up) if layout.gate_first else (up, gate)
    return torch.cat((first.forward(*inputs), second.forward(*inputs)), dim=-1)


def _floating_tensor(module: nn.Module, names: Sequence[str]) -> torch.Tensor:
    for name in names:
        tensor = resolve_tensor(module, name)
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return tensor
    raise SelfCheckError(f"no floating-point fused tensor among {list(names)}")


def _experts_hidden_size(module: nn.Module, layout: ExpertsLayout) -> int:
    first = resolve_tensor(module, layout.first_name)
    if layout.flattened:
        first = first.view(layout.num_experts, -1, first.shape[-1])
    return int(orient(first, layout.is_transposed).shape[-1])


def probed_experts(layout: ExpertsLayout | ParallelLayout, experts: int, every_expert: bool) -> list[int]:
    """The experts a probe reaches: every one when ``every_expert`` or when there are at most
    :data:`PROBE_EXPERTS`; otherwise that many spread evenly from the first to the last routed
    expert, plus every identity expert (where a layout's mistakes would hide)."""
    identity = getattr(layout, "identity_experts", 0)
    if every_expert or PROBE_EXPERTS is None or experts <= PROBE_EXPERTS:
        return list(range(experts + identity))
    spread = {round(i * (experts - 1) / (PROBE_EXPERTS - 1)) for i in range(PROBE_EXPERTS)}
    return sorted(spread) + list(range(experts, experts + identity))


def probe_inputs(
    candidate: Candidate, device: torch.device, dtype: torch.dtype, every_expert: bool = False
) -> tuple[Any, ...]:
    """Inputs for ``candidate``'s module in the contract of its kind: a few tokens; for routed
    experts, up to four routes per token reaching each of :func:`probed_experts` once (parallel
    experts: one token each); the expert-major and weighted-all contracts reach every expert."""
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    def positive(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 0.5 + 0.5).to(device=device, dtype=dtype)

    module, layout = candidate.module, candidate.layout
    if isinstance(layout, DenseLayout):
        return (normal(1, 3, getattr(module, layout.fused_name).in_features),)
    if isinstance(layout, ParallelLayout):
        weight = module._parameters[layout.weight_name]
        width = weight.shape[-2] if layout.transposed else weight.shape[-1]
        reached = set(probed_experts(layout, weight.shape[0], every_expert))
        sizes = [1 if expert in reached else 0 for expert in range(weight.shape[0])]
        return (normal(sum(sizes), width), sizes)
    assert isinstance(layout, ExpertsLayout)
    hidden = _experts_hidden_size(module, layout)
    experts = layout.num_experts
    if layout.contract == "expert_major":
        return (normal(experts, hidden),)
    if layout.contract == "weighted_all":
        return (normal(2, hidden), positive(2, experts))
    reached = torch.tensor(probed_experts(layout, experts, every_expert))
    top_k = min(_PROBE_TOP_K, len(reached))
    tokens = math.ceil(len(reached) / top_k)
    index = reached[torch.arange(tokens * top_k) % len(reached)].view(tokens, top_k).to(device)
    return (normal(tokens, hidden), index, positive(tokens, top_k))


def _probe_dtype_device(candidate: Candidate) -> tuple[torch.dtype, torch.device]:
    layout = candidate.layout
    if isinstance(layout, DenseLayout):
        tensor = getattr(candidate.module, layout.fused_name).weight
    else:
        tensor = _floating_tensor(candidate.module, consumed_names(candidate))
    return tensor.dtype, tensor.device


def _compare(reference: list[torch.Tensor], output: list[torch.Tensor], what: str) -> str:
    """Empty when ``output`` matches ``reference`` within the dtype's tolerance, else why not."""
    if len(reference) != len(output):
        return f"{what}: the replacement returned {len(output)} tensor(s), the fused module {len(reference)}"
    for expected, got in zip(reference, output, strict=True):
        if expected.shape != got.shape:
            # Some fused forwards add a unit dimension their caller drops (DBRX: [T, 1, H]).
            if [d for d in expected.shape if d != 1] != [d for d in got.shape if d != 1]:
                return f"{what}: output shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
            got = got.reshape(expected.shape)
        if not got.is_floating_point():
            if not torch.equal(expected, got):
                return f"{what}: integer outputs differ"
            continue
        difference = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
        scale = expected.double().abs().max().item() if expected.numel() else 0.0
        tolerance = relative_tolerance(expected.dtype) * max(scale, 1e-6)
        if not difference <= tolerance:  # also catches NaN
            return (
                f"{what}: outputs differ by {difference:.3g} (max abs; largest reference magnitude {scale:.3g}, "
                f"tolerance {tolerance:.3g} for {str(expected.dtype).removeprefix('torch.')})"
            )
    return ""


def _probe_summary(candidate: Candidate, inputs: tuple[Any, ...]) -> str:
    layout = candidate.layout
    if isinstance(layout, ExpertsLayout) and layout.contract == "routed":
        routed = layout.num_experts + layout.identity_experts
        tokens, routes = inputs[1].shape
        reached = sorted(set(inputs[1].flatten().tolist()))
        which = f"all {routed} experts" if len(reached) == routed else f"experts {reached} of {routed}"
        return f"self-check ({tokens} probe tokens, {routes} routes each, reaching {which})"
    return "self-check (probe)"


def _check_key(candidate: Candidate) -> tuple[Any, ...]:
    return (type(candidate.module), candidate.plugin, candidate.kind, candidate.layout)


def _class_key(candidate: Candidate) -> tuple[Any, ...]:
    """Like :func:`_check_key`, without the sizes a tiny model changes."""
    layout = candidate.layout
    if isinstance(layout, ExpertsLayout):
        layout = dataclasses.replace(layout, num_experts=0, identity_experts=0)
    return (type(candidate.module), candidate.plugin, candidate.kind, layout)


# Classes checked on a tiny CPU model in this process: key -> ("passed" | "skipped" | "failed",
# detail); a skip is logged once, a failure raised again for every conversion meeting the class.
_CLASS_CHECKS: dict[tuple[Any, ...], tuple[str, str]] = {}
_GENERIC_PATH = re.compile(r"\.\d+(?=\.|$)")


class SelfCheck:
    """The self-checks of one ``convert_model`` call (see the module docstring)."""

    def __init__(self, model: nn.Module, manager: Any, mode: str | None = None):
        self.model = model
        self.manager = manager
        self.mode = verify_mode() if mode is None else mode
        self.checked: set[tuple[Any, ...]] = set()
        self.seconds = 0.0
        self.probes = 0

    # -- order of conversion ---------------------------------------------------------------

    def first_modules(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The first candidate of each (class, plugin, kind, layout) on a real device: converted,
        probed and held before any other.  Classes whose modules are on ``meta`` are checked
        here on a tiny CPU model instead (raises :class:`ConversionError` on a mismatch)."""
        if self.mode == VERIFY_OFF:
            return []
        first: dict[tuple[Any, ...], Candidate] = {}
        for candidate in candidates:
            key = _check_key(candidate)
            if key in first or key in self.checked:
                continue
            if _on_meta(candidate.module):
                self._check_class_on_tiny_model(candidate)
                self.checked.add(key)
                continue
            first[key] = candidate
        return list(first.values())

    # -- one module ------------------------------------------------------------------------

    def prepare(self, candidate: Candidate) -> Probe:
        """Record ``candidate``'s kept tensors and, when it is to be probed, its fused output."""
        kept = {name: tensor for name, tensor in _named_tensors(candidate.module).items()}
        for name in consumed_names(candidate):
            kept.pop(name, None)
        probe = Probe(kept)
        key = _check_key(candidate)
        wanted = self.mode == VERIFY_ALL or (self.mode == VERIFY_FIRST and key not in self.checked)
        if not wanted or _on_meta(candidate.module):
            return probe
        start = time.perf_counter()
        try:
            dtype, device = _probe_dtype_device(candidate)
            probe.inputs = probe_inputs(candidate, device, dtype, every_expert=self.mode == VERIFY_ALL)
            try:
                probe.reference = _run(candidate.module, probe.inputs)
            except Exception:
                if not isinstance(candidate.layout, DenseLayout):
                    raise
                # A dense MLP whose forward takes more than its input (Zamba2's layer index):
                # the split replaces only its fused Linear, so probe that Linear and its stand-in.
                probe.part = candidate.layout.fused_name
                probe.reference = _run(candidate.module, probe.inputs, probe.part)
        except Exception as error:  # a forward the probe cannot drive: say so, never guess
            logger.warning(
                "self-check of %s (%s) skipped: the fused module does not run on the probe (%s: %s)",
                candidate.path,
                candidate.class_name,
                type(error).__name__,
                error,
            )
            probe.inputs = probe.reference = None
            self.checked.add(key)
        finally:
            self.seconds += time.perf_counter() - start
        floating = [tensor for tensor in probe.reference or () if tensor.is_floating_point()]
        if probe.reference is not None and not all(torch.isfinite(tensor).all() for tensor in floating):
            logger.warning(
                "self-check of %s (%s) skipped: the fused module's output on the probe is not finite "
                "(uninitialised weights?)",
                candidate.path,
                candidate.class_name,
            )
            probe.inputs = probe.reference = None
        return probe

    def verify(self, candidate: Candidate, probe: Probe, replacement: nn.Module) -> None:
        """Raise :class:`SelfCheckError` when ``replacement`` lost a kept tensor or, when probed,
        computes something else than the fused module did."""
        check_conservation(probe.kept, replacement)
        if probe.reference is None or probe.inputs is None:
            return
        start = time.perf_counter()
        try:
            try:
                output = _run(replacement, probe.inputs, probe.part)
            except Exception as error:
                raise SelfCheckError(
                    f"self-check: the replacement ({type(replacement).__name__}) fails on the probe the fused module "
                    f"ran: {type(error).__name__}: {error}"
                ) from error
            failure = _compare(probe.reference, output, _probe_summary(candidate, probe.inputs))
        finally:
            self.seconds += time.perf_counter() - start
        self.probes += 1
        if failure:
            raise SelfCheckError(failure)
        misread = _misread_gate_halves(candidate, replacement)
        if misread:
            raise SelfCheckError(misread)
        self.checked.add(_check_key(candidate))

    def suspect_flags(self, candidate: Candidate, probe: Probe) -> str:
        """After ``candidate`` failed its probe (and its module is fused again), the layout
        flags which, flipped one at a time, give the fused module's outputs: a hint naming the
        likely mistake in the declaration (empty when none does).  Defusions made here are
        thrown away; a failure of any of them only means that flip is not the answer.  A module
        larger than :data:`SUSPECT_FLAGS_MAX_BYTES` gets no hint: a flip of a layout that copies
        costs a copy of the module, too much to risk on an error path."""
        if probe.reference is None or probe.inputs is None:
            return ""
        size = sum(t.numel() * t.element_size() for t in _named_tensors(candidate.module).values())
        if size > SUSPECT_FLAGS_MAX_BYTES:
            return ""
        layout = candidate.layout
        matches = []
        for name in _SUSPECT_FLAGS:
            value = getattr(layout, name, None)
            if name == "down_transposed" and value is None and isinstance(layout, ExpertsLayout):
                value = layout.transposed_down
            if not isinstance(value, bool):
                continue
            try:
                flipped = dataclasses.replace(candidate, layout=dataclasses.replace(layout, **{name: not value}))
                replacement = self.manager.defuse(flipped)
                output = _run(replacement, probe.inputs, probe.part)
            except Exception:  # a flip that does not fit the tensors is not the answer
                continue
            if _compare(probe.reference, output, ""):
                continue
            # Equal outputs are not enough where the halves are joined back before the gate.
            readings = _up_readings(flipped, replacement)
            if readings is None or readings[_declared_reading(flipped.layout)]:
                matches.append(f"{name}={not value}")
        if not matches:
            return ""
        return (
            f"; the outputs match with {' or '.join(matches)} instead: the {candidate.plugin} layout of "
            f"{candidate.class_name} probably declares it wrong"
        )

    def report(self) -> None:
        """Log what the numeric check did in this conversion and what it cost."""
        if self.mode == VERIFY_OFF:
            logger.debug("self-check off (%s=0)", ENV_VERIFY)
            return
        # The figures travel on the record too (``defuser_selfcheck``): the benchmark reads them.
        figures = {"probes": self.probes, "seconds": self.seconds}
        logger.debug(
            "self-check: %d probe(s) in %.1f ms", self.probes, self.seconds * 1e3, extra={"defuser_selfcheck": figures}
        )

    # -- meta device -----------------------------------------------------------------------

    def _check_class_on_tiny_model(self, candidate: Candidate) -> None:
        key = _class_key(candidate)
        if key not in _CLASS_CHECKS:
            start = time.perf_counter()
            try:
                _CLASS_CHECKS[key] = self._tiny_model_check(candidate)
            finally:
                self.seconds += time.perf_counter() - start
            outcome, detail = _CLASS_CHECKS[key]
            if outcome == "skipped":
                logger.warning(
                    "self-check of %s (%s) skipped: its tensors are on the meta device and %s",
                    candidate.class_name,
                    candidate.plugin,
                    detail,
                )
        outcome, detail = _CLASS_CHECKS[key]
        if outcome == "failed":
            raise ConversionError(
                f"cannot defuse {candidate.path} ({candidate.class_name}): its tensors are on the meta device, and "
                f"the {candidate.plugin} defusion of {candidate.class_name} failed its self-check on a tiny CPU model "
                f"built from the model's config: {detail}; the model was left as it was"
            )

    def _tiny_model_check(self, candidate: Candidate) -> tuple[str, str]:
        """("passed" | "skipped" | "failed", detail) for ``candidate``'s class on a tiny CPU model."""
        from defuser.tiny import tiny_model_like

        config = getattr(self.model, "config", None)
        if config is None:
            return "skipped", "the model has no config to build a tiny CPU model from"
        try:
            tiny = tiny_model_like(config)
        except Exception as error:  # a config the tiny builder cannot shrink or instantiate
            return "skipped", f"no tiny CPU model could be built from its config ({type(error).__name__}: {error})"
        twin = _twin_candidate(tiny, candidate, self.manager)
        if twin is None:
            return "skipped", f"the tiny CPU model built from its config has no {candidate.class_name} to check"
        check = SelfCheck(tiny, self.manager, VERIFY_ALL)
        probe = check.prepare(twin)
        if probe.reference is None:
            return "skipped", f"the tiny CPU model's {candidate.class_name} does not run on the probe"
        try:
            check.verify(twin, probe, self.manager.defuse(twin))
        except Exception as error:
            hint = check.suspect_flags(twin, probe) if isinstance(error, SelfCheckError) else ""
            return "failed", f"{type(error).__name__}: {error}{hint}"
        return "passed", ""


_READING_FLAGS = ("is_concatenated", "gate_first")


def _up_readings(candidate: Candidate, replacement: nn.Module) -> dict[tuple[bool, bool], bool] | None:
    """For each way to read the gate-up halves (``(is_concatenated, gate_first)``): whether the
    fused class's own gate function is affine in the half read as ``up`` (an activation of the
    gate times the up, plus one or not, is; the gate goes through a nonlinearity).  None where
    the test does not apply (no own gate function) or says nothing (no reading is affine)."""
    from defuser.engine.experts import GateActivation
    from defuser.engine.layout import join_gate_up

    layout = candidate.layout
    if not isinstance(layout, ExpertsLayout) or layout.gate_style != "module":
        return None
    if not layout.has_gate or layout.separate_gate_up:  # gate and up from tensors of their own
        return None
    activation: GateActivation | None = None
    gate_proj: nn.Module | None = None
    for name, module in replacement.named_modules():  # one walk; the first expert has both
        if activation is None and isinstance(module, GateActivation) and module._gate_fn is not None:
            activation = module
        elif gate_proj is None and name.endswith("gate_proj"):
            gate_proj = module
        if activation is not None and gate_proj is not None:
            break
    if activation is None or not isinstance(gate_proj, nn.Linear):
        return None
    generator = torch.Generator().manual_seed(0)
    # Gates of both signs and well past the activations' near-linear middle; three small ups in
    # a line (small: gpt-oss clamps its up half at 7).
    # In float32 on the experts' device (a gate function may read the module's own tensors).
    width, device = gate_proj.out_features, gate_proj.weight.device
    gate = (torch.randn(4, width, generator=generator) * 3).to(device)
    first, last = ((torch.randn(4, width, generator=generator) * 0.5).to(device) for _ in range(2))
    middle = (first + last) / 2

    def affine_in_up(concatenated: bool, gate_first: bool) -> bool:
        reading = dataclasses.replace(layout, is_concatenated=concatenated, gate_first=gate_first)
        try:
            with torch.no_grad():
                at_first, at_last, at_middle = (
                    activation._gate_fn(activation._owner, join_gate_up(gate, up, reading)).double()
                    for up in (first, last, middle)
                )
        except Exception:  # a reading the gate function cannot take says nothing
            return False
        error = (at_first + at_last - 2 * at_middle).abs().max().item()
        scale = max(at_first.abs().max().item(), at_last.abs().max().item(), 1e-12)
        return error <= 1e-4 * scale

    readings = {(c, g): affine_in_up(c, g) for c in (True, False) for g in (True, False)}
    return readings if any(readings.values()) else None


def _declared_reading(layout: Any) -> tuple[bool, bool]:
    return (layout.is_concatenated, layout.gate_first)


def _misread_gate_halves(candidate: Candidate, replacement: nn.Module) -> str:
    """Why the gate and up halves the replacement's experts hold are misnamed, or empty.

    Where the fused class has its own gate function, the defused experts join their gate and up
    outputs back in the declared order before calling it, so a wrong ``is_concatenated`` or
    ``gate_first`` computes the same outputs while ``gate_proj`` holds up rows (or a mix): the
    probe cannot see it.  A gate function is affine in its up half and not in its gate half
    (SiLU, GELU, sigmoid, gpt-oss's clamped GLU); when the halves read the declared way are not,
    and read exactly one other way they are, the declaration is what is wrong."""
    readings = _up_readings(candidate, replacement)
    if readings is None:
        return ""
    declared = _declared_reading(candidate.layout)
    if readings[declared]:
        return ""
    fitting = [reading for reading, affine in readings.items() if affine]
    if len(fitting) != 1:
        return ""
    pairs = zip(_READING_FLAGS, fitting[0], declared, strict=True)
    changes = [f"{name}={value}" for name, value, was in pairs if value != was]
    return (
        f"self-check: the {candidate.plugin} layout of {candidate.class_name} names the wrong rows gate_proj and "
        f"up_proj: its own gate function is affine in the up half only when the halves are read with "
        f"{' and '.join(changes)} (the outputs agree either way, because the halves are joined back before it)"
    )


def _twin_candidate(tiny: nn.Module, candidate: Candidate, manager: Any) -> Candidate | None:
    """The candidate of ``tiny`` standing where ``candidate`` stands (layer numbers aside), or
    the first one of the same class, detected the same way."""
    from defuser.engine.detect import iter_typed_modules

    wanted = _GENERIC_PATH.sub(".N", candidate.path)
    found: list[tuple[bool, str, nn.Module, str | None]] = []
    for path, module, model_type in iter_typed_modules(tiny):
        if type(module) is type(candidate.module):
            found.append((_GENERIC_PATH.sub(".N", path) != wanted, path, module, model_type))
    for _, path, module, model_type in sorted(found, key=lambda entry: entry[0]):
        twin = manager.detect(module, path, model_type)
        if twin is not None and not twin.refusal and twin.kind == candidate.kind and twin.plugin == candidate.plugin:
            return twin
    return None


def check_conservation(kept: dict[str, torch.Tensor], replacement: nn.Module) -> None:
    """Raise :class:`SelfCheckError` naming the first of ``kept`` (name -> tensor of the fused
    module) that ``replacement`` does not hold under the same name, as the same object or with
    equal values."""
    # Each kept name looked up where it must be (not every tensor of the replacement listed):
    # the cost follows the fused module's few kept tensors, not the replacement's experts.
    for name, tensor in kept.items():
        carried = resolve_tensor(replacement, name)
        if carried is None:
            raise SelfCheckError(
                f"self-check: {name} (shape {tuple(tensor.shape)}) of the fused module is not in its replacement "
                f"({type(replacement).__name__}); the layout does not consume it, so it would be lost"
            )
        if carried is not tensor and not _same_values(tensor, carried):
            raise SelfCheckError(
                f"self-check: {name} of the replacement ({type(replacement).__name__}) differs from the fused module's"
            )
