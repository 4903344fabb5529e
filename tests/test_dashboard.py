"""The dashboard at ``GET /`` in a real browser: headless Debian Chromium driven by Playwright.

The real servers run in-process (tests/inproc.py) with a tokens file; known
customer-service events go in through ``POST /v1/events`` over two periods,
and the page must show exactly the totals those events make, per panel, for
two date ranges and two time zones, beside the previous period. It must
also show the API's own error messages (no token, from after to), keep the
token across a reload, and load nothing from outside the server (no CDN).
Tag values are text: markup in an agent's name is drawn as its characters,
never as markup, and a long one stays inside its panel.

The browser is the system's Chromium (``apt-get install chromium``; CI
installs it in .ci/run), never one Playwright downloads. Screenshots go to
the test's tmp_path and their paths are printed (``pytest -s``).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from inproc import InProcessTally, tokens_file
from playwright.sync_api import Browser, Page, sync_playwright

from tally.api.access import parse_access

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is absent: apt-get install -y chromium (.ci/run does)",
)

TENANT = "acme-support"
HOSTILE_TENANT = "hostile-names"  # tag values that look like markup, and long ones
QUERY_SECRET = "dashboard-query-0123456789"
INGEST_SECRET = "dashboard-ingest-0123456789"
TOKENS = tokens_file(
    ("dashboard", QUERY_SECRET, [TENANT, HOSTILE_TENANT], ["query"]),
    ("loader", INGEST_SECRET, [TENANT, HOSTILE_TENANT], ["ingest"]),
)
BROWSER_ZONE = "America/New_York"
TODAY = datetime.now(UTC).date()
AGENTS = ("ann", "bob", "cy", "dee")
CHANNELS = ("email", "chat", "twitter")
SENTIMENTS = ("positive", "neutral", "negative")
RESPONSE_SECONDS = (300, 1200, 1800, 2700, 5400, 10800, 20000, 50000, 90000, 200000)
BUCKET_ORDER = ("lt_30m", "lt_1h", "lt_4h", "lt_24h", "gt_24h")
WAIT_MS = 20_000


def bucket(seconds: int) -> str:
    """The built-in rule's buckets, as the README states them (an edge goes above)."""
    for edge, name in ((1800, "lt_30m"), (3600, "lt_1h"), (14400, "lt_4h"), (86400, "lt_24h")):
        if seconds < edge:
            return name
    return "gt_24h"


@dataclass(frozen=True)
class Events:
    """What the test sends: one (day, channel, sentiment) per message received and one
    (day, agent, seconds) per reply, every one at or after noon UTC on a past day (so the
    same local day in every zone the test uses)."""

    received: list[tuple[date, str, str]]
    replied: list[tuple[date, str, int]]

    @classmethod
    def make(cls, days: int = 32) -> Events:
        rng = random.Random(6)
        received, replied = [], []
        for back in range(1, days + 1):
            day = TODAY - timedelta(days=back)
            for _ in range(rng.randint(2, 14)):
                sentiment = rng.choices(SENTIMENTS, weights=(5, 3, 2))[0]
                received.append((day, rng.choice(CHANNELS), sentiment))
            for _ in range(rng.randint(1, 7)):
                replied.append((day, rng.choice(AGENTS), rng.choice(RESPONSE_SECONDS)))
        return cls(received, replied)

    def as_json(self) -> list[dict[str, Any]]:
        def ts(day: date, n: int) -> int:
            noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
            return int(noon.timestamp()) + 60 * (n % 60)

        out: list[dict[str, Any]] = []
        for n, (day, channel, sentiment) in enumerate(self.received):
            out.append({"type": "message.received", "tenant": TENANT, "ts": ts(day, n),
                        "channel": channel, "sentiment": sentiment})
        for n, (day, agent, seconds) in enumerate(self.replied):
            out.append({"type": "message.replied", "tenant": TENANT, "ts": ts(day, n),
                        "agent": agent, "channel": "email", "response_seconds": seconds})
        return out

    def expected(self, first: date, last: date) -> dict[str, Any]:
        """Every figure the dashboard shows for first..last, computed from the events."""
        n = (last - first).days + 1
        previous_first = first - timedelta(days=n)
        per_day = Counter(day for day, _, _ in self.received)
        points = [per_day[first + timedelta(days=i)] for i in range(n)]
        previous = [per_day[previous_first + timedelta(days=i)] for i in range(n)]
        replies = [(agent, s) for day, agent, s in self.replied if first <= day <= last]
        seconds_by_agent: dict[str, list[int]] = defaultdict(list)
        for agent, s in replies:
            seconds_by_agent[agent].append(s)
        total, previous_total = sum(points), sum(previous)
        return {
            "points": points,
            "previous": previous,
            "total": total,
            "previous_total": previous_total,
            "change": (total - previous_total) / previous_total,
            "handled": Counter(agent for agent, _ in replies),
            "buckets": [(b, Counter(bucket(s) for _, s in replies)[b]) for b in BUCKET_ORDER],
            "sentiment": Counter(s for day, _, s in self.received if first <= day <= last),
            "replies": len(replies),
            "average": sum(s for _, s in replies) / len(replies),
            "average_by_agent": {a: sum(v) / len(v) for a, v in seconds_by_agent.items()},
        }


@pytest.fixture(scope="module")
def events() -> Events:
    return Events.make()


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory, events: Events) -> Iterator[InProcessTally]:
    server = InProcessTally(
        tmp_path_factory.mktemp("dashboard"), access=parse_access(TOKENS)
    ).start()
    sent = events.as_json()
    r = httpx.post(server.url + "/v1/events", json={"events": sent},
                   headers={"Authorization": f"Bearer {INGEST_SECRET}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == len(events.received) + 4 * len(events.replied)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"],
                                     headless=True)
        yield chromium
        chromium.close()


def wait_for_query(page: Page, state: str, **query: str) -> None:
    """Until the page has drawn the answers to exactly this query (earlier loads it
    superseded are dropped by the page) and is in ``state`` (ready or error)."""
    page.wait_for_function(
        """([state, query]) => document.body.dataset.state === state &&
            Object.entries(query).every(([k, v]) => document.body.dataset[k] === v)""",
        arg=[state, query], timeout=WAIT_MS,
    )


def rows(page: Page, table: str) -> list[tuple[str, int]]:
    found = page.eval_on_selector_all(
        f"#{table} tbody tr", "trs => trs.map(tr => [tr.dataset.value, Number(tr.dataset.total)])"
    )
    return [(value, total) for value, total in found]


def attr(page: Page, selector: str, name: str) -> str | None:
    return page.get_attribute(selector, name)


def check_figures(page: Page, want: dict[str, Any]) -> None:
    """Every panel against the figures computed from the events sent."""
    # messages received per day, beside the previous period, and the change
    assert int(attr(page, "#panel-received", "data-total")) == want["total"]
    assert int(attr(page, "#received-total", "data-total")) == want["total"]
    assert int(attr(page, "#panel-received", "data-previous-total")) == want["previous_total"]
    assert float(attr(page, "#panel-received", "data-change")) == pytest.approx(want["change"])
    change = page.inner_text("#received-change")
    assert change == f"{want['change'] * 100:+.1f}% vs previous period", change
    drawn = page.evaluate("document.getElementById('chart-received').data.map(t => t.y)")
    assert drawn == [want["points"], want["previous"]]
    # messages handled per agent: largest first, each with its average response time
    agents = rows(page, "table-agents")
    assert dict(agents) == dict(want["handled"])
    assert [t for _, t in agents] == sorted((t for _, t in agents), reverse=True)
    assert int(attr(page, "#panel-agents", "data-total")) == sum(want["handled"].values())
    assert int(attr(page, "#handled-total", "data-total")) == sum(want["handled"].values())
    averages = page.eval_on_selector_all(
        "#table-agents tbody tr", "trs => trs.map(tr => [tr.dataset.value, tr.dataset.seconds])"
    )
    assert {a: float(s) for a, s in averages} == pytest.approx(want["average_by_agent"])
    # response-time buckets, in bucket order, zeros included
    assert rows(page, "table-response") == want["buckets"]
    assert int(attr(page, "#panel-response", "data-total")) == want["replies"]
    fast = dict(want["buckets"])["lt_30m"] + dict(want["buckets"])["lt_1h"]
    assert int(attr(page, "#fast-share", "data-fast")) == fast
    # sentiment
    assert dict(rows(page, "table-sentiment")) == dict(want["sentiment"])
    assert int(attr(page, "#panel-sentiment", "data-total")) == want["total"]
    # average response time: sum of response_seconds.sum / sum of response_seconds.count
    assert float(attr(page, "#avg-response", "data-seconds")) == pytest.approx(want["average"])
    assert int(attr(page, "#avg-response", "data-count")) == want["replies"]
    # every chart drawn by plotly.js, and no panel showing an error
    for chart in ("chart-received", "chart-agents", "chart-response", "chart-sentiment"):
        assert page.locator(f"#{chart} .main-svg").count() >= 1, chart
    assert page.locator(".status.error:visible").count() == 0
    assert page.is_hidden("#error")


def show(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"\ndashboard screenshot: {path}")


def test_dashboard_shows_exact_totals_and_the_previous_period(
    tally: InProcessTally, browser: Browser, events: Events, tmp_path: Path
) -> None:
    context = browser.new_context(timezone_id=BROWSER_ZONE,
                                  viewport={"width": 1440, "height": 1000})
    outside: list[str] = []

    def local_only(route: Any) -> None:
        """Offline: anything not from the tally server (a CDN, a font) is refused, noted."""
        if route.request.url.startswith(tally.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", local_only)
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    try:
        page.goto(tally.url + "/")

        # defaults: tenant demo, the browser's zone, the last 30 days there; no token yet,
        # and the server has tokens: the API's 401 message is shown, not swallowed
        today = datetime.now(ZoneInfo(BROWSER_ZONE)).date()
        wait_for_query(page, "error", tenant="demo", tz=BROWSER_ZONE, to=today.isoformat(),
                       **{"from": (today - timedelta(days=29)).isoformat()})
        assert page.input_value("#tenant") == "demo"
        assert page.input_value("#tz-select") == BROWSER_ZONE
        error = page.inner_text("#error")
        assert "401 unauthorized: a token is required" in error, error
        assert attr(page, "#error", "data-code") == "unauthorized"
        assert page.locator("#panel-received .status.error").is_visible()
        show(page, tmp_path / "dashboard-no-token.png")

        # tenant, token, a 14-day range, and a zone from the list
        first, last = TODAY - timedelta(days=14), TODAY - timedelta(days=1)
        page.fill("#tenant", TENANT)
        page.fill("#token", QUERY_SECRET)
        page.select_option("#tz-select", "Europe/London")
        page.fill("#from", first.isoformat())
        page.fill("#to", last.isoformat())
        page.click("#apply")
        wait_for_query(page, "ready", tenant=TENANT, tz="Europe/London", to=last.isoformat(),
                       **{"from": first.isoformat()})
        check_figures(page, events.expected(first, last))
        show(page, tmp_path / "dashboard-14-days.png")

        # another range, and a zone typed in: the numbers and the comparison follow
        first, last = TODAY - timedelta(days=7), TODAY - timedelta(days=1)
        page.select_option("#tz-select", "__other")
        page.fill("#tz-other", "Asia/Tokyo")
        page.fill("#from", first.isoformat())
        page.fill("#to", last.isoformat())
        page.click("#apply")
        query = {"tenant": TENANT, "tz": "Asia/Tokyo", "from": first.isoformat(),
                 "to": last.isoformat()}
        wait_for_query(page, "ready", **query)
        check_figures(page, events.expected(first, last))
        show(page, tmp_path / "dashboard.png")

        # the token is kept (localStorage) and the query is in the address: a reload
        # shows the same figures
        page.reload()
        wait_for_query(page, "ready", **query)
        assert page.input_value("#token") == QUERY_SECRET
        check_figures(page, events.expected(first, last))

        # a range the API refuses: its message, as the API words it
        page.fill("#from", last.isoformat())
        page.fill("#to", first.isoformat())
        page.click("#apply")
        wait_for_query(page, "error", tenant=TENANT, to=first.isoformat(),
                       **{"from": last.isoformat()})
        error = page.inner_text("#error")
        assert f"400 bad_request: from {last} is after to {first}" in error, error
    finally:
        context.close()
    assert outside == [], f"the page fetched from outside the server: {outside}"
    assert page_errors == [], page_errors


def test_page_and_assets_need_no_token_and_come_from_the_server(tally: InProcessTally) -> None:
    """/ and its assets hold no data: served without a token, while the API still asks."""
    page = httpx.get(tally.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("dashboard.js", "dashboard.css", "plotly.min.js"):
        r = httpx.get(f"{tally.url}/assets/{asset}")
        assert r.status_code == 200, asset
    plotly = httpx.get(tally.url + "/assets/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert plotly.headers["content-encoding"] == "gzip"
    assert plotly.text.lstrip().startswith("/**\n* plotly.js v")
    r = httpx.get(tally.url + "/assets/secrets.txt")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = httpx.get(tally.url + "/v1/catalog", params={"tenant": TENANT})
    assert r.status_code == 401


def test_the_dashboard_over_tally_demo_data_shows_what_demo_sent(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """`tally demo` into a running tally, then the page over the whole demo range in UTC:
    each panel's total is what demo reports it sent, and the last 30 days (the page's
    default) agree with the API's own answers."""
    from tally.cluster.demo import run_demo

    server = InProcessTally(tmp_path_factory.mktemp("demo")).start()
    context = browser.new_context(timezone_id="UTC", viewport={"width": 1440, "height": 1000})
    try:
        sent = run_demo(tcp_port=server.tcp_port, http_port=server.http_port, days=90,
                        seed=3, progress=False)
        totals = sent.totals
        page = context.new_page()
        page.goto(f"{server.url}/?tenant=demo&tz=UTC&from={sent.first_day}&to={sent.last_day}")
        wait_for_query(page, "ready", tenant="demo", tz="UTC", to=sent.last_day,
                       **{"from": sent.first_day})
        assert int(attr(page, "#received-total", "data-total")) == totals["messages.received"]
        assert int(attr(page, "#panel-sentiment", "data-total")) == totals["messages.received"]
        assert int(attr(page, "#handled-total", "data-total")) == totals["messages.handled"]
        assert sum(t for _, t in rows(page, "table-agents")) == totals["messages.handled"]
        assert int(attr(page, "#panel-response", "data-total")) == totals["response_time"]
        assert sum(t for _, t in rows(page, "table-response")) == totals["response_time"]
        assert float(attr(page, "#avg-response", "data-seconds")) == pytest.approx(
            totals["response_seconds.sum"] / totals["response_seconds.count"])
        assert [v for v, _ in rows(page, "table-response")] == list(BUCKET_ORDER)
        assert all(t > 0 for _, t in rows(page, "table-response"))  # demo fills every bucket

        # the default view (last 30 days, the browser's zone) against the API directly
        page.goto(f"{server.url}/?tenant=demo")
        today = datetime.now(UTC).date()
        first = (today - timedelta(days=29)).isoformat()
        wait_for_query(page, "ready", tenant="demo", tz="UTC", to=today.isoformat(),
                       **{"from": first})
        api = httpx.get(server.url + "/v1/series", params={
            "tenant": "demo", "metric": "messages.received", "from": first,
            "to": today.isoformat(), "compare": "previous_period"}).json()
        assert int(attr(page, "#received-total", "data-total")) == api["total"] > 0
        assert int(attr(page, "#panel-received", "data-previous-total")) == (
            api["compare"]["total"]) > 0
        drawn = page.evaluate("document.getElementById('chart-received').data.map(t => t.y)")
        assert drawn == [[v for _, v in api["points"]], [v for _, v in api["compare"]["points"]]]
        show(page, tmp_path / "dashboard-demo.png")
    finally:
        context.close()
        server.stop()


# Tag values a producer (or an end user naming themselves) might send. Plotly reads
# <b>, <a href>, <span style>, entities and $...$ in its text; none may act.
BOLD = "<b>bold</b>"
LINK = '<a href="https://example.com/x">click</a>'
IMG = '<img src=x onerror="window.__tallyScriptRan = true">'
STYLED = '<span style="font-size:40px">big</span>'
ENTITIES = "AT&amp;T &lt;3 &#60;i&#62;"
TEX = "$x^2$ team"
TEMPLATE = "%{x} of %{customdata}"  # a hover template's placeholders, in a value
LONG = "Maximiliana Papadopoulou-Vanderberg, night shift EMEA"
LONG_TOO = "Maximiliana Papadopoulou-Vanderberg, day shift APAC"  # the same first 35
# replies per agent and messages per sentiment: all different, so the order is known
HOSTILE_AGENTS = {LONG: 8, LINK: 7, BOLD: 6, IMG: 5, STYLED: 4, ENTITIES: 3, TEX: 2,
                  TEMPLATE: 1}
HOSTILE_SENTIMENTS = {LONG: 6, LONG_TOO: 5, BOLD: 4, LINK: 3, IMG: 2}
AXIS_CHARS, LEGEND_CHARS = 20, 22  # dashboard.js: longer values end in "…" there


def shorten(value: str, most: int) -> str:
    return value if len(value) <= most else value[: most - 1].rstrip() + "…"


def hover_text(page: Page, chart: str, x: float, y: float) -> str:
    """What plotly's hover label says with the mouse at (x, y). The mouse leaves the
    chart first and the previous label is seen gone, so the text read is the new one."""
    label = "chart => document.querySelector(`#${chart} .hoverlayer`).textContent"
    page.mouse.move(0, 0)
    page.wait_for_function(f"chart => ({label})(chart) === ''", arg=chart, timeout=WAIT_MS)
    page.mouse.move(x, y)
    page.wait_for_function(f"chart => ({label})(chart) !== ''", arg=chart, timeout=WAIT_MS)
    return page.evaluate(label, chart)


def inside(page: Page, selector: str, index: int) -> tuple[float, float]:
    """A point where the index-th element of selector is what the mouse would touch
    (a pie slice's box holds other slices and the hole)."""
    point = page.evaluate(
        """([selector, index]) => {
            const el = document.querySelectorAll(selector)[index];
            const box = el.getBoundingClientRect();
            for (let i = 1; i < 20; i++) {
              for (let j = 1; j < 20; j++) {
                const x = box.left + (box.width * i) / 20, y = box.top + (box.height * j) / 20;
                if (document.elementFromPoint(x, y) === el) return [x, y];
              }
            }
            return null;
        }""", [selector, index])
    assert point, f"no visible point of {selector} #{index}"
    return point[0], point[1]


def check_tables_fit(page: Page) -> None:
    """Each table, and each of its cells, inside its panel's padding; a label cut short
    is whole in its text and its title."""
    for panel in ("panel-agents", "panel-sentiment", "panel-response"):
        boxes = page.evaluate(
            """panel => {
                const p = document.getElementById(panel);
                const inner = p.getBoundingClientRect().right
                  - parseFloat(getComputedStyle(p).paddingRight);
                return [inner, [...p.querySelectorAll("table th, table td")]
                  .map((c) => [c.textContent, c.getBoundingClientRect().right])];
            }""", panel)
        inner, cells = boxes
        outside = [(text, right) for text, right in cells if right > inner + 0.5]
        assert not outside, f"{panel}: cells past the panel's edge {inner}: {outside}"
    labels = page.eval_on_selector_all(
        "#table-agents tbody tr td:first-child, #table-sentiment tbody tr td:first-child",
        "tds => tds.map(td => [td.textContent, td.title, td.scrollWidth > td.clientWidth])")
    for text, title, cut in labels:
        assert title == text, (title, text)
        if text in (LONG, LONG_TOO):
            assert cut, f"{text!r} is expected to be cut short with an ellipsis"


def test_tag_values_are_text_in_charts_and_tables(
    tally: InProcessTally, browser: Browser, tmp_path: Path
) -> None:
    """Agents and sentiments named like markup: the charts draw their characters (no bold,
    no link, no image, no script), the hover shows them whole, and the tables keep every
    column inside its panel with the long names whole in their title."""
    day = TODAY - timedelta(days=1)
    noon = int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp())
    sent = [{"type": "message.replied", "tenant": HOSTILE_TENANT, "ts": noon + i,
             "agent": agent, "channel": "chat", "response_seconds": 600 * (i + 1)}
            for agent, n in HOSTILE_AGENTS.items() for i in range(n)]
    sent += [{"type": "message.received", "tenant": HOSTILE_TENANT, "ts": noon + i,
              "channel": "chat", "sentiment": sentiment}
             for sentiment, n in HOSTILE_SENTIMENTS.items() for i in range(n)]
    r = httpx.post(tally.url + "/v1/events", json={"events": sent},
                   headers={"Authorization": f"Bearer {INGEST_SECRET}"}, timeout=30)
    assert r.status_code == 200, r.text

    context = browser.new_context(timezone_id="UTC", viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    try:
        page.goto(f"{tally.url}/?tenant={HOSTILE_TENANT}&tz=UTC&from={day}&to={day}")
        page.fill("#token", QUERY_SECRET)
        page.click("#apply")
        query = {"tenant": HOSTILE_TENANT, "tz": "UTC", "from": day.isoformat(),
                 "to": day.isoformat()}
        wait_for_query(page, "ready", **query)

        # the tables: every value as sent, largest first
        assert rows(page, "table-agents") == list(HOSTILE_AGENTS.items())
        assert rows(page, "table-sentiment") == list(HOSTILE_SENTIMENTS.items())
        firsts = page.eval_on_selector_all("#table-agents tbody td:first-child",
                                           "tds => tds.map(td => td.textContent)")
        assert firsts == list(HOSTILE_AGENTS)

        # the charts: no element made from a value's markup, anywhere in them
        charts = "#chart-agents, #chart-sentiment, #chart-response"
        for made in ("a", "img", "[style*='font-weight:bold']", "[style*='font-size:40px']",
                     "[class*='-math']"):
            found = page.locator(f":is({charts}) {made}").count()
            assert found == 0, f"{found} {made} element(s) drawn in the charts"
        # ...but their characters: the axis labels (long ones shortened), the legend
        ticks = page.eval_on_selector_all("#chart-agents .ytick text",
                                          "ts => ts.map(t => t.textContent)")
        assert ticks == [shorten(a, AXIS_CHARS) for a in HOSTILE_AGENTS]
        legend = page.eval_on_selector_all("#chart-sentiment .legendtext",
                                           "ts => ts.map(t => t.textContent)")
        # (the two long names begin alike: the second is told apart by a number)
        want = [shorten(v, LEGEND_CHARS) for v in HOSTILE_SENTIMENTS]
        want[1] = shorten(LONG_TOO, LEGEND_CHARS - 4) + " (2)"
        assert legend == want
        # ...and the hover label names each whole
        bars = page.locator("#chart-agents .point path")
        assert bars.count() == len(HOSTILE_AGENTS)
        for i, (agent, n) in enumerate(HOSTILE_AGENTS.items()):
            box = bars.nth(i).bounding_box()
            assert box is not None
            said = hover_text(page, "chart-agents", box["x"] + box["width"] / 2,
                              box["y"] + box["height"] / 2)
            assert said == f"{agent}: {n} handled", said
            assert page.locator("#chart-agents .hoverlayer a").count() == 0
        for i, (sentiment, n) in enumerate(HOSTILE_SENTIMENTS.items()):
            said = hover_text(page, "chart-sentiment", *inside(page, "#chart-sentiment .slice path",
                                                               i))
            assert said.startswith(f"{sentiment}: {n} ("), said
            assert page.locator("#chart-sentiment .hoverlayer a").count() == 0
        page.mouse.move(0, 0)
        assert page.evaluate("window.__tallyScriptRan") is None, "a tag value ran a script"

        # the tables stay inside their panels, on a wide screen and a narrower one
        check_tables_fit(page)
        show(page, tmp_path / "dashboard-hostile-names.png")
        page.set_viewport_size({"width": 1024, "height": 1000})
        # plotly redraws for the new width on a debounced resize event: ask it now and wait
        page.evaluate("Promise.all([...document.querySelectorAll('.js-plotly-plot')]"
                      ".map((gd) => Plotly.Plots.resize(gd)))")
        check_tables_fit(page)
        show(page, tmp_path / "dashboard-hostile-names-narrow.png")
        assert page.evaluate("window.__tallyScriptRan") is None, "a tag value ran a script"
    finally:
        context.close()
    assert page_errors == [], page_errors
