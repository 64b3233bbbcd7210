"""Compares the SASS of csrc/ at a git revision with the working tree's: `python -m tests.sass_diff [REV]`.

Both trees are compiled for sm_80 and sm_90 with the flags of tests/test_csrc_build.py (two nvcc
jobs at a time; --jobs changes that), every kernel is disassembled with cuobjdump, and kernels are
matched by demangled name with namespaces stripped, so that moving a kernel to another namespace or
file is no change. Instruction text is compared without addresses and encodings (branch targets
are offsets within the kernel, so they stay). Prints the kernels that are identical, changed (with
registers before/after and the start of a diff; a kernel whose parameters changed is paired by name
and template arguments), and only before or only after. Exit status 0; with --strict, 1 when
anything differs; 2 when a compile fails.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import difflib
import io
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from tests.test_csrc_build import NVCC, ROOT, nvcc_command


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, beside nvcc, or the copy Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    if NVCC:
        beside = pathlib.Path(NVCC).resolve().parent / "cuobjdump"
        if beside.exists():
            return str(beside)
    try:
        import triton.backends.nvidia as nv
        bundled = pathlib.Path(nv.__file__).parent / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except Exception:
        pass
    return None


def export_csrc(rev: str, dest: pathlib.Path) -> pathlib.Path:
    """csrc/ as of `rev` (read with git archive; nothing in the repository changes)."""
    data = subprocess.run(["git", "archive", "--format=tar", rev, "csrc"], cwd=ROOT, check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest)
    return dest / "csrc"


def compile_tree(csrc: pathlib.Path, out: pathlib.Path, pool) -> dict:
    """{source name: future of (returncode, seconds, output, object path)}."""
    out.mkdir(parents=True, exist_ok=True)

    def one(src: pathlib.Path):
        obj = out / f"{src.stem}.o"
        start = time.perf_counter()
        proc = subprocess.run(nvcc_command(src, obj, csrc), capture_output=True, text=True, cwd=csrc)
        return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr, obj

    sources = sorted(csrc.glob("*.cu"), key=lambda p: -p.stat().st_size)
    return {src.name: pool.submit(one, src) for src in sources}


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


_QUALIFIER = re.compile(r"\(anonymous namespace\)::|\b[A-Za-z_]\w*::")


def normal_name(demangled: str) -> str:
    """The kernel's name and signature without namespaces (lossforge::, c10::, anonymous ones)."""
    return _QUALIFIER.sub("", demangled)


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;?\s*/\*\s*0x[0-9a-f]+\s*\*/\s*$")


def parse_sass(text: str) -> dict[tuple[str, str], list[str]]:
    """{(arch, mangled name): instruction lines} from `cuobjdump -sass`."""
    kernels: dict[tuple[str, str], list[str]] = {}
    arch, current = None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch, current = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault((arch, m.group(1)), [])
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            current.append(re.sub(r"\s+", " ", m.group(1)))
    return kernels


def parse_registers(text: str) -> dict[tuple[str, str], int]:
    """{(arch, mangled name): registers} from `cuobjdump -res-usage`."""
    regs, arch, current = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"\bREG:(\d+)", line)
        if m and current is not None:
            regs[(arch, current)] = int(m.group(1))
            current = None
    return regs


def kernels_of(objects: list[pathlib.Path], cuobjdump: str) -> dict[tuple[str, str], tuple[list[str], int, str]]:
    """{(arch, normalised name): (instructions, registers, object file)} over all objects."""
    raw = {}
    for obj in objects:
        sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", str(obj)], capture_output=True, text=True, check=True).stdout
        regs = parse_registers(res)
        for key, lines in parse_sass(sass).items():
            raw[key] = (lines, regs.get(key, -1), obj.name)
    names = demangle(sorted({name for _, name in raw}))
    out, seen = {}, collections.Counter()
    for (arch, name), value in raw.items():
        key = (arch, normal_name(names[name]))
        seen[key] += 1
        if seen[key] > 1:  # the same kernel in two files: keep both apart
            key = (key[0], f"{key[1]} #{seen[key]}")
        out[key] = value
    return out


def without_parameters(name: str) -> str:
    """`void k<float>(float*, long)` -> `void k<float>`: a kernel whose parameters changed still pairs."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def pair_renamed(only_before: list, only_after: list) -> list[tuple]:
    """(before key, after key) for kernels found on one side each under the same name and template
    arguments (their parameters changed), when that match is one to one."""
    def index(keys):
        found = collections.defaultdict(list)
        for key in keys:
            found[(key[0], without_parameters(key[1]))].append(key)
        return found

    b, a = index(only_before), index(only_after)
    return sorted((b[k][0], a[k][0]) for k in b.keys() & a.keys() if len(b[k]) == 1 and len(a[k]) == 1)


def short_diff(before: list[str], after: list[str], lines: int) -> str:
    diff = list(difflib.unified_diff(before, after, "before", "after", n=1, lineterm=""))
    more = f"\n      ... {len(diff) - lines} more diff lines" if len(diff) > lines else ""
    return "\n".join("      " + d for d in diff[:lines]) + more


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sass_diff", description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", nargs="?", default="HEAD", help="git revision to compare with (default HEAD)")
    parser.add_argument("--jobs", type=int, default=2, help="nvcc jobs at a time (default 2)")
    parser.add_argument("--diff-lines", type=int, default=16, help="diff lines shown per changed kernel")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any kernel differs")
    args = parser.parse_args(argv)
    cuobjdump = find_cuobjdump()
    if NVCC is None or cuobjdump is None:
        print("nvcc and cuobjdump are needed", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="sass_diff_") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        before_src = export_csrc(args.rev, tmp / "before")
        after_src = tmp / "after" / "csrc"
        shutil.copytree(ROOT / "csrc", after_src)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = {"before": compile_tree(before_src, tmp / "before_obj", pool),
                    "after": compile_tree(after_src, tmp / "after_obj", pool)}
            results = {side: {name: f.result() for name, f in files.items()} for side, files in jobs.items()}
        failed = False
        for side, files in results.items():
            label = args.rev if side == "before" else "working tree"
            total = sum(r[1] for r in files.values())
            print(f"nvcc, {label} ({total:.0f} s of nvcc in all, {args.jobs} at a time):")
            for name, (code, seconds, output, _) in sorted(files.items()):
                print(f"  {name:32s} {seconds:6.1f} s" + ("" if code == 0 else f"  FAILED (exit {code})"))
                if code != 0:
                    failed = True
                    print(output[-4000:])
        if failed:
            return 2
        before = kernels_of([r[3] for r in results["before"].values()], cuobjdump)
        after = kernels_of([r[3] for r in results["after"].values()], cuobjdump)

    same = sorted(k for k in before.keys() & after.keys() if before[k][0] == after[k][0])
    changed = sorted((k, k) for k in before.keys() & after.keys() if before[k][0] != after[k][0])
    only_before = sorted(before.keys() - after.keys())
    only_after = sorted(after.keys() - before.keys())
    renamed = pair_renamed(only_before, only_after)
    changed = sorted(changed + renamed)
    only_before = [k for k in only_before if k not in {b for b, _ in renamed}]
    only_after = [k for k in only_after if k not in {a for _, a in renamed}]
    print(f"\nkernels (per architecture): {len(same)} identical, {len(changed)} changed, "
          f"{len(only_before)} only in {args.rev}, {len(only_after)} only in the working tree")
    for arch in sorted({k[0] for k in before.keys() | after.keys()}):
        n_same = sum(1 for k in same if k[0] == arch)
        print(f"  {arch}: {n_same} identical, {sum(1 for k, _ in changed if k[0] == arch)} changed")
    if changed:
        print("\nchanged:")
        for b_key, a_key in changed:
            (b_lines, b_regs, b_obj), (a_lines, a_regs, a_obj) = before[b_key], after[a_key]
            title = b_key[1] if b_key == a_key else f"{b_key[1]}\n      now {a_key[1]}"
            print(f"  [{b_key[0]}] {title}\n      registers {b_regs} -> {a_regs}, instructions {len(b_lines)} -> "
                  f"{len(a_lines)} ({b_obj} -> {a_obj})")
            print(short_diff(b_lines, a_lines, args.diff_lines))
    for title, keys, side in (("only in " + args.rev, only_before, before),
                              ("only in the working tree", only_after, after)):
        if keys:
            print(f"\n{title}:")
            for key in keys:
                print(f"  [{key[0]}] {key[1]}  (registers {side[key][1]}, {side[key][2]})")
    differs = bool(changed or only_before or only_after)
    return 1 if args.strict and differs else 0


if __name__ == "__main__":
    sys.exit(main())
