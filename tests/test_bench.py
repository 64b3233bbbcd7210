"""The benchmark harness on CPU with tiny odd shapes: outputs, error handling, correctness column."""
import csv
import dataclasses
import importlib.util
import math
import re

import pytest
import torch

from bench import __main__ as cli
from bench import ceilings, cross_entropy, harness, linear_cross_entropy, report, sigmoid_focal

CPU_PROVIDERS = ("torch", "lf-reference")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops on a busy 2-core machine spend most of their time in thread hand-offs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings():
    return harness.Settings(torch.device("cpu"), "tiny", warmup=1, reps=2, copy_rate=1e9)


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_cli_writes_csv_png_and_markdown(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--tiny", "--providers", ",".join(CPU_PROVIDERS), "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA GPU: CPU timings of small shapes; not comparable with GPU results" in printed

    fields, rows = _read_csv(out / "results.csv")
    assert tuple(fields) == harness.COLUMNS
    for suite in cli.SUITES.values():
        cases = suite.cases("tiny")
        for provider in CPU_PROVIDERS:
            mine = [r for r in rows if r["suite"] == suite.name and r["provider"] == provider]
            assert len(mine) == len(cases), (suite.name, provider, [r["status"] for r in mine])
            for r in mine:
                if suite is linear_cross_entropy.SUITE and r["case"].startswith("chunk_size=") and provider == "torch":
                    assert r["status"] == "unsupported: a lossforge knob", r  # a knob only ours has
                    continue
                assert r["status"] == "ok", r
                assert r["device"] == "cpu" and r["extra_mb"] == ""  # the column exists, empty on CPU
                p20, median, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
                assert 0 < p20 <= median <= p80
                assert float(r["tb_per_s"]) > 0 and float(r["pct_copy"]) > 0
                # Every option's eager formula computes what lossforge computes (float32 vs float32 reference).
                assert float(r["max_rel_err"]) < 1e-5, r
        png = (out / f"{suite.name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    markdown = (out / "results.md").read_text()
    assert "### cross_entropy" in markdown and "### sigmoid_focal" in markdown and "| lf-reference |" in markdown
    assert "### linear_cross_entropy" in markdown and "| TFLOP/s | % matmul |" in markdown
    assert "Matrix-product ceiling " in markdown and "FLOPs model: fwd+bwd: 6*N*D*V" in markdown
    assert (out / "linear_cross_entropy_memory.png").read_bytes().startswith(b"\x89PNG")

    # A second run upserts: same keys, no duplicated rows.
    cli.main(["--tiny", "--suite", "sigmoid_focal", "--providers", "torch", "--device", "cpu", "--out", str(out),
              "--no-plot"])
    _, again = _read_csv(out / "results.csv")
    assert len(again) == len(rows)

    # --report rebuilds the Markdown from every row of the CSV, not just the last run's suite.
    (out / "results.md").write_text("stale")
    assert cli.main(["--report", "--out", str(out), "--no-plot"]) == 0
    markdown = (out / "results.md").read_text()
    assert "### cross_entropy" in markdown and "### sigmoid_focal" in markdown
    assert markdown.count("| lf-reference |") == sum(r["provider"] == "lf-reference" for r in rows)


def test_upsert_replaces_same_key_and_appends_new(tmp_path):
    path = str(tmp_path / "r.csv")
    row = {k: "x" for k in harness.COLUMNS} | {"median_ms": 1.0, "extra_mb": math.nan}
    report.upsert_csv(path, [row])
    report.upsert_csv(path, [row | {"median_ms": 2.5}, row | {"provider": "other"}])
    _, rows = _read_csv(path)
    assert [(r["provider"], r["median_ms"], r["extra_mb"]) for r in rows] == [("x", "2.5", ""), ("other", "1", "")]


def _suite_with(*providers):
    base = cross_entropy.SUITE
    return dataclasses.replace(base, cases=lambda profile: base.cases("tiny")[:1],
                               providers=lambda settings: (list(providers), {}))


def test_failures_become_rows_and_the_run_continues():
    def broken(case):
        def fn(inputs):
            raise RuntimeError("kernel exploded\nsecond line")
        return fn

    def lacks_option(case):
        raise harness.Unsupported("no such option")

    good = harness.Provider("torch", cross_entropy._bind_eager)
    suite = _suite_with(harness.Provider("broken", broken), harness.Provider("partial", lacks_option), good)
    rows = harness.run_suite(suite, _settings(), harness.environment(torch.device("cpu")), log=lambda *a: None)
    status = {r["provider"]: r["status"] for r in rows}
    assert status == {"broken": "error: RuntimeError: kernel exploded", "partial": "unsupported: no such option",
                      "torch": "ok"}
    table = report.format_table(rows)
    assert "error: RuntimeError: kernel exploded" in table and "unsupported: no such option" in table


def test_wrong_results_show_in_the_error_column():
    wrong = harness.Provider("wrong", lambda case: lambda inputs: 1.1 * cross_entropy._bind_eager(case)(inputs))
    rows = harness.run_suite(_suite_with(wrong), _settings(), harness.environment(torch.device("cpu")),
                             log=lambda *a: None)
    assert rows[0]["status"] == "ok"
    assert rows[0]["max_rel_err"] == pytest.approx(0.1, rel=1e-3)


def test_a_provider_that_overwrites_its_input_sees_the_original_every_time():
    seen = []

    def bind(case):
        def fn(inputs):
            x = inputs["input"]
            seen.append(x.detach().double().sum().item())
            loss = cross_entropy._bind_eager(case)(inputs)
            with torch.no_grad():
                x.mul_(-3.0)  # like a loss that writes its gradient into the logits
            return loss
        return fn

    rows = harness.run_suite(_suite_with(harness.Provider("mutating", bind, mutates_input=True)), _settings(),
                             harness.environment(torch.device("cpu")), log=lambda *a: None)
    assert rows[0]["status"] == "ok" and len(seen) >= 4
    assert all(s == seen[0] for s in seen)


def test_bytes_models_and_gpu_cases_follow_the_plan():
    bf16 = torch.bfloat16
    n, v = 8192, 128256
    ce_cases = cross_entropy.cases("gpu")
    assert {(c.shape, c.mode) for c in ce_cases if c.name == "mean"} == {
        ((8192, 32000), "fwd+bwd"), ((8192, 128256), "fwd+bwd"), ((4096, 256000), "fwd+bwd"),
        ((8192, 128256), "fwd")}
    assert {c.name for c in ce_cases} >= {"label_smoothing=0.1", "focal gamma=2 alpha=0.25", "z_loss=1e-4",
                                          "reduction=none"}
    assert all(c.dtype == bf16 for c in ce_cases)
    assert cross_entropy.bytes_model(harness.Case("mean", (n, v), bf16, "fwd+bwd"))[0] == 4 * n * v
    assert cross_entropy.bytes_model(harness.Case("mean", (n, v), bf16, "fwd"))[0] == 2 * n * v
    sf = sigmoid_focal.cases("gpu-quick")
    assert [(c.shape, c.dtype, c.mode, c.options["reduction"]) for c in sf] == [((262144, 80), bf16, "fwd+bwd", "mean")]
    assert sigmoid_focal.bytes_model(sf[0])[0] == 3 * 2 * 262144 * 80


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_the_metric_learning_yardstick_computes_our_loss(distance):
    """pytorch-metric-learning's batch-hard miner and triplet loss as the triplet suite binds them give
    the reference's loss: its default distance normalises the rows first, which is another loss."""
    pytest.importorskip("pytorch_metric_learning")
    from bench import triplet

    provider = triplet._metric_learning(_settings())
    assert isinstance(provider, harness.Provider), provider
    case = harness.Case("batch_hard", (96, 16), torch.float32, "fwd+bwd", triplet._opts("batch_hard", distance))
    x = torch.randn(96, 16, generator=torch.Generator().manual_seed(0))
    inputs = {"input": x, "target": torch.arange(96) // triplet.PER_CLASS}
    got = provider.bind(case)(inputs)
    torch.testing.assert_close(got, triplet.reference(case, inputs), rtol=1e-5, atol=1e-6)


def test_row_plan_sweep_says_what_it_needs_without_a_gpu(capsys):
    from bench import sweep_rows

    if torch.cuda.is_available():
        pytest.skip("the sweep itself runs on the GPU (minutes); here only its refusal is checked")
    assert sweep_rows.main([]) == 2
    assert "needs a CUDA GPU and the cuda backend" in capsys.readouterr().err
    assert sweep_rows.main(["--backend", "triton"]) == 2


def test_row_plan_sweep_settings_name_each_backends_knobs():
    from bench import sweep_rows

    got = sweep_rows.parse_settings(";threads=256,prefetch_kb=64;cache=0")
    assert got == [{}, {"LOSSFORGE_ROW_THREADS": "256", "LOSSFORGE_ROW_PREFETCH_KB": "64"},
                   {"LOSSFORGE_ROW_CACHE": "0"}]
    assert sweep_rows.parse_settings("chunk=16384", "triton") == [{"LOSSFORGE_TRITON_CHUNK": "16384"}]
    for backend, defaults in sweep_rows.DEFAULT_SETTINGS.items():
        assert sweep_rows.parse_settings(defaults, backend)[0] == {}  # the defaults come first
    with pytest.raises(SystemExit, match="unknown cuda knob 'chunk'"):
        sweep_rows.parse_settings("chunk=4096")


def _must_not_run(*args, **kwargs):
    raise AssertionError("called, but nothing should be measured or probed here")


def test_an_unknown_provider_is_refused_before_anything_is_measured(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("old")
    monkeypatch.setattr(ceilings, "copy_bytes_per_s", _must_not_run)
    monkeypatch.setattr(harness, "run_suite", _must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--providers", "torch,lf,nope,lf-cude", "--device", "cpu", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--providers: unknown provider(s) ['nope', 'lf-cude']; known: torch, torch.compile, lf-cuda, " \
           "lf-triton, lf-reference, liger, torch.lce, torch.lce.chunked, cce, torch.chunked, " \
           "lf.linear_cross_entropy, torchvision, inf_cl, open_clip, metric_learning; 'lf' selects every lf-*" in err
    assert (out / "results.md").read_text() == "old"
    assert cli._parse(["--providers", "lf,torchvision,liger"]).providers == "lf,torchvision,liger"


def test_the_known_providers_come_from_the_suites():
    assert cli.PROVIDERS == ("torch", "torch.compile", "lf-cuda", "lf-triton", "lf-reference", "liger",
                             "torch.lce", "torch.lce.chunked", "cce", "torch.chunked", "lf.linear_cross_entropy",
                             "torchvision", "inf_cl", "open_clip", "metric_learning")
    assert cli.FAMILIES == ("lf",)


def test_a_run_in_which_no_provider_ran_keeps_the_old_results(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("old md")
    (out / "results.csv").write_text("old csv")
    # torchvision is known (sigmoid_focal has it) but not a cross_entropy provider.
    code = cli.main(["--tiny", "--suite", "cross_entropy", "--providers", "torchvision", "--device", "cpu",
                     "--out", str(out)])
    assert code == 1
    printed = capsys.readouterr().out
    assert "[cross_entropy] none of the requested providers ran" in printed
    assert f"nothing measured: {out} left as it was" in printed
    assert (out / "results.md").read_text() == "old md" and (out / "results.csv").read_text() == "old csv"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]


def test_progress_lines_and_headers_say_ms():
    def broken(case):
        def fn(inputs):
            raise RuntimeError("kernel exploded")
        return fn

    lines = []
    suite = _suite_with(harness.Provider("torch", cross_entropy._bind_eager), harness.Provider("broken", broken))
    rows = harness.run_suite(suite, _settings(), harness.environment(torch.device("cpu")), log=lines.append)
    number = r"(\d+(?:\.\d+)?(?:e[-+]\d+)?)"
    timed = re.fullmatch(rf"\[cross_entropy\] mean fwd\+bwd 13x67 torch: {number} ms \[p20 {number}, p80 {number}\]",
                         lines[0])
    assert timed, lines
    median, p20, p80 = (float(g) for g in timed.groups())
    assert p20 <= median <= p80
    assert lines[1] == "[cross_entropy] mean fwd+bwd 13x67 broken: error: RuntimeError: kernel exploded"
    assert re.split(r"\s{2,}", report.format_table(rows).splitlines()[0])[6:9] == ["median ms", "p20", "p80"]
    markdown = report.format_markdown(rows, harness.environment(torch.device("cpu")), 1e9)
    assert "Median ms [p20, p80]" in markdown and "| dtype | ms | TB/s |" in markdown


def _lf_expected():
    """lf-* providers on CPU: the Triton kernels only through the interpreter; lf-cuda never."""
    return ["lf-triton", "lf-reference"] if harness.triton_interpreter() else ["lf-reference"]


def test_standard_providers_come_in_order_and_build_only_wanted_third_parties(monkeypatch):
    monkeypatch.setattr(harness, "compile_problem", _must_not_run)  # torch.compile not wanted: no probe
    made = []

    def usable(settings):
        made.append("a")
        return harness.Provider("a", cross_entropy._bind_eager)

    def absent(settings):
        made.append("b")
        return "b is not installed"

    settings = dataclasses.replace(_settings(), only=frozenset({"torch", "lf", "a", "b"}))
    got, skipped = harness.standard_providers(settings, cross_entropy._bind_eager, cross_entropy._lf_call,
                                              ("a", usable), ("b", absent), ("c", _must_not_run))
    assert [p.name for p in got] == ["torch", *_lf_expected(), "a"]
    assert made == ["a", "b"]
    assert list(skipped) == ["torch.compile", "lf-cuda", *(["lf-triton"] if len(_lf_expected()) == 1 else []),
                             "b", "c"]
    assert skipped["torch.compile"] == "not selected" and skipped["c"] == "not selected"
    assert skipped["b"] == "b is not installed"


def test_each_suite_lists_its_standard_providers_in_order_on_cpu(monkeypatch):
    monkeypatch.setattr(harness, "compile_problem", lambda device_type, timeout_s: None)  # skip the slow probe
    standard = ["torch", "torch.compile", *_lf_expected()]
    got, skipped = cross_entropy.providers(_settings())
    assert [p.name for p in got] == standard
    assert skipped["liger"] == "Liger-Kernel runs on CUDA tensors only" and "lf-cuda" in skipped

    got, skipped = sigmoid_focal.providers(_settings())
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    assert [p.name for p in got] == standard + (["torchvision"] if has_torchvision else [])
    assert "lf-cuda" in skipped
    if not has_torchvision:
        assert skipped["torchvision"].startswith("not importable (ModuleNotFoundError")


@pytest.mark.parametrize("only", [None, frozenset({"torch"}), frozenset({"lf", "liger", "torchvision"})])
def test_each_suites_declared_provider_names_are_what_providers_returns_or_skips(monkeypatch, only):
    monkeypatch.setattr(harness, "compile_problem", lambda device_type, timeout_s: "probe left out in this test")
    for suite in cli.SUITES.values():
        got, skipped = suite.providers(dataclasses.replace(_settings(), only=only))
        names = [p.name for p in got] + list(skipped)
        assert sorted(names) == sorted(suite.provider_names), suite.name
        assert len(set(names)) == len(names), suite.name


def test_linear_cross_entropy_cases_and_models_follow_the_plan():
    bf16, lm = torch.bfloat16, (8192, 4096, 128256)
    gpu = linear_cross_entropy.cases("gpu")
    assert {(c.shape, c.mode) for c in gpu if c.name == "mean"} == {
        (lm, "fwd+bwd"), ((4096, 2048, 32000), "fwd+bwd"), ((16384, 4096, 256000), "fwd+bwd"), (lm, "fwd")}
    assert {c.name for c in gpu} >= {"label_smoothing=0.1", "z_loss=1e-4", "softcap=30", "focal gamma=2 alpha=0.25",
                                     "reduction=none", "chunk_size=256", "chunk_size=512", "chunk_size=2048"}
    assert all(c.dtype == bf16 and (c.shape == lm or c.name == "mean") for c in gpu)
    step = harness.Case("mean", lm, bf16, "fwd+bwd")
    assert linear_cross_entropy.flops_model(step)[0] == 6 * 8192 * 4096 * 128256  # 25.8 TFLOP
    assert linear_cross_entropy.flops_model(harness.Case("mean", lm, bf16, "fwd"))[0] == 2 * 8192 * 4096 * 128256
    # the fp32 weight-gradient accumulator is ours alone, and only for a half-precision weight
    assert linear_cross_entropy.accum_mb(step, "lf-cuda") == 128256 * 4096 * 4 / 2**20
    assert linear_cross_entropy.accum_mb(step, "liger") == 0.0
    narrow = harness.Case("bf16 accumulation", lm, bf16, "fwd+bwd", {"fp32_weight_grad": False})
    assert linear_cross_entropy.accum_mb(narrow, "lf-triton") == 0.0
    assert linear_cross_entropy.SUITE.grads == ("input", "linear_weight")


def test_matmul_ceiling_on_cpu_is_positive():
    rate = ceilings.matmul_flops_per_s(torch.device("cpu"), n=64, reps=2)
    assert 0 < rate < 1e15


def _torchrun_example_worker(rank, world):
    from bench import distributed as example

    args = example._parse(["--rows", "40", "--vocab", "97", "--dim", "8", "--batch", "30", "--reps", "1"])
    lines = example.report(args, rank, world, torch.device("cpu"))
    errors = [float(line.split("rel err")[1].split()[0]) for line in lines]
    assert len(lines) == 6 and max(errors) < 1e-5, lines
    return lines


def test_the_torchrun_example_agrees_with_one_process():
    from tests import distributed

    lines = distributed.run(2, _torchrun_example_worker)[0]
    assert [line.split(" rel err")[0].strip() for line in lines] == [
        "cross_entropy (vocab-parallel)", "linear_cross_entropy (vocab-parallel)", "info_nce (global batch)",
        "siglip_loss (global batch)", "supcon_loss (global batch)", "triplet_loss batch_hard (global batch)"]


def test_the_torchrun_example_says_how_to_run_it(capsys, monkeypatch):
    from bench import distributed as example

    monkeypatch.delenv("RANK", raising=False)
    assert example.main([]) == 2
    assert "run under torchrun" in capsys.readouterr().err
