"""The report writer of `make bench-report` and the guard's floors (the benchmarks themselves run outside `make test`)."""

from benchmark_modules import load_benchmark


def test_report_replaces_only_this_hosts_section(tmp_path):
    report = load_benchmark("report")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written text\n")
    a = report.host_key("Intel(R) Xeon(R) Processor")
    b = report.host_key("AMD EPYC 9B45 128-Core Processor")
    assert a == "intel-r-xeon-r-processor" and a != b
    section = lambda key, body: f"{report.BEGIN.format(key=key)}\n{body}\n{report.END.format(key=key)}"
    report.write_section(section(a, "first intel run"), a, doc)
    report.write_section(section(b, "amd run"), b, doc)
    report.write_section(section(a, "second intel run"), a, doc)
    text = doc.read_text()
    assert "hand-written text" in text and "amd run" in text and "second intel run" in text
    assert "first intel run" not in text and text.count(report.BEGIN.format(key=a)) == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_report_keeps_tables_and_verdicts_only():
    report = load_benchmark("report")
    out = "loading...\n| a | b |\n|---|---|\n| 1 | 2 |\nprogress 50%\nPASS: target met\n3/4 cells PASS (x)\n"
    assert report.tables_of(out).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "PASS: target met",
                                                   "3/4 cells PASS (x)"]


def test_every_benchmark_of_the_report_exists():
    report = load_benchmark("report")
    for script, _, _ in report.BENCHMARKS.values():
        assert (report.HERE / script).is_file(), script


def test_guard_floors_are_ratios_above_zero():
    guard = load_benchmark("guard")
    assert guard.FLOORS and all(0 < v < 10 for v in guard.FLOORS.values())
