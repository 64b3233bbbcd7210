"""The closed enums the kernel ops take as ints are defined once, in Python (reference/contrastive.py:
Kind; reference/triplet.py: Distance, Mining; reference/distillation.py: Divergence). The kernels'
copies must agree with them, name for name and value for value: csrc/enums.h (read as text, so this
needs no compiler) and the constexpr constants of the Triton modules (which import nothing from the
package)."""
import pathlib
import re

import pytest

from lossforge_kernels.reference.contrastive import Kind
from lossforge_kernels.reference.distillation import Divergence
from lossforge_kernels.reference.triplet import Distance, Mining

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "enums.h"
ENUMS = {"Kind": Kind, "Distance": Distance, "Mining": Mining, "Divergence": Divergence}
_ENUM = re.compile(r"\benum\s+(?:class\s+)?(\w+)\s*:\s*int\s*\{([^}]*)\}")
_MEMBER = re.compile(r"^\s*(\w+)\s*=\s*(-?\d+)\s*$")


def _plain(name: str) -> str:
    """INFO_NCE and kInfoNce alike -> 'infonce' (C++ spells members kCamelCase)."""
    if re.fullmatch(r"k[A-Z]\w*", name):
        name = name[1:]
    return name.replace("_", "").lower()


def header_enums(text: str) -> dict[str, dict[str, int]]:
    """{enum name: {plain member name: value}} of every `enum Name : int {...}` in the text."""
    found = {}
    for name, body in _ENUM.findall(text):
        members = {}
        for entry in filter(str.strip, body.split(",")):
            m = _MEMBER.match(entry)
            assert m, f"{HEADER.name}: enum {name}: write each member as `kName = value`, got {entry.strip()!r}"
            members[_plain(m.group(1))] = int(m.group(2))
        assert name not in found, f"{HEADER.name}: enum {name} is defined twice"
        found[name] = members
    return found


def python_enums() -> dict[str, dict[str, int]]:
    return {name: {_plain(m.name): int(m) for m in enum} for name, enum in ENUMS.items()}


def test_header_matches_the_python_enums():
    assert header_enums(HEADER.read_text()) == python_enums()


def test_a_disagreement_is_caught():
    text = HEADER.read_text()
    assert header_enums(text.replace("kSupCon = 1", "kSupCon = 3")) != python_enums()
    assert header_enums(text.replace("kBatchAll = 2", "kBatchAll = 2, kExtra = 3")) != python_enums()
    assert header_enums(text.replace(", kCosine = 2", "")) != python_enums()


def test_no_other_csrc_file_defines_the_members():
    names = {m for members in header_enums(HEADER.read_text()).values() for m in members}
    define = re.compile(r"\bk(\w+)\s*=\s*-?\d+")
    for path in sorted((ROOT / "csrc").glob("*")):
        if path == HEADER or path.suffix not in (".h", ".cuh", ".cu", ".cpp"):
            continue
        again = sorted({m for m in define.findall(path.read_text()) if _plain("k" + m) in names})
        assert not again, f"{path.name} defines {again} again: include enums.h"


@pytest.mark.parametrize("module,enum", [("contrastive", Kind), ("triplet", Distance), ("triplet", Mining),
                                         ("distillation", Divergence)])
def test_triton_constants_match_the_python_enums(module, enum):
    pytest.importorskip("triton")
    import importlib

    kernels = importlib.import_module(f"lossforge_kernels.triton_kernels.{module}")
    for member in enum:
        constant = getattr(kernels, member.name, None)
        assert constant is not None, f"triton_kernels/{module}.py lacks {member.name}"
        assert getattr(constant, "value", constant) == int(member), \
            f"triton_kernels/{module}.py: {member.name} is {constant}, {enum.__name__}.{member.name} is {int(member)}"
