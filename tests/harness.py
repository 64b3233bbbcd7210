"""The shared test harness of the kernel-backed loss families, driven by a small spec per family.

A family's test module describes its loss with a `KernelSpec` (how to make inputs, how to call
the public function, its option grid and launch budget) and assigns the generic tests below to
module-level names, e.g. `test_matches_reference = harness.matches_reference(SPEC)`. Each generic
test runs on every kernel backend available here (`kernel_backend`) or on every backend
(`any_backend`), against the float64 reference on the same (rounded) inputs, and can fail:

- matches_reference: every option x reduction x shape in fp32, loss and every gradient (a learnable
  scalar's against the sum of its terms' magnitudes, where the sample gives its terms: Sample.terms)
- matches_reference_half: bf16/fp16 at the output rounding's tolerance
- launches: one eager 'mean' fwd+bwd runs the kernel once, few other launches, nothing that
  reads a device value back to the host
- opcheck: schema, fakes and autograd registration of the family's kernel and builder ops
- compile_fullgraph: torch.compile(fullgraph=True) gives the eager loss and gradients
- retained_graph: a returned gradient never changes; every backward through a retained graph
  is right, after a grad_output of 0 too
- double_backward: differentiating the kernels' gradient again (backward, autograd.grad with or
  without allow_unused, torch.func) raises, naming backend='reference'; the reference is right
- gradient_gaps: tensors the kernels do not differentiate, when they require grad, get the
  reference's gradient under auto and a clear error from an explicit kernel backend
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch

import lossforge_kernels as lf
from lossforge_kernels.ops._library import SCALE_GRAD
from tests.conftest import HOST_SYNC_OPS, LaunchLog, assert_close_rel, device_for

REDUCTIONS = ("none", "mean", "sum")


@dataclasses.dataclass
class Sample:
    """One call's inputs: `tensors` by argument name, the ones `grads` names get requires_grad."""
    tensors: dict
    grads: tuple[str, ...]
    call: Callable  # (tensors, backend, reduction) -> loss
    # (float64 tensors, reduction) -> (reference loss, {name: leaf}): each learnable scalar broadcast to
    # one leaf per term it multiplies. Such a scalar's gradient is a sum of many terms that may cancel,
    # so its error is judged against the sum of the terms' magnitudes, not against the sum itself.
    terms: Callable | None = None


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    family: str                    # the file stem: lossforge_kernels/ops/<family>.py
    make: Callable                 # (shape, opts, dtype, device, generator) -> Sample
    cases: tuple                   # option dicts (the loss's options, plus test-only keys `make` reads)
    shapes: tuple                  # shapes for the fp32 grid
    tol: Callable = lambda opts, shape: 1e-5  # the fp32 grid's relative tolerance
    half_cases: tuple = ()         # options for the bf16/fp16 check
    half_shape: tuple = ()
    half_tol: Callable = lambda dtype: 4 * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    fwd_kernel: Any = None         # the KernelOp one forward runs once
    fwd_budget: int = 6            # launches in one eager 'mean' forward, kernel included
    fwd_exact: tuple | None = None  # or exactly these ops (aten names, or KernelOps)
    bwd_budget: int = 2            # launches in its backward (autograd's ones_like and the rescale)
    bwd_rescales: int = 1          # scale_grad launches in that backward: one per gradient
    launch_shape: tuple = ()
    compile_cases: tuple = ({},)   # options for the torch.compile check
    op_inputs: Callable | None = None  # device -> (kernel-contract tensors, params) for the builder ops
    kernel_op_samples: Callable | None = None  # device -> [(KernelOp, args)] for opcheck of the kernel ops
    gaps: tuple = ()               # tensors the kernels do not differentiate (may require grad)
    kernels: Any = None            # the builder's KernelLoss in ops/<family>.py (spec and compiled ops)


def _seeded(seed):
    return torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)


def reference_copy(tensors):
    """float64 copies of the float tensors (the same rounded values), the rest as is, all detached."""
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in tensors.items()}


def run_both(spec, backend, opts, shape, reduction, dtype=torch.float32, seed=None, grads=None, device=None):
    """(loss, reference loss, {name: grad}, {name: reference grad}) with the same random grad_output.
    Without a seed one is drawn; assert_matches names it, so that a mismatch can be replayed."""
    device = device or device_for(backend)
    if seed is None:
        seed = torch.seed() % 2**31
    sample = spec.make(shape, dict(opts), dtype, device, _seeded(seed))
    names = sample.grads if grads is None else grads
    ours = {k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v)
            for k, v in sample.tensors.items()}
    ref = reference_copy(sample.tensors)
    for k in names:
        ref[k].requires_grad_(True)
    loss = sample.call(ours, backend, reduction)
    want = sample.call(ref, "reference", reduction)
    g = (torch.rand(want.shape, generator=_seeded(seed), dtype=torch.float64) + 0.5).to(device)
    got_grads = torch.autograd.grad(loss, [ours[k] for k in names], g.to(loss.dtype), allow_unused=True)
    want_grads = torch.autograd.grad(want, [ref[k] for k in names], g, allow_unused=True)
    return RunResult(loss, want, dict(zip(names, got_grads)), dict(zip(names, want_grads)), seed,
                     _term_magnitudes(sample, names, reduction, g))


def _term_magnitudes(sample, names, reduction, g):
    """{scalar name: sum of |its gradient's terms|} in float64, for the scalars sample.terms expands."""
    if sample.terms is None:
        return {}
    loss, leaves = sample.terms(reference_copy(sample.tensors), reduction)
    leaves = {k: v for k, v in leaves.items() if k in names}
    if not leaves:
        return {}
    parts = torch.autograd.grad(loss, list(leaves.values()), g.to(loss.device))
    return {k: p.abs().sum() for k, p in zip(leaves, parts)}


class RunResult(tuple):
    """run_both's (loss, want, grads, want_grads), unpacked as before, with the seed that made them."""

    def __new__(cls, loss, want, grads, want_grads, seed, magnitudes=None):
        out = super().__new__(cls, (loss, want, grads, want_grads))
        out.seed = seed
        out.magnitudes = magnitudes or {}  # {scalar name: sum of |its terms|}, see Sample.terms
        return out


def assert_matches(result, tol, what=""):
    what = f"{what} (seed {result.seed})" if hasattr(result, "seed") else what
    loss, want, grads, want_grads = result
    assert loss.shape == want.shape, (what, loss.shape, want.shape)
    assert_close_rel(loss, want, tol, f"{what} loss")
    magnitudes = getattr(result, "magnitudes", {})
    for name, g in grads.items():
        assert g is not None, f"{what}: no gradient for {name}"
        if name in magnitudes:
            size = magnitudes[name].item()  # (0 when every term is: then the error itself)
            err = (g.double().cpu() - want_grads[name].cpu()).abs().item() / (size if size > 0 else 1.0)
            assert err <= tol, f"{what} grad of {name}: error {err:.3e} of the sum of its terms' magnitudes > {tol:.1e}"
        else:
            assert_close_rel(g, want_grads[name], tol, f"{what} grad of {name}")


def matches_reference(spec: KernelSpec):
    @pytest.mark.parametrize("opts", spec.cases, ids=[_id(c) for c in spec.cases])
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test(kernel_backend, opts, reduction):
        for shape in spec.shapes:
            result = run_both(spec, kernel_backend, opts, shape, reduction)
            assert result[0].dtype == torch.float32
            assert_matches(result, spec.tol(opts, shape), f"{spec.family} {shape} {reduction}")
    return test


def matches_reference_half(spec: KernelSpec):
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("opts", spec.half_cases, ids=[_id(c) for c in spec.half_cases])
    def test(kernel_backend, dtype, opts):
        # The reference sees the same rounded inputs, so what is left is output rounding: the
        # loss once, a fused gradient twice (stored in the forward, rescaled in the backward).
        for reduction in REDUCTIONS:
            result = run_both(spec, kernel_backend, opts, spec.half_shape, reduction, dtype=dtype)
            assert result[0].dtype == dtype and all(g.dtype == dtype for g in result[2].values())
            assert_matches(result, spec.half_tol(dtype), f"{dtype} {reduction}")
    return test


def launches(spec: KernelSpec):
    def test(kernel_backend, monkeypatch):
        # Eager value checks off, as on a GPU: no op reads a value back to the host, and only a
        # few small launches surround the kernel.
        monkeypatch.setattr("lossforge_kernels._checks.eager_value_checks", lambda t: False)
        device = device_for(kernel_backend)
        sample = spec.make(spec.launch_shape, {}, torch.bfloat16, device, _seeded(0))
        for k in sample.grads:
            sample.tensors[k].requires_grad_(True)
        with LaunchLog() as fwd:
            loss = sample.call(sample.tensors, kernel_backend, "mean")
        with LaunchLog() as bwd:
            loss.backward()
        assert not HOST_SYNC_OPS & set(fwd.ops + bwd.ops), (fwd.ops, bwd.ops)
        assert fwd.ops.count(launch_name(spec.fwd_kernel, kernel_backend)) == 1, fwd.ops
        assert len(fwd.ops) <= spec.fwd_budget, fwd.ops
        if spec.fwd_exact is not None:
            want = [op if isinstance(op, str) else launch_name(op, kernel_backend) for op in spec.fwd_exact]
            assert fwd.ops == want, fwd.ops
        assert bwd.ops.count(launch_name(SCALE_GRAD, kernel_backend)) == spec.bwd_rescales, bwd.ops
        assert len(bwd.ops) <= spec.bwd_budget, bwd.ops
    return test


def opcheck(spec: KernelSpec):
    def test(kernel_backend):
        """Schema, fake tensor and functionalization of the ops (not the maths: see the grids)."""
        device = device_for(kernel_backend)
        for op, args in spec.kernel_op_samples(device):
            if kernel_backend in op.overloads:  # an op of a path that only some backends take
                torch.library.opcheck(op.overloads[kernel_backend], args)
        tensors, params = spec.op_inputs(device)
        n_diff = len(spec_ops(spec).differentiable)
        graded = [t.clone().requires_grad_(True) if i == 0 else t for i, t in enumerate(tensors)]
        fused = _builder_op(spec, "fused", kernel_backend)
        for mean in (True, False):
            torch.library.opcheck(fused, (*graded, *params, mean, [True] * n_diff))
        rows = _builder_op(spec, "rows", kernel_backend)
        torch.library.opcheck(rows, (*graded, *params))
        out = rows(*tensors, *params)
        rows_out, saved = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        grad_rows = torch.rand(rows_out.shape, device=device)
        torch.library.opcheck(_builder_op(spec, "rows_grad", kernel_backend),
                              (grad_rows, *tensors, *saved, *params, [True] * n_diff))
    return test


def compile_fullgraph(spec: KernelSpec):
    @pytest.mark.parametrize("opts", spec.compile_cases, ids=[_id(c) for c in spec.compile_cases])
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test(any_backend, reduction, opts):
        device = device_for(any_backend)
        torch._dynamo.reset()  # each case compiles the same code object: stay clear of the recompile limit
        sample = spec.make(spec.launch_shape, dict(opts), torch.float32, device, _seeded(1))
        backend = "aot_eager" if device == "cpu" else "inductor"

        def step(tensors):
            return sample.call(tensors, any_backend, reduction) * 2.0

        results = []
        for fn in (torch.compile(step, fullgraph=True, backend=backend), step):
            # A non-leaf input (inplace_backward may write over it), a fresh copy for each side.
            tensors = {k: (v.detach().clone().requires_grad_(True) if k in sample.grads else v)
                       for k, v in sample.tensors.items()}
            inputs = {k: (v * 1.0 if k in sample.grads else v) for k, v in tensors.items()}
            loss = fn(inputs)
            go = (torch.rand(loss.shape, generator=_seeded(2)) + 0.5).to(device)
            grads = torch.autograd.grad(loss, [tensors[k] for k in sample.grads], go)
            results.append((loss, grads))
        (loss, grads), (want, want_grads) = results
        torch.testing.assert_close(loss, want)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w)
    return test


def retained_graph(spec: KernelSpec):
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test(any_backend, reduction):
        # Every backward through a retained graph is right, and a gradient once returned is never
        # changed by a later one: not after a grad_output of 0, nor when .grad accumulates.
        device = device_for(any_backend)
        sample = spec.make(spec.launch_shape, {}, torch.float32, device, _seeded(3))
        name = sample.grads[0]
        x = sample.tensors[name].detach().clone().requires_grad_(True)
        tensors = dict(sample.tensors, **{name: x})
        loss = sample.call(tensors, any_backend, reduction)
        ones = torch.ones_like(loss)
        (g1,) = torch.autograd.grad(loss, x, ones, retain_graph=True)
        kept = g1.clone()
        (g0,) = torch.autograd.grad(loss, x, 0 * ones, retain_graph=True)
        (g3,) = torch.autograd.grad(loss, x, 3 * ones, retain_graph=True)
        assert torch.equal(g1, kept), "a returned gradient changed after a later backward"
        assert torch.equal(g0, torch.zeros_like(g0))
        torch.testing.assert_close(g3, 3 * kept)
        loss.backward(2 * ones, retain_graph=True)
        loss.backward(0.5 * ones)  # the last one frees the graph
        torch.testing.assert_close(x.grad, 2.5 * kept)
        torch.testing.assert_close(g3, 3 * kept)
    return test


def double_backward(spec: KernelSpec):
    def test(any_backend):
        # A gradient penalty needs the gradient's own derivative: right on the reference, an error
        # (never a silent zero or a missing term) on the kernel backends, whose gradient is not
        # differentiable again, however the second derivative is asked for.
        device = device_for(any_backend)
        sample = spec.make(spec.launch_shape, {}, torch.float32, device, _seeded(4))
        name = sample.grads[0]
        leaf = sample.tensors[name].detach().clone().requires_grad_(True)
        x = leaf * 1.0  # a non-leaf input: the second derivative must reach the leaf behind it too

        def loss_of(x):
            return sample.call(dict(sample.tensors, **{name: x}), any_backend, "mean")

        (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
        penalty = g.square().sum() + 1e-3 * x.square().sum()  # the L2 term alone gives autograd a path to x
        l2_only = 2e-3 * x.detach()
        if any_backend == "reference":
            (h,) = torch.autograd.grad(penalty, x, retain_graph=True)
            (second,) = torch.autograd.grad(g.square().sum(), x, retain_graph=True)
            assert second.abs().sum() > 0, "the penalty's second-order term is missing"
            torch.testing.assert_close(h, second + l2_only)
            (h_leaf,) = torch.autograd.grad(penalty, leaf, retain_graph=True)
            torch.testing.assert_close(h_leaf, h)
            return
        refused = "not differentiable again.*backend='reference'"
        for ask in (lambda: torch.autograd.grad(penalty, x, retain_graph=True),
                    lambda: torch.autograd.grad(penalty, x, retain_graph=True, allow_unused=True),
                    lambda: torch.autograd.grad(penalty, leaf, retain_graph=True),
                    lambda: torch.autograd.grad(g.sum(), x, retain_graph=True),
                    lambda: penalty.backward(retain_graph=True)):
            with pytest.raises(RuntimeError, match=refused):
                ask()
        # torch.func runs custom autograd through its own transforms: the kernels refuse them by name.
        with pytest.raises(RuntimeError, match="torch.func.*backend='reference'"):
            torch.func.grad(loss_of)(x.detach())
    return test


def gradient_gaps(spec: KernelSpec, tol=1e-5):
    @pytest.mark.parametrize("gap", spec.gaps, ids=[f"{name}-{_id(opts)}" for name, opts in spec.gaps])
    def test(kernel_backend, gap, monkeypatch):
        # A tensor the kernels do not differentiate requires grad: an explicit kernel backend says
        # what it cannot compute and what to use instead; auto (here: a preference for this
        # backend) never refuses what the reference can do and takes it, every gradient included.
        name, opts = gap[0], dict(gap[1])
        only = opts.pop("only", False)
        device = device_for(kernel_backend)
        names = (name,) if only else tuple(spec.make(spec.launch_shape, dict(opts), torch.float32, "cpu",
                                                     _seeded(0)).grads) + (name,)
        with pytest.raises(lf.BackendUnavailableError, match=f"{name} requires grad.*backend='reference'"):
            run_both(spec, kernel_backend, opts, spec.launch_shape, "mean", grads=names)
        monkeypatch.setenv("LOSSFORGE_BACKEND", kernel_backend)
        result = run_both(spec, "auto", opts, spec.launch_shape, "mean", grads=names, device=device)
        assert_matches(result, tol, f"auto with {name} requiring grad")
    return test


def spec_ops(spec: KernelSpec):
    return spec.kernels.spec


def launch_name(op, backend) -> str:
    """The name a LaunchLog records for a KernelOp's launch on `backend`."""
    return op.overloads[backend]._schema.name.split("::")[1]


def _builder_op(spec, kind, backend):
    return getattr(spec.kernels.compiled, kind).overloads[backend]


def _id(opts):
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "plain"
