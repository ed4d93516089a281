"""`gateway report --html FILE` (issue 19, "a report people look at"): the page
opened in a real headless Chromium (Debian's chromium and chromium-driver,
tests/system-packages.sh) through selenium; no console errors, the plotly
charts drawn, and every number it shows equal to what `gateway stats --json`
prints for the same period (and, for each week, for that week).

The tickets are real: mail through the gateway's own intake (the rules stage,
the staff notification, an agent's answer quoting its token), each at a fixed
date of November 2025 standing in for the clock, as `run-due --now` does.
The screenshot is kept in tests/artifacts/ (GATEWAY_TEST_ARTIFACTS to put it
elsewhere); its path is printed.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from conftest import STAFF, SUPPORT, GatewayProc, Sink, mail

from gateway.desk import stats

ARTIFACTS = Path(os.environ.get("GATEWAY_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")

# (created, customer, subject, body, staff answer after (hours) or None, staff commands)
# Saturday 1 November starts the month in ISO week 44: the first week is cut to the month.
NOVEMBER = [
    (datetime(2025, 11, 1, 10, 0), "ann", "Backup fails", "Product: Agent\nBackup fails with 0x80040115.",
     50, "#status resolved"),
    (datetime(2025, 11, 3, 9, 30), "bob", "Cannot log in", "Product: Portal\nLogin fails for every user.",
     0.5, "#status resolved"),
    (datetime(2025, 11, 4, 11, 0), "cho", "Restore is slow",
     "Product: Agent\nThe restore of our file server takes hours.", 1, ""),
    (datetime(2025, 11, 11, 14, 0), "dan", "Backup job missing", "Product: Agent\nThe nightly backup did not run.",
     54, "#escalate\n#status resolved"),
    (datetime(2025, 11, 12, 9, 15), "eve", "Login page error", "Product: Portal\nThe login page shows an error.",
     0.25, "#status resolved"),
    (datetime(2025, 11, 19, 10, 0), "fay", "Dashboard very slow", "The dashboard takes a minute to load.",
     2, "#status closed"),
    (datetime(2025, 11, 25, 13, 0), "gus", "Backup to cloud fails", "Product: Agent\nBackup to cloud fails.",
     None, ""),
    (datetime(2025, 11, 26, 8, 0), "hal", "Restore of one mailbox", "Product: Mail\nHow do I restore one mailbox?",
     4, "#status resolved"),
    # outside the month: counted by a report without a period, not by --month 2025-11
    (datetime(2025, 12, 2, 10, 0), "ivy", "Backup fails again", "Product: Agent\nBackup fails.", 1, ""),
]

# every customer on the plan with business-hour first-response targets (P1 3 h, P2 6 h, P3 9 h)
PLAN = '[rules]\ndefault_plan = "professional"\n'


def build_desk(gw: GatewayProc) -> None:
    """The tickets of NOVEMBER, in the store `gw` is configured with: each mail at its
    date, the agent's answer to the staff notification hours later, and the scheduler
    every morning at 09:00 UTC (breach notices, reminders, auto-closes, closes)."""
    from gateway.app import open_gateway
    from gateway.config import load
    from gateway.desk.pipeline import Received

    async def scenario() -> None:
        config = load(str(gw.config))
        now = [datetime(2025, 11, 1, tzinfo=UTC)]
        g = await open_gateway(config, clock=lambda: now[0])
        box = config.mailboxes[0]
        events: list[tuple[datetime, int, Any]] = [(datetime(2025, 11, 1, 9, tzinfo=UTC) + timedelta(days=d), 2, None)
                                                   for d in range(40)]
        events += [(created.replace(tzinfo=UTC), 0, n) for n, (created, *_) in enumerate(NOVEMBER)]
        ids: dict[int, int] = {}
        try:
            while events:
                events.sort(key=lambda e: (e[0], e[1]))
                at, kind, n = events.pop(0)
                now[0] = at
                if kind == 2:
                    await g.scheduler.run_due(at)
                    continue
                _, who, subject, body, after, commands = NOVEMBER[n]
                if kind == 0:
                    customer = f"{who}@customer.example"
                    out = await g.intake.receive(Received(mail(customer, SUPPORT, subject, body).as_bytes(),
                                                          customer, (SUPPORT,), box, at))
                    assert out.action == "created", out
                    ids[n] = out.ticket_id
                    if after is not None:
                        events.append((at + timedelta(hours=after), 1, n))
                    continue
                note = next(m for m in await g.store.messages(ids[n]) if m["kind"] == "staff_notify")
                answer = mail(STAFF, SUPPORT, f"Re: {note['subject']}", f"{commands}\nWe are on it.".lstrip(),
                              msgid=make_msgid(domain="staff.example.com"))
                answer["In-Reply-To"] = answer["References"] = note["message_id"]
                out = await g.intake.receive(Received(answer.as_bytes(), STAFF, (SUPPORT,), box, at))
                assert out.action == "joined" and out.ticket_id == ids[n], out
        finally:
            await g.close()
    asyncio.run(scenario())


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    """A gateway's store holding the tickets of NOVEMBER (its `serve` is not needed)."""
    relay, gov = Sink(), Sink()
    gw = GatewayProc(tmp_path_factory.mktemp("report"), relay, gov, extra_toml=PLAN)
    try:
        build_desk(gw)
        yield gw
    finally:
        relay.stop()
        gov.stop()


def stats_json(gw: GatewayProc, *period: str) -> dict[str, Any]:
    r = gw.cli("stats", "--json", *period)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def run_report(gw: GatewayProc, out: Path, *period: str) -> dict[str, Any]:
    r = gw.cli("report", "--html", str(out), *period)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's chromium through its chromedriver (tests/system-packages.sh installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "chromium and chromium-driver are not installed: run tests/system-packages.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def cells(row: Any) -> dict[str, Any]:
    """A table row's figures: data-key -> (JSON value, text shown)."""
    from selenium.webdriver.common.by import By
    return {td.get_attribute("data-key"): (json.loads(td.get_attribute("data-value")), td.text.strip())
            for td in row.find_elements(By.CSS_SELECTOR, "td[data-key]")}


def looks_like(key: str, value: Any) -> str:
    """How a figure must read on the page: durations as `gateway stats` prints them."""
    if key.endswith("_s"):
        return stats.duration(value)
    if key.endswith("_share"):
        return "-" if value is None else f"{round(value * 100)}%"
    return str(value)


def test_the_report_in_chromium_draws_the_charts_and_shows_the_stats_figures(desk: GatewayProc, chromium: Any,
                                                                            tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    out = tmp_path / "november.html"
    said = run_report(desk, out, "--month", "2025-11")
    assert said["tickets"] == 8 and said["weeks"] == 5 and said["html"] == str(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    want = stats_json(desk, "--month", "2025-11")
    assert want["tickets"] == 8 and want["targets_missed"] >= 2 and want["escalated_excluded"] == 1

    chromium.get(out.as_uri())
    # plotly has drawn each of the four charts (its traces in the SVG of each plot div)
    WebDriverWait(chromium, 15).until(lambda d: len(plots := d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) == 4
                                      and all(p.find_elements(By.CSS_SELECTOR, ".main-svg .trace") for p in plots))
    plots = [p.get_attribute("id") for p in chromium.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")]
    assert plots == ["chart-category", "chart-product", "chart-times", "chart-targets"]
    # one file, no network: nothing but the page itself was loaded
    loaded = chromium.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [u for u in loaded if not u.startswith(("data:", "file:"))] == []

    # the period: every figure equals `stats --json`, and reads as `stats` prints it
    summary = {tr.get_attribute("data-key"): cells(tr)[tr.get_attribute("data-key")]
               for tr in chromium.find_elements(By.CSS_SELECTOR, "#summary tr")}
    assert len(summary) >= 15
    for key, (value, text) in summary.items():
        assert value == want[key], key
        assert text == looks_like(key, value), key
    assert json.loads(chromium.find_element(By.ID, "open-now").get_attribute("data-value")) == want["open_now"]
    assert chromium.find_element(By.ID, "month-line").text == want["summary"]
    for part in ("category", "product"):
        rows = chromium.find_elements(By.CSS_SELECTOR, f"#by-{part} tbody tr")
        assert [r.get_attribute("data-name") for r in rows] == list(want[f"by_{part}"])
        for r in rows:
            assert {k: v for k, (v, _) in cells(r).items()} == \
                {k: want[f"by_{part}"][r.get_attribute("data-name")][k] for k in cells(r)}

    # each week: its figures are `stats --json` for that week (the first one cut to the month)
    weeks = chromium.find_elements(By.CSS_SELECTOR, "#weekly tbody tr")
    spans = [(w.get_attribute("data-since"), w.get_attribute("data-until")) for w in weeks]
    assert spans[0] == ("2025-11-01T00:00:00+00:00", "2025-11-03T00:00:00+00:00")
    assert spans[-1][1] == "2025-12-01T00:00:00+00:00"
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    per_week = [stats_json(desk, "--since", since, "--until", until) for since, until in spans]
    for row, figures in zip(weeks, per_week, strict=True):
        shown = cells(row)
        assert len(shown) >= 10
        for key, (value, text) in shown.items():
            assert value == figures[key], (row.get_attribute("data-week"), key)
            assert text == looks_like(key, value)
    assert sum(f["opened"] for f in per_week) == want["opened"]
    charted = chromium.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.js-plotly-plot')].map(p =>"
        " [p.id, p.data.map(t => [t.name, Array.from(t.y)])]))")
    for part in ("category", "product"):
        table = chromium.find_elements(By.CSS_SELECTOR, f"#weekly-{part} tbody tr")
        for name in want[f"by_{part}"]:
            column = [int(r.find_element(By.CSS_SELECTOR, f"td[data-name='{name}']").text) for r in table]
            assert column == [f[f"by_{part}"].get(name, {}).get("opened", 0) for f in per_week], (part, name)
            assert [name if name != "-" else "(none)", column] in charted[f"chart-{part}"]
    assert ["met", [f["targets_met"] for f in per_week]] in charted["chart-targets"]
    assert ["missed", [f["targets_missed"] for f in per_week]] in charted["chart-targets"]
    hours = dict(charted["chart-times"])["first response, average"]
    assert hours == [None if f["first_response_avg_s"] is None else pytest.approx(f["first_response_avg_s"] / 3600)
                     for f in per_week]

    # no console errors, and a picture of the whole page for people to look at
    assert [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"] == []
    chromium.set_window_size(1280, chromium.execute_script("return document.documentElement.scrollHeight"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-2025-11.png"
    assert chromium.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot of the report: {shot}")


def test_a_report_without_a_period_covers_every_week_with_tickets(desk: GatewayProc, tmp_path: Path) -> None:
    from lxml import html
    out = tmp_path / "all.html"
    said = run_report(desk, out)
    want = stats_json(desk)
    assert said["tickets"] == want["tickets"] == len(NOVEMBER) and said["weeks"] == 6   # 2025-W44 to W49
    page = html.parse(str(out)).getroot()
    for td in page.xpath("//table[@id='summary']//td[@data-key]"):
        assert json.loads(td.get("data-value")) == want[td.get("data-key")]
    weeks = page.xpath("//table[@id='weekly']/tbody/tr")
    assert [w.get("data-week") for w in weeks] == [f"2025-W{n}" for n in range(44, 50)]
    assert weeks[0].get("data-since") == "2025-10-27T00:00:00+00:00"        # whole weeks: no period to cut to
    assert weeks[-1].get("data-until") == "2025-12-08T00:00:00+00:00"
    # plotly.js is in the file once; no script or style comes from elsewhere
    assert len([s for s in page.iter("script") if "plotly.js v" in (s.text or "")[:2000]]) == 1
    assert not page.xpath("//script[@src] | //link[@rel='stylesheet']")


def test_report_replaces_the_file_atomically_and_privately(desk: GatewayProc, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("an old report")
    out.chmod(0o644)
    run_report(desk, out, "--since", "2025-11-10", "--until", "2025-11-17")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "js-plotly-plot" in out.read_text() or "plotly-graph-div" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]      # no temporary file left


@pytest.mark.parametrize(("args", "status", "said"), [
    (["--month", "2025-13"], 64, "--month"),
    (["--month", "2025-11", "--since", "2025-11-02"], 64, "--month"),
    (["--since", "last tuesday"], 64, "--since"),
    (["--html-dir-missing"], 73, "no such directory"),
])
def test_report_exit_codes(desk: GatewayProc, tmp_path: Path, args: list[str], status: int, said: str) -> None:
    out = tmp_path / "r.html"
    if args == ["--html-dir-missing"]:
        out, args = tmp_path / "nowhere" / "r.html", []
    r = desk.cli("report", "--html", str(out), *args)
    assert (r.returncode, said in r.stderr, out.exists()) == (status, True, False), r.stderr
