"""The test suite's time budgets and the report of every run against them.

The suite has two kinds of test: end-to-end ones, marked `slow` (real training runs, SLURM, multi-node: a
minute or more each), and everything else, fast. Their budgets on a 2-core machine are set in pyproject.toml
([tool.pytest.ini_options]: fast_budget_minutes for the fast tests together, suite_budget_minutes for the
whole suite). At the end of a run this plugin (loaded by pytest's addopts, `-p swav_testing.budgets`) prints
the time the fast and the slow tests of that run took (setup, call and teardown) and the run's wall-clock
time against those budgets: a report, never a failure, since a slower or busier machine is no bug.
"""

from __future__ import annotations

import time

import pytest

FAST_BUDGET = "fast_budget_minutes"
SUITE_BUDGET = "suite_budget_minutes"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(FAST_BUDGET, "minutes all fast tests (not marked slow) may take together, on 2 cores")
    parser.addini(SUITE_BUDGET, "minutes the whole suite, fast and slow, may take, on 2 cores")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(BudgetReport(config), "swav-testing-budget-report")


def _budget(config: pytest.Config, name: str) -> float | None:
    value = config.getini(name)
    return float(value) if value else None


def _against(minutes: float, budget: float | None) -> str:
    if budget is None:
        return ""
    return f", budget {budget:g} min" + (" [OVER BUDGET]" if minutes > budget else "")


class BudgetReport:
    """The seconds (setup, call, teardown) and the tests of this run, fast and slow, and the summary of them."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.seconds = {"fast": 0.0, "slow": 0.0}
        self.tests: dict[str, set[str]] = {"fast": set(), "slow": set()}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        kind = "slow" if "slow" in report.keywords else "fast"
        self.seconds[kind] += report.duration
        self.tests[kind].add(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not any(self.tests.values()):  # --collect-only, or every test deselected
            return
        wall = (time.monotonic() - self.started) / 60
        terminalreporter.section("time against the budgets (pyproject.toml; a report, never a failure)")
        for kind, budget in (("fast", _budget(self.config, FAST_BUDGET)), ("slow", None)):
            count, minutes = len(self.tests[kind]), self.seconds[kind] / 60
            terminalreporter.write_line(f"{kind} tests: {count} in {minutes:.1f} min{_against(minutes, budget)}"
                                        if count else f"{kind} tests: none ran")
        terminalreporter.write_line(f"whole run: {wall:.1f} min wall clock"
                                    f"{_against(wall, _budget(self.config, SUITE_BUDGET))}")
