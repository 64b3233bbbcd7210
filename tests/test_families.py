"""Families are found by their stem: functional, modules, the package, ops and the bench suites
derive from the family modules, so adding a family edits no central file."""
import ast
import importlib
import inspect
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
from torch import nn

import lossforge_kernels as lf
from bench import __main__ as cli
from lossforge_kernels import _backends, functional, losses, modules

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lossforge_kernels"
BACKEND_NAMES = {"available_backends", "BackendInfo", "BackendUnavailableError"}
# Names users import today; a family may add names, never lose these.
PUBLISHED = {"cross_entropy", "focal_loss", "linear_cross_entropy", "sigmoid_focal_loss", "info_nce", "supcon_loss",
             "siglip_loss", "triplet_loss", "CrossEntropyLoss", "FocalLoss", "LinearCrossEntropyLoss",
             "SigmoidFocalLoss", "InfoNCELoss", "SupConLoss", "SigLIPLoss", "TripletLoss"}


def _family_files():
    return sorted((PACKAGE / "losses").glob("[!_]*.py"))


def _assigned_names(path):
    return {t.id for node in ast.parse(path.read_text()).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def test_every_family_module_declares_its_functions_and_modules():
    for path in _family_files():
        missing = {"FAMILY", "FUNCTIONS", "MODULES"} - _assigned_names(path)
        assert not missing, f"losses/{path.name} declares no {sorted(missing)}"
    assert [m.__name__.rsplit(".", 1)[1] for m in losses.FAMILIES] == [p.stem for p in _family_files()]


def test_each_family_declares_only_what_it_defines():
    for family in losses.FAMILIES:
        assert family.FUNCTIONS, f"{family.__name__} declares no function"
        for fn in family.FUNCTIONS:
            assert inspect.isfunction(fn) and fn.__module__ == family.__name__, (family.__name__, fn)
        for cls in family.MODULES:
            assert issubclass(cls, nn.Module) and cls.__module__ == family.__name__, (family.__name__, cls)
    assert {f.FAMILY for f in losses.FAMILIES} == set(_backends.families())


def test_exports_are_exactly_the_families_declarations():
    declared_functions = {fn.__name__: fn for f in losses.FAMILIES for fn in f.FUNCTIONS}
    declared_modules = {cls.__name__: cls for f in losses.FAMILIES for cls in f.MODULES}
    public = lambda module: {n for n in dir(module) if not n.startswith("_")}  # noqa: E731
    assert set(functional.__all__) == public(functional) == set(declared_functions)
    assert set(modules.__all__) == public(modules) == set(declared_modules)
    assert len(lf.__all__) == len(set(lf.__all__))
    assert set(lf.__all__) == BACKEND_NAMES | set(declared_functions) | set(declared_modules)
    assert set(lf.__all__) >= PUBLISHED
    for name, obj in {**declared_functions, **declared_modules}.items():
        assert getattr(lf, name) is obj and name in dir(lf)
        assert getattr(functional if name in declared_functions else modules, name) is obj


def test_a_name_declared_by_two_families_is_refused(monkeypatch):
    twin = type(sys)("lossforge_kernels.losses.twin")
    twin.FUNCTIONS = (losses.FAMILIES[0].FUNCTIONS[0],)
    monkeypatch.setattr(losses, "FAMILIES", losses.FAMILIES + (twin,))
    with pytest.raises(ImportError, match="already exported by another family"):
        losses._exports("FUNCTIONS")
    del twin.FUNCTIONS
    with pytest.raises(ImportError, match="losses.twin declares no FUNCTIONS"):
        losses._exports("FUNCTIONS")


TOY_LOSSES = '''
from torch import nn

FAMILY = "toy"


def toy_loss(input):
    return input.sum()


class ToyLoss(nn.Module):
    def forward(self, input):
        return toy_loss(input)


FUNCTIONS = (toy_loss,)
MODULES = (ToyLoss,)
'''
TOY_OPS = "DEFINED = True\n"
TOY_BENCH = '''
from .harness import Suite

ORDER = 15
SUITE = Suite("toy", None, None, None, None, None, ("torch", "toy-lib"))
'''
TOY_CHECK = '''
import sys
import lossforge_kernels as lf
from lossforge_kernels import toy_loss
from lossforge_kernels.functional import info_nce, toy_loss as f
from lossforge_kernels.modules import ToyLoss, TripletLoss
from bench import __main__ as cli

assert lf.toy_loss is f is toy_loss and lf.ToyLoss is ToyLoss
assert {"toy_loss", "ToyLoss", "cross_entropy", "TripletLoss"} <= set(lf.__all__) and "toy_loss" in dir(lf)
assert "lossforge_kernels.ops.toy" in sys.modules
print(",".join(cli.SUITES), ",".join(cli.PROVIDERS))
'''


def test_a_new_family_needs_no_central_edit(tmp_path):
    # A copy of the package and the bench, plus one family's files of its own stem, and nothing else edited.
    skip = shutil.ignore_patterns("__pycache__", "triton_kernels", "out", "results")
    shutil.copytree(PACKAGE, tmp_path / "lossforge_kernels", ignore=skip)
    shutil.copytree(ROOT / "bench", tmp_path / "bench", ignore=skip)
    (tmp_path / "lossforge_kernels" / "losses" / "toy.py").write_text(TOY_LOSSES)
    (tmp_path / "lossforge_kernels" / "ops" / "toy.py").write_text(TOY_OPS)
    (tmp_path / "bench" / "toy.py").write_text(TOY_BENCH)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOSSFORGE_BACKEND")}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(TOY_CHECK)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    suites, providers = out.stdout.split()
    assert suites == "cross_entropy,toy,linear_cross_entropy,log_probs,distillation,sigmoid_focal,contrastive,triplet"
    assert providers.split(",").index("toy-lib") == providers.split(",").index("liger") + 1  # the suite's own


def test_bench_suites_are_the_modules_with_a_suite_in_their_order(tmp_path, monkeypatch):
    folder = tmp_path / "toybench"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "second.py").write_text("import types\nORDER = 2\nSUITE = types.SimpleNamespace(name='b')\n")
    (folder / "first.py").write_text("import types\nORDER = 1\nSUITE = types.SimpleNamespace(name='z')\n")
    (folder / "helpers.py").write_text("VALUE = 1\n")
    (folder / "_private.py").write_text("raise AssertionError('a private module is not a suite')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert list(cli.suites(str(folder), "toybench")) == ["z", "b"]
    assert list(cli.SUITES) == ["cross_entropy", "linear_cross_entropy", "log_probs", "distillation", "sigmoid_focal",
                                "contrastive", "triplet"]
    (folder / "third.py").write_text("import types\nSUITE = types.SimpleNamespace(name='c')\n")
    with pytest.raises(ImportError, match="toybench.third has a SUITE but no ORDER"):
        cli.suites(str(folder), "toybench")
