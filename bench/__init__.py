"""Benchmarks of the lossforge_kernels losses against stock torch and other libraries: `python -m bench`.

    python -m bench                                   # every suite, every provider available here
    python -m bench --suite cross_entropy --quick     # a reduced set of cases
    python -m bench --providers torch,lf-triton,liger # only these providers ("lf" selects every lf-*)

Writes results.csv (rows upserted by suite/case/provider/mode/shape/dtype/device), results.md and
one <suite>.png into --out (default bench/out/). bench/harness.py measures the rows; bench/report.py
writes these outputs from them.

How GPU rows are timed: each repetition is bracketed by its own pair of CUDA events, after a
256 MiB buffer write that evicts the inputs from L2 (outside the events), so every repetition
reads cold data as a training step would. The step (forward, or forward + backward) is captured
once in a CUDA graph and replayed, so a short kernel is timed without the Python and launch
overhead in front of it; a provider that cannot be captured (a host sync, say) is timed with
plain launches instead and its `timing` column says so. Warm-up (compilation, autotuning) is not
timed; gradients are released between repetitions outside the timed region. CPU rows are timed
with time.perf_counter. Median and 20th/80th percentiles are reported.

Other columns: TB/s = the suite's bytes model (stated per row) over the median time; % copy = that
rate over a device-to-device copy measured at the start of the run (bench/ceilings.py); extra MB =
peak GPU memory of one step beyond its inputs and the gradient it returns (empty on CPU);
max_rel_err = the larger of the loss's and the gradient's relative error against the lossforge
reference on the same inputs, so a fast but wrong provider shows.
"""
