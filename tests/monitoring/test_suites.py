"""Suite files: parsed, validated with errors that name the file and field, expanded to jobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from runners_orchestrator.monitoring import SuiteError, check_key, load_suites, scan_suites

if TYPE_CHECKING:
    from pathlib import Path

SHOP = """
description = "Shop pages"
schedule = { interval = "5m", timezone = "Europe/Berlin" }
alert_after = 3
options = { max_concurrency = 4 }
tags = ["shop"]

[[alerts]]
type = "slack"
url = "http://127.0.0.1:9/hook"

[[jobs]]
url = "https://shop.example.com/checkout"
runners = ["cookieBannerVisibleTest", "pageHasTitle"]
regions = ["us-east-1", "eu-west-1"]
tags = ["checkout"]

[[jobs]]
url = "https://shop.example.com/"
runners = ["pageHasTitle"]
"""


def write(root: Path, name: str, text: str) -> Path:
    path = root / "checks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_suite_file_is_read_and_expanded_per_region(tmp_path: Path) -> None:
    write(tmp_path, "shop.toml", SHOP)
    suite = load_suites(tmp_path)["shop"]
    assert suite.schedule is not None
    assert suite.schedule.interval == timedelta(minutes=5)
    assert suite.deployment_name == "suite-shop"
    assert suite.tag == "suite:shop"
    jobs = suite.runner_jobs()
    assert [(job.url, job.region) for job in jobs] == [
        ("https://shop.example.com/checkout", "us-east-1"),
        ("https://shop.example.com/checkout", "eu-west-1"),
        ("https://shop.example.com/", None),
    ]
    assert jobs[0].to_wire()["suite"] == "shop"
    assert jobs[0].to_wire()["tags"] == ["checkout", "shop"]
    filtered = suite.runner_jobs(tags=["checkout"], regions=["eu-west-1"])
    assert [(job.url, job.region) for job in filtered] == [
        ("https://shop.example.com/checkout", "eu-west-1")
    ]
    params = suite.parameters(regions=["us-east-1"])
    assert params["options"] == {"maxConcurrency": 4}
    assert [job["region"] for job in params["jobs"]] == ["us-east-1"]


def test_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "bad.toml",
        'schedule = { cron = "not a cron" }\n[[jobs]]\nurl = "ftp://x"\nrunners = []\n',
    )
    write(tmp_path, "worse.toml", "jobs = [")
    with pytest.raises(SuiteError) as caught:
        load_suites(tmp_path)
    message = str(caught.value)
    assert f"{bad}: schedule.cron: 'not a cron' is not a cron expression" in message
    assert f"{bad}: jobs[0].url: Invalid URL: scheme 'ftp'" in message
    assert f"{bad}: jobs[0].runners:" in message
    assert "worse.toml: not valid TOML" in message


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ('{ interval = "5m", cron = "* * * * *" }', "give exactly one of cron or interval"),
        ('{ interval = "soon" }', "'soon' is not a duration"),
        ('{ cron = "* * * * *", timezone = "Mars/Olympus" }', "not an IANA time zone"),
    ],
)
def test_bad_schedules_are_refused(tmp_path: Path, schedule: str, expected: str) -> None:
    write(
        tmp_path,
        "s.toml",
        f'schedule = {schedule}\n[[jobs]]\nurl = "http://a.test/"\nrunners = ["x"]\n',
    )
    with pytest.raises(SuiteError, match=expected):
        load_suites(tmp_path)


def test_a_check_key_is_stable_and_distinct() -> None:
    key = check_key("https://a.test/", "pageHasTitle", "us-east-1")
    assert key == check_key("https://a.test/", "pageHasTitle", "us-east-1")
    assert len(key) == 16
    assert key != check_key("https://a.test/", "pageHasTitle", None)


def test_a_scan_keeps_the_valid_suites_and_reports_the_broken_one_per_line(tmp_path: Path) -> None:
    write(tmp_path, "shop.toml", SHOP)
    broken = write(tmp_path, "blog.toml", 'schedule = { interval = "soon" }\njobs = []\n')
    scan = scan_suites(tmp_path)
    assert list(scan.suites) == ["shop"]
    assert scan.broken == {"blog"}
    assert scan.problems == [
        f"{broken}: schedule.interval: 'soon' is not a duration; write 30s, 5m, 1h or a number "
        "of seconds",
        f"{broken}: jobs: List should have at least 1 item after validation, not 0",
    ]
    with pytest.raises(SuiteError):
        scan.raise_problems()


def test_schedules_in_prefects_terms(tmp_path: Path) -> None:
    write(tmp_path, "shop.toml", SHOP)
    schedule = load_suites(tmp_path)["shop"].schedule
    assert schedule is not None
    assert schedule.describe() == "every 5m (Europe/Berlin)"
    assert schedule.to_prefect_yaml() == {
        "interval": 300,
        "anchor_date": "2020-01-01T00:00:00+01:00",
        "timezone": "Europe/Berlin",
    }
    prefect = schedule.to_prefect()
    assert prefect.anchor_date == datetime(2019, 12, 31, 23, tzinfo=UTC)  # midnight in Berlin
    assert prefect.interval == timedelta(minutes=5)
    assert prefect.timezone == "Europe/Berlin"


def test_the_package_root_exports_monitoring_without_importing_it_early() -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = (
        "import sys, runners_orchestrator as r\n"
        "assert 'runners_orchestrator.monitoring' not in sys.modules\n"
        "from runners_orchestrator.monitoring import load_suites\n"
        "assert r.load_suites is load_suites\n"
        "assert {'Suite', 'SuiteError', 'HistoryStore', 'check_key'} <= set(r.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
