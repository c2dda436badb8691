"""Continuous monitoring: check suites on schedules, alerts when a check changes, history.

Monitoring reads the results of runs; it does not change how jobs are dispatched, and the
orchestration core does not import it.
"""

from runners_orchestrator.monitoring.suites import (
    AlertDestination,
    Schedule,
    Suite,
    SuiteError,
    SuiteJob,
    SuiteScan,
    check_key,
    load_suite,
    load_suites,
    scan_suites,
)

__all__ = [
    "AlertDestination",
    "Schedule",
    "Suite",
    "SuiteError",
    "SuiteJob",
    "SuiteScan",
    "check_key",
    "load_suite",
    "load_suites",
    "scan_suites",
]
