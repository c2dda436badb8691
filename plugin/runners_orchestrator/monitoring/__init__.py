"""Continuous monitoring: check suites on schedules, alerts when a check changes, history.

Monitoring reads the results of runs; it does not change how jobs are dispatched, and the
orchestration core does not import it.
"""

from runners_orchestrator.monitoring.alerts import AlertSender
from runners_orchestrator.monitoring.history import CheckFilter, HistoryQueryError
from runners_orchestrator.monitoring.recording import Recorder, SuiteRules, checks_of_run
from runners_orchestrator.monitoring.service import MonitoringService
from runners_orchestrator.monitoring.store import CheckResult, HistoryStore
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
    "AlertSender",
    "CheckFilter",
    "CheckResult",
    "HistoryQueryError",
    "HistoryStore",
    "MonitoringService",
    "Recorder",
    "Schedule",
    "Suite",
    "SuiteError",
    "SuiteJob",
    "SuiteRules",
    "SuiteScan",
    "check_key",
    "checks_of_run",
    "load_suite",
    "load_suites",
    "scan_suites",
]
