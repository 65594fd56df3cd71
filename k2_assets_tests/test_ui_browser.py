"""The Dagster UI in a real browser, as a person sees it.

Starts `dagster dev` on the embedded defaults (a fresh K2_HOME with `k2 demo-data`, the project's
dagster.yaml in a fresh DAGSTER_HOME), materializes the sample partitions into that instance (one ASX
session, two Binance days, the bars of two days; one Binance file lacks a run of 40 trade ids, so its
`no_unexplained_gaps` check fails), then drives headless Chromium (Debian's, through Playwright) to
the global asset lineage and to binance_trades_history's Checks tab. It asserts what is on screen:
every asset, the arrows between them (compared with the code location's own dependencies), the check
summaries on the graph's nodes, and the passed and failed checks; that every rule is a check of its own and
the live trades and 1-minute bars have freshness checks; and it re-runs one check alone on a stored partition
from the launchpad of `binance_checks_job`. It saves the screenshots the README shows, under docs/images/.

Chromium is installed by `bash scripts/get-chromium` (`make test` runs it); Playwright never downloads
a browser here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2_assets.dev.broker import free_port
from k2_assets_tests.dagster_ui import UI_TIMEOUT_MS, VIEWPORT, chromium_page, graphql, log_tail, wait_for_server

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
IMAGES = REPO / "docs" / "images"

# A process started from a non-interactive shell may inherit SIGINT and SIGTERM ignored, and dagster dev would
# then never stop: reset both (the dispositions survive exec) and become dagster dev.
RESTORE_SIGNALS_AND_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); signal.signal(signal.SIGTERM, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)

STARTUP_TIMEOUT = 120
SHUTDOWN_TIMEOUT = 30

ASX_SESSION = "2014-03-10"
BINANCE_DAYS = ("2024-01-01", "2024-01-02")  # the last one loaded has the hole: it is what the UI shows as latest
HOLE_FILE = "BTCUSDT-trades-2024-01-02.csv"
HOLE = 40  # trade ids removed from the middle of that file
FAILED_CHECK = "no_unexplained_gaps"
EXCHANGE_CHECK = "matches_exchange_bars"
LIVE_ONLY = {"binance_trades", "binance_um_trades"}

SENSORS = """
{ sensorsOrError(repositorySelector: {repositoryLocationName: "k2", repositoryName: "__repository__"}) {
    __typename ... on PythonError { message }
    ... on Sensors { results { name id sensorState { status ticks(limit: 1) { status } } } } } }
"""
STOP_SENSOR = """
mutation($id: String!) { stopSensor(id: $id) { __typename ... on StopSensorMutationResult { instigationState { status } }
                                                ... on PythonError { message } } }
"""

# The graph as drawn: each asset card (name = its first line, text = what the card says), and each arrow's
# two ends matched to the card they touch, in screen coordinates.
GRAPH_JS = """
() => {
  const cards = [...document.querySelectorAll('svg foreignObject')].filter(f => !f.classList.contains('group'))
    .map(f => f.querySelector('div')).filter(d => d && d.innerText.trim())
    .map(d => ({text: d.innerText.trim(), box: d.getBoundingClientRect()}))
    .map(c => ({...c, name: c.text.split('\\n')[0].trim()}));
  const point = (path, at) => {
    const p = path.getPointAtLength(at), m = path.getScreenCTM();
    return {x: p.x * m.a + p.y * m.c + m.e, y: p.x * m.b + p.y * m.d + m.f};
  };
  const touching = (pt) => {
    let best = null, distance = 1e9;
    for (const c of cards) {
      const b = c.box;
      const d = Math.hypot(Math.max(b.left - pt.x, 0, pt.x - b.right), Math.max(b.top - pt.y, 0, pt.y - b.bottom));
      if (d < distance) { distance = d; best = c.name; }
    }
    return distance < 40 ? best : null;
  };
  const arrows = [...document.querySelectorAll('svg path[marker-end]')]
    .map(p => [touching(point(p, 0)), touching(point(p, p.getTotalLength()))]);
  return {cards: Object.fromEntries(cards.map(c => [c.name, c.text])), arrows};
}
"""


def stop_sensors(port: int, log: Path) -> None:
    """Stop the sensors (as a person would on the Automation page), then wait for any tick in flight.

    With no broker the live sensor has nothing to drain, and the gap-repair sensor would ask the real
    exchange (unreachable here) to fill the hole this test makes: the screenshots show the loads alone.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        sensors = graphql(port, SENSORS)["sensorsOrError"]
        if sensors["__typename"] == "Sensors":
            break
        if time.monotonic() > deadline:  # the code location is still loading
            pytest.fail(f"the UI lists no sensors: {sensors}\n{log_tail(log)}")
        time.sleep(1)
    assert {s["name"] for s in sensors["results"]} >= {"binance_trades_sensor", "binance_gap_repair_sensor", "rollups_automation"}
    quiet_since = None
    while True:
        # A tick that starts as the stop lands writes back the state it read, RUNNING (Dagster's
        # mark_sensor_state_for_tick): like a person on the Automation page, stop again what still runs, until
        # all stay stopped, with no tick in flight, for two polls some seconds apart.
        running = [s for s in sensors["results"] if s["sensorState"]["status"] != "STOPPED"]
        for sensor in running:
            result = graphql(port, STOP_SENSOR, {"id": sensor["id"]})["stopSensor"]
            assert result["__typename"] == "StopSensorMutationResult", result
        states = [s["sensorState"] for s in sensors["results"]]
        if running or any(t["status"] == "STARTED" for s in states for t in s["ticks"]):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= 3:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"a sensor tick did not finish: {states}\n{log_tail(log)}")
        time.sleep(1)
        sensors = graphql(port, SENSORS)["sensorsOrError"]


def punch_hole(path: Path, count: int) -> list[int]:
    """Remove `count` consecutive trade ids from the middle of a Binance dump (no header row)."""
    lines = path.read_text().splitlines(keepends=True)
    middle = len(lines) // 2
    removed = lines[middle : middle + count]
    path.write_text("".join(lines[:middle] + lines[middle + count :]))
    return [int(line.split(",", 1)[0]) for line in removed]


def materialize_samples(hole: list[int]) -> None:
    """The sample partitions with their checks, run in this process against the instance dagster dev serves."""
    import dagster as dg

    from k2_assets.cli.common import run_selection
    from k2_assets.definitions import defs

    graph = defs.resolve_asset_graph()

    def run(assets, partition):
        keys = {dg.AssetKey(a) for a in assets}
        result = run_selection(keys, {c for c in graph.asset_check_keys if c.asset_key in keys}, partition, instance)
        assert result.success, partition
        return {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}

    with dg.DagsterInstance.get() as instance:
        checks = run(["asx_trades", "asx_quotes"], ASX_SESSION)
        assert all(e.passed for e in checks.values()), [n for n, e in checks.items() if not e.passed]
        for day in BINANCE_DAYS:
            checks = run(["binance_trades_history"], day)
            if day == BINANCE_DAYS[0]:  # the demo's day of USD-M futures trades
                futures = run(["binance_um_trades_history"], day)
                assert futures and all(e.passed for e in futures.values()), [n for n, e in futures.items() if not e.passed]
            run(["binance_klines"], day)  # the exchange's own bars, from the demo's kline dumps
        gaps = checks["binance_trades_history", FAILED_CHECK]
        assert not gaps.passed and gaps.metadata["failed_rows"].value >= len(hole) == HOLE
        assert [n for n, e in checks.items() if not e.passed] == [("binance_trades_history", FAILED_CHECK)]
        bars = ["ohlcv_1m", "ohlcv_5m", "ohlcv_1h", "ohlcv_1d"]
        # Bars of an ASX session and of a whole Binance day (spot and futures): every check passing, the exchange's too.
        for day in (ASX_SESSION, BINANCE_DAYS[0]):
            checks = run(bars, day)
            # matches_raw_trades x4, freshness, matches_exchange_bars, within_session_band
            assert len(checks) == 4 + 3 and all(e.passed for e in checks.values()), day
        assert checks["ohlcv_1m", EXCHANGE_CHECK].metadata["bars_compared"].value > 2 * 1400


def expected_lineage() -> tuple[set[str], set[tuple[str, str]], dict[str, list[str]]]:
    """Asset names, dependency edges and check names, from the code location itself."""
    from k2_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    names, edges = set(), set()
    for key in graph.get_all_asset_keys():
        names.add(key.path[-1])
        for parent in graph.get(key).parent_keys:
            edges.add((parent.path[-1], key.path[-1]))
    checks: dict[str, list[str]] = {}
    for check_key in graph.asset_check_keys:
        checks.setdefault(check_key.asset_key.path[-1], []).append(check_key.name)
    return names, edges, checks


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C to dagster dev's process group; whatever is left after the grace period is killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def poll(page, read, done, timeout: float = UI_TIMEOUT_MS / 1000):
    """Read what the page shows until `done(seen)` holds (the UI fills in as its queries answer); the last reading either way."""
    deadline = time.monotonic() + timeout
    seen = read(page)
    while not done(seen) and time.monotonic() < deadline:
        page.wait_for_timeout(500)
        seen = read(page)
    return seen


def test_ui_shows_the_asset_graph_and_checks_in_chromium(tmp_path, monkeypatch):
    home, dagster_home = tmp_path / "k2", tmp_path / "dagster"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")  # as `k2 demo` does
    port = free_port()
    # No broker and no exchange in this test: both point at closed loopback ports (never the network).
    overrides = {
        "K2_HOME": str(home),
        "K2_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "K2_BINANCE_REST_URL": f"http://127.0.0.1:{free_port()}",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("K2_", "DAGSTER_"))}
    env |= overrides | {"DAGSTER_HOME": str(dagster_home)}
    log = tmp_path / "dagster-dev.log"

    # This process materializes into the same instance and catalog, with the same embedded defaults.
    from k2_assets.core.settings import apply_defaults

    resolved = dict(overrides)
    apply_defaults(resolved)
    for name in [n for n in os.environ if n.startswith("K2_")]:
        monkeypatch.delenv(name)
    for name, value in (resolved | {"DAGSTER_HOME": str(dagster_home)}).items():
        monkeypatch.setenv(name, value)

    dev = [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", RESTORE_SIGNALS_AND_EXEC, *dev],
            env=env,
            cwd=dagster_home,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # The demo vendor files, written by the real command while the UI starts.
        subprocess.run([str(BIN / "k2"), "demo-data"], env=env, cwd=tmp_path, check=True, capture_output=True)
        hole = punch_hole(home / "data" / "binance" / HOLE_FILE, HOLE)
        wait_for_server(port, process, log, what="dagster dev", timeout=STARTUP_TIMEOUT)
        stop_sensors(port, log)
        materialize_samples(hole)
        graphql(port, "mutation { setNuxSeen }")  # the one-time "join the community" dialog, as if dismissed
        names, edges, checks = expected_lineage()

        with chromium_page(tmp_path, log) as page:
            check_graph(page, port, names, edges, checks)
            check_checks_tab(page, port, checks["binance_trades_history"])
            check_standalone_and_freshness_checks(page, port, checks)
            check_exchange_bars(page, port)
            rerun_one_check(page, port)
    finally:
        stop(process)


def check_graph(page, port: int, names: set[str], edges: set[tuple[str, str]], checks: dict[str, list[str]]) -> None:
    page.goto(f"http://127.0.0.1:{port}/asset-groups")
    page.get_by_text("Global asset lineage").first.wait_for()
    page.get_by_text("Materialize all").first.wait_for()  # the graph has loaded (its groups, folded)
    page.get_by_text("Hide navigation").click()
    page.keyboard.press("Alt+e")  # "Expand all groups" (⌥E)

    def settled(graph) -> bool:
        cards = graph["cards"]
        return names <= cards.keys() and all(
            re.search(r"\d+ / \d+ Passed", cards[asset]) for asset in checks if asset not in LIVE_ONLY
        )

    graph = poll(page, lambda p: p.evaluate(GRAPH_JS), settled)
    cards = graph["cards"]
    assert names <= cards.keys(), f"assets missing from the graph: {sorted(names - cards.keys())}"
    drawn = {tuple(arrow) for arrow in graph["arrows"]}
    assert drawn == edges, f"arrows drawn {sorted(drawn)} != dependencies {sorted(edges)}"
    # What each card says about its checks (the asset that failed one shows it).
    for asset, asset_checks in checks.items():
        if asset in LIVE_ONLY:  # never materialized here
            continue
        n = len(asset_checks)
        passed = n - 1 if asset == "binance_trades_history" else n
        assert f"{passed} / {n} Passed" in cards[asset], (asset, cards[asset])
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] - 5)  # no tooltip in the picture
    page.screenshot(path=IMAGES / "asset-graph.png")


def check_checks_tab(page, port: int, asset_checks: list[str]) -> None:
    page.goto(f"http://127.0.0.1:{port}/assets/binance_trades_history?view=checks")
    page.get_by_text(f"Checks ({len(asset_checks)})").wait_for()
    rows = page.locator('[class*="checkRow"]')  # the list on the left: each row a check's name and its latest status

    def read(page_) -> dict[str, str]:
        shown = {}
        for text in rows.all_inner_texts():
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            shown[lines[0]] = lines[-1]
        return shown

    expected = {name: "Failed" if name == FAILED_CHECK else "Succeeded" for name in asset_checks}
    shown = poll(page, read, lambda seen: seen == expected)
    assert shown == expected

    page.get_by_text(FAILED_CHECK, exact=True).first.click()
    page.wait_for_url(re.compile(rf"checkDetail={FAILED_CHECK}"))
    # The check's own page: its description, and its latest evaluation failed with the rows it counted.
    page.get_by_text("Latest execution").wait_for()
    page.get_by_text("Evaluation result").wait_for()
    page.get_by_text("every missing sequence number is explained").wait_for()
    failed_rows = page.get_by_role("row").filter(has=page.get_by_role("cell", name="failed_rows", exact=True))
    assert int(failed_rows.inner_text().split()[-1]) >= HOLE, failed_rows.inner_text()
    assert page.get_by_text("Failed", exact=True).count() >= 2  # in the list and as the evaluation result
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=IMAGES / "asset-checks.png")


def check_standalone_and_freshness_checks(page, port: int, checks: dict[str, list[str]]) -> None:
    """Every rule is a check of its own in the UI, and the live trades and the 1-minute bars have freshness checks."""
    for asset in ("binance_trades", "ohlcv_1m"):
        page.goto(f"http://127.0.0.1:{port}/assets/{asset}?view=checks")
        page.get_by_text(f"Checks ({len(checks[asset])})").wait_for()
        rows = page.locator('[class*="checkRow"]')
        shown = poll(
            page,
            lambda p, rows=rows: {t.split()[0] for t in rows.all_inner_texts() if t.strip()},
            lambda seen, asset=asset: seen == set(checks[asset]),
        )
        assert shown == set(checks[asset]) and "freshness_check" in shown, (asset, shown)


def check_exchange_bars(page, port: int) -> None:
    """K2's bars proven against the exchange's own: the check's page shows its latest evaluation passed, and what it compared."""
    page.goto(f"http://127.0.0.1:{port}/assets/ohlcv_1m?view=checks&checkDetail={EXCHANGE_CHECK}")
    page.get_by_text("Latest execution").wait_for()
    page.get_by_text("every complete minute the exchange published equals K2's bar", exact=False).first.wait_for()
    compared = page.get_by_role("row").filter(has=page.get_by_role("cell", name="bars_compared", exact=True))
    poll(page, lambda p: compared.count(), lambda n: n > 0)
    assert int(compared.first.inner_text().split()[-1]) > 2 * 1400, compared.first.inner_text()
    mismatched = page.get_by_role("row").filter(has=page.get_by_role("cell", name="minutes_mismatched", exact=True))
    assert mismatched.first.inner_text().split()[-1] == "0"
    rows = page.locator('[class*="checkRow"]')
    status = poll(
        page,
        lambda p: [t for t in rows.all_inner_texts() if t.strip().startswith(EXCHANGE_CHECK)],
        lambda seen: bool(seen) and seen[0].strip().splitlines()[-1].strip() == "Succeeded",
    )
    assert status and status[0].strip().splitlines()[-1].strip() == "Succeeded", status
    page.screenshot(path=IMAGES / "exchange-bars-check.png")


def rerun_one_check(page, port: int) -> None:
    """Re-run one check alone on a stored partition from the UI: the checks job's launchpad, one op, the partition as a tag."""
    import dagster as dg

    day, check = BINANCE_DAYS[-1], "price_positive"
    page.goto(f"http://127.0.0.1:{port}/locations/k2/jobs/binance_checks_job/playground")
    page.get_by_text("Launch Run").wait_for()
    subset = page.get_by_placeholder(re.compile("Type an op subset"))
    op = f"binance_trades_history_{check}"
    subset.click()
    subset.press("Control+a")
    subset.press_sequentially(op, delay=10)
    subset.press("Enter")
    # The launchpad lists the ops the run will execute: this one alone.
    ops = page.locator("text=/^binance_trades(_history)?_[a-z_]+$/")
    poll(page, lambda p: sorted(set(ops.all_inner_texts()) - {op}), lambda rest: not rest)
    page.get_by_role("button", name="Edit tags").click()
    page.get_by_placeholder("Tag Key").fill("dagster/partition")
    page.get_by_placeholder("Tag Value").fill(day)
    page.get_by_role("button", name="Apply").click()
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)

    with dg.DagsterInstance.get() as instance:
        deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
        while not (run := instance.get_run_by_id(run_id)).is_finished and time.monotonic() < deadline:
            time.sleep(1)
        page.get_by_text("Success", exact=True).first.wait_for()  # the run page says so too
        page.screenshot(path=IMAGES / "check-rerun.png")
        assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags["dagster/partition"] == day
        events = instance.all_logs(run_id)
        evaluations = [
            e.dagster_event.event_specific_data
            for e in events
            if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ]
        assert [(e.asset_key.to_user_string(), e.check_name, e.partition, e.passed) for e in evaluations] == [
            ("binance_trades_history", check, day, True)
        ]
        assert not [
            e for e in events if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
        ]
