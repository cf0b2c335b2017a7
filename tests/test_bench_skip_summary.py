"""`pytest bench --benchmark-only` ends with one line per group of skipped
benchmarks and what would run them (bench/conftest.py), so that a run's
"N skipped" needs no -rs to explain."""

from types import SimpleNamespace

from bench import conftest as bench_conftest


def _skipped(nodeid, reason):
    return SimpleNamespace(nodeid=nodeid, longrepr=(nodeid.split("::")[0], 1, f"Skipped: {reason}"))


def test_skips_grouped_by_reason_largest_first():
    flag = "host-overhead group: pass --bench-host-overhead"
    fused = "ours-fused needs the Triton kernels: set TRITON_INTERPRET=1"
    reports = [_skipped(f"bench/test_bench_host_overhead.py::test_host[{i}]", flag) for i in range(3)]
    reports += [_skipped(f"bench/test_bench_conv_gru.py::test_conv_gru[{i}]", fused) for i in range(2)]
    reports.append(SimpleNamespace(nodeid="bench/test_other.py::test_x", longrepr="Skipped: plain string"))
    assert bench_conftest.skip_groups(reports) == [
        (3, flag, ["bench/test_bench_host_overhead.py"]),
        (2, fused, ["bench/test_bench_conv_gru.py"]),
        (1, "plain string", ["bench/test_other.py"]),
    ]


def test_summary_lines():
    lines, sections = [], []
    reporter = SimpleNamespace(
        stats={"skipped": [_skipped("bench/test_bench_host_overhead.py::t[0]", "pass --bench-host-overhead")]},
        section=sections.append, write_line=lines.append)
    bench_conftest._write_skip_summary(reporter)
    assert sections == ["skipped benchmarks, by reason"]
    assert lines == ["1 skipped (bench/test_bench_host_overhead.py): pass --bench-host-overhead"]
    reporter.stats = {}
    bench_conftest._write_skip_summary(reporter)
    assert len(lines) == 1
