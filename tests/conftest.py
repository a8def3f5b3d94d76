"""Shared fixtures. Utilities live in tests/helpers.py."""
import os
import tempfile

# bitshuffle links OpenMP: keep it to one thread in the test process too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Buffers and writers started by the tests list themselves here (sf_bsread_writer.registry), not in the
# user's runtime directory; children inherit it.
os.environ.setdefault("SF_BSREAD_RUNTIME_DIR", tempfile.mkdtemp(prefix="sf_bsread_test_runtime-"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """``make test`` runs quietly: say at the end which tests were skipped, why, and what would run them.

    One line per reason (the reasons name the missing package and where it comes from), so that a
    machine without Chromium, chromedriver, promtool or h5dump never passes for a full run.
    """
    reports = terminalreporter.stats.get("skipped", [])
    counts: dict[str, int] = {}
    for report in reports:
        if not isinstance(report.longrepr, tuple):  # a skip has (file, line, "Skipped: reason")
            continue
        reason = str(report.longrepr[2])
        reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
        counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return
    write = terminalreporter.write_line
    write("")
    write(f"{sum(counts.values())} skipped tests: what they need (docs/dependencies.md, \"What the tests need\"; "
          ".ci/run installs the Debian packages)")
    for reason, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        write(f"  {count} x {reason}")
