"""The pieces every loss family shares: the op builder, the scale_grad op, the registry's file stems."""
import importlib
import pathlib

import pytest
import torch

import lossforge_kernels as lf
from lossforge_kernels import _backends
from lossforge_kernels.ops import builder
from lossforge_kernels.ops._library import SCALE_GRAD
from tests.conftest import device_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lossforge_kernels"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_contract(kernel_backend, dtype):
    # grad *= grad_output in fp32 arithmetic, in place; a factor of 1 leaves grad bit for bit and a
    # NaN one propagates. A dense tensor of several blocks, a strided (M, C) view (rows walked by a
    # grid of fewer programs than pieces), a transposed (dense) one and a layout that is neither.
    device = device_for(kernel_backend)
    op = SCALE_GRAD[kernel_backend]
    base = torch.randn(6, 9001, device=device).to(dtype)
    views = (lambda b: b.clone(), lambda b: b.clone()[:, 1:8000], lambda b: b.clone().t(),
             lambda b: b.clone()[::2, ::3])
    for make in views:
        g = make(base)
        want = g.float().clone()
        op(g, torch.tensor(2.0, device=device))
        torch.testing.assert_close(g.float(), (want * 2.0).to(dtype).float())
        before = g.clone()
        op(g, torch.tensor(1.0, device=device, dtype=torch.bfloat16))
        assert torch.equal(g, before)
        op(g, torch.tensor(1.5, device=device, dtype=torch.float64))
        tol = dict(rtol=2**-7, atol=0) if dtype == torch.bfloat16 else {}  # one rounding of the product
        torch.testing.assert_close(g.float(), before.float() * 1.5, **tol)
        op(g, torch.tensor(float("nan"), device=device))
        assert torch.isnan(g).all()


def test_scale_grad_rejects_what_it_cannot_scale(kernel_backend):
    device = device_for(kernel_backend)
    op = SCALE_GRAD[kernel_backend]
    with pytest.raises(ValueError, match="grad_output must be a single floating-point value"):
        op(torch.randn(3, 4, device=device), torch.ones(2, device=device))
    with pytest.raises(TypeError, match="grad must be float32, float16 or bfloat16"):
        op(torch.randn(3, 4, device=device, dtype=torch.float64), torch.ones((), device=device))
    overlapping = torch.randn(20, device=device).as_strided((4, 10), (2, 1))  # rows share elements
    with pytest.raises(ValueError, match="the rows of grad overlap"):
        op(overlapping, torch.tensor(2.0, device=device))


def test_gradient_gap_names_the_first_tensor_that_needs_a_gradient():
    a, b = torch.randn(2), torch.randn(2, requires_grad=True)
    assert builder.gradient_gap(a=a, b=b, c=None) == "b requires grad"
    assert builder.gradient_gap(a=a, c=None) is None
    with torch.no_grad():
        assert builder.gradient_gap(b=b) is None


def test_kernel_loss_refuses_a_gradient_its_kernels_do_not_compute():
    # The public layers route such calls to the reference; reaching the kernels anyway is a bug, not None.
    from lossforge_kernels.ops.cross_entropy import cross_entropy_kernels

    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    w = torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight requires grad, which the kernels do not compute"):
        cross_entropy_kernels((x, t, w, None, None), dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                                                          softcap=0.0, focal_gamma=0.0, focal_alpha=1.0),
                              reduction="mean", backend="triton")


def test_every_family_has_one_file_stem_everywhere():
    families = _backends.families()
    assert set(families) >= {"cross_entropy", "linear_cross_entropy", "sigmoid_focal", "contrastive", "triplet"}
    for stem, kernels in families.items():
        for path in (PACKAGE / "reference" / f"{stem}.py", PACKAGE / "losses" / f"{stem}.py",
                     ROOT / "tests" / f"test_{stem}.py"):
            assert path.exists(), f"family {stem}: {path.relative_to(ROOT)} is missing"
        assert importlib.import_module(f"lossforge_kernels.losses.{stem}").FAMILY == stem
    # A family with kernel ops of its own has them under its stem in every folder. Its specs carry
    # the stem as their name, or (contrastive: one pair of kernel ops, three losses) each loss's name.
    spec_names = []
    for ops_file in (PACKAGE / "ops").glob("[!_]*.py"):
        stem = ops_file.stem
        if stem == "builder":
            continue
        assert stem in families, f"ops/{stem}.py is not a registered family"
        module = importlib.import_module(f"lossforge_kernels.ops.{stem}")
        specs = [v for v in vars(module).values() if isinstance(v, builder.FusedLoss)]
        assert specs, f"ops/{stem}.py has no FusedLoss spec"
        assert len(specs) > 1 or specs[0].name == stem, (stem, [s.name for s in specs])
        spec_names += [s.name for s in specs]
        expected = [ROOT / "bench" / f"{stem}.py", ROOT / "tests" / f"test_{stem}.py"]
        if _kernel_ops_of(stem):  # kernels of its own (linear_cross_entropy runs the cross-entropy ones)
            if "triton" in families[stem].backends:
                expected.append(ROOT / "triton_kernels" / f"{stem}.py")
            if "cuda" in families[stem].backends:
                expected.append(ROOT / "csrc" / f"{stem}.cu")
        for path in expected:
            assert path.exists(), f"family {stem}: {path.relative_to(ROOT)} is missing"
    assert len(set(spec_names)) == len(spec_names), spec_names  # the builder ops' names are unique


def _kernel_ops_of(stem):
    """The kernel ops a family defines itself: lossforge::<stem>_<name>_triton beyond the builder's."""
    names = (n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lossforge::"))
    builder_kinds = {f"{stem}_{kind}_triton" for kind in ("fused", "rows", "rows_grad")}
    return [n for n in names if n.startswith(f"{stem}_") and n.endswith("_triton") and n not in builder_kinds]


def test_builder_defines_every_compiled_op_for_every_backend():
    assert sorted(_kernel_ops_of("cross_entropy")) == ["cross_entropy_bwd_triton", "cross_entropy_fwd_triton"]
    assert _kernel_ops_of("linear_cross_entropy") == []
    for stem in ("cross_entropy", "linear_cross_entropy", "sigmoid_focal"):
        for kind in ("fused", "rows", "rows_grad"):
            for backend in _backends.KERNEL_BACKENDS:
                assert hasattr(torch.ops.lossforge, f"{stem}_{kind}_{backend}"), (stem, kind, backend)


def test_backends_report_for_a_family_whose_kernels_lack_a_gradient():
    x = torch.randn(3, 4)
    with pytest.raises(lf.BackendUnavailableError,
                       match="the cross_entropy kernels compute gradients for the input .logits. only, but weight"):
        _backends.resolve_backend("triton", "cross_entropy", x, gap="weight requires grad")
    assert _backends.resolve_backend("auto", "cross_entropy", x, gap="weight requires grad") == "reference"


def test_options_go_by_name():
    # The builder takes a family's options by their schema names and hands the spec a named tuple:
    # a missing or unknown name is refused before anything runs.
    from lossforge_kernels.ops.cross_entropy import SPEC, cross_entropy_kernels

    assert SPEC.Params._fields == ("ignore_index", "label_smoothing", "z_loss", "softcap", "focal_gamma",
                                   "focal_alpha")
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    for options in (dict(ignore_index=-100), dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
                                                  focal_gamma=0.0, focal_alpha=1.0, eps=0.1)):
        with pytest.raises(TypeError, match="the kernels take the options"):
            cross_entropy_kernels((x, t, None, None, None), options, reduction="mean", backend="triton")


def test_a_new_specs_options_can_be_named_first_inside_torch_compile():
    # A spec's named tuple exists once the spec does: naming options for the first time inside a
    # compiled region (the first call of a compiled model) traces no lazy cache.
    spec = builder.FusedLoss(name="toy", tensors=("input",), params=("float alpha", "bool beta"),
                             differentiable=("input",), n_saved=0, forward=None, backward=None,
                             mean_divisor=None)

    @torch.compile(fullgraph=True, backend="eager")
    def scaled(x):
        params = spec.named(dict(alpha=2.0, beta=True))
        return x * params.alpha if params.beta else x

    assert torch.equal(scaled(torch.ones(3)), torch.full((3,), 2.0))


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_compiled_losses_keep_a_dynamic_batch(kernel_backend, loss, reduction):
    # The compiled ops' fakes keep a dynamic row count symbolic (a fake that walked the chunks would
    # fix it): three batch sizes, one graph, each matching the eager reference.
    device = device_for(kernel_backend)
    w = torch.randn(23, 8, device=device)
    if loss == "cross_entropy":
        def call(x, t, backend):
            return lf.cross_entropy(x @ w.T, t, label_smoothing=0.1, reduction=reduction, backend=backend)
    else:
        def call(x, t, backend):
            return lf.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=4, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    for n in (9, 13, 17):
        x = torch.randn(n, 8, device=device, requires_grad=True)
        t = torch.randint(0, 23, (n,), device=device)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(t, 0)
        got = compiled(x, t, kernel_backend)
        (grad,) = torch.autograd.grad(got.sum(), x)
        want = call(x, t, "reference")
        (want_grad,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


DYNAMIC_CALLS = {
    "cross_entropy": lambda x, backend: lf.cross_entropy(x, (x.detach().argmax(1) + 1) % x.shape[1],
                                                         label_smoothing=0.1, backend=backend),
    "linear_cross_entropy": lambda x, backend: lf.linear_cross_entropy(
        x, torch.ones(5, x.shape[1], device=x.device), (x.detach().argmax(1) + 1) % 5, z_loss=1e-3, backend=backend),
    "sigmoid_focal_loss": lambda x, backend: lf.sigmoid_focal_loss(x, (x.detach() > 0).float(), gamma=1.5,
                                                                   reduction="mean", backend=backend),
    "info_nce": lambda x, backend: lf.info_nce(x, x.flip(0), temperature=0.1, backend=backend),
    "triplet_loss": lambda x, backend: lf.triplet_loss(x, torch.arange(x.shape[0], device=x.device) % 3, margin=0.3,
                                                       backend=backend),
}


@pytest.mark.parametrize("name", list(DYNAMIC_CALLS))
def test_losses_compile_with_dynamic_true(any_backend, name):
    # torch.compile(dynamic=True) may hand a loss its float options as symbolic floats: the option
    # checks compare them (guards), never pass them to math's functions (a graph break).
    device = device_for(any_backend)
    call = DYNAMIC_CALLS[name]
    torch._dynamo.reset()
    compiled = torch.compile(call, dynamic=True, fullgraph=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(6, 4, device=device)
    torch.testing.assert_close(compiled(x, any_backend), call(x, "reference"), rtol=1e-5, atol=1e-6)
