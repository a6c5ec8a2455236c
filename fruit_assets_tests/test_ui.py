"""End to end through the Dagster UI: `dagster dev` on a free loopback port, driven by headless Chromium.

`dagster dev` runs on the instance of the demo run (the session fixture `demo`, shared with test_quiet),
as a newcomer opens it after the demo: the first test finds the demo's materializations and plots. The
second opens the asset lineage, checks the four assets and their edges, clicks "Materialize all", waits
for the run to succeed and opens the pca_model asset page. Artifacts go to `test-artifacts/` (repo root,
gitignored): asset_graph.png (before the run), run_success.png, pca_model.png (with the plot's dialog open
once the plots are wired), asset_graph_materialized.png, asset_graph_readme.png (the
graph alone, the source of docs/asset_graph.png), dagster_dev.log, and failure-<step>.png with the page
text and the server log printed when a step fails.

What it needs, and installs when missing (we are root on CI):
- Debian's Chromium at /usr/bin/chromium: `apt-get update && apt-get install -y chromium` (about 30 s).
  Playwright drives it; it cannot download its own browser here.
- Playwright for Python, from the `dev` extra of pyproject.toml.

dagster dev is started in its own session with the default SIGINT handler restored (a process started
in the background by a non-interactive shell inherits SIGINT as ignored, and dagster dev then also
ignores SIGTERM after the first one), stopped with SIGINT, and must exit cleanly with its children.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fruit_assets_tests.test_quiet import noise

pytestmark = pytest.mark.ui  # drives the Dagster UI in headless Chromium

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
ASSETS = ("raw_images", "image_features", "pca_model", "reduced_features")
EDGES = {
    ("raw_images", "image_features"),
    ("image_features", "pca_model"),
    ("image_features", "reduced_features"),
    ("pca_model", "reduced_features"),
}
STARTUP_TIMEOUT_S = 180  # webserver up and code location loaded (4-10 s idle; slower on a busy machine)
RUN_TIMEOUT_S = 6 * 60  # the whole graph: about 1-2 min with random weights on 2 cores, more under load
STOP_TIMEOUT_S = 60
UI_TIMEOUT_MS = 60_000

# The metadata keys (and image alt texts) of the plots.
PLOTS = {"raw_images": "sample_images", "pca_model": "explained_variance_plot", "reduced_features": "pca_scatter_plot"}
PCA_PLOT_KEY = PLOTS["pca_model"]


# --- what the test needs: Chromium and Playwright ---


# Chromium and Playwright: the `chromium` and `browser` fixtures are in conftest.py (one browser per
# session, whichever modules use it).


# --- dagster dev ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_processes(sid: int) -> list[str]:
    """Live (non-zombie) processes of session `sid`, as "pid command" strings (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            state, session = fields[0], int(fields[3])
            if session != sid or state == "Z":
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        found.append(f"{entry.name} {command[:160]}")
    return found


class DagsterDev:
    """`dagster dev` for the repo's workspace.yaml, on a free loopback port, with its own DAGSTER_HOME."""

    def __init__(self, home: Path, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.returncode: int | None = None
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
        dagster = Path(sys.executable).with_name("dagster")
        command = [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(self.port), "-w", "workspace.yaml"]
        self._log = open(log_path, "wb")  # noqa: SIM115 - dagster dev writes to it until stop() closes it
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env | {"DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group and session: stoppable as a whole
            # A process started from a non-interactive shell may inherit SIGINT as ignored; restore it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no log: {error})"

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.load(response)
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Wait for /server_info, then for the code location to be loaded; return the seconds taken."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"dagster dev did not answer /server_info in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.5)
        query = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename ... on PythonError { message stack } } } } } }"""
        while True:
            entries = self.graphql(query)["workspaceOrError"].get("locationEntries", [])
            if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
                for entry in entries:
                    error = entry["locationOrLoadError"]
                    if error and error["__typename"] == "PythonError":
                        stack = "".join(error["stack"])
                        raise AssertionError(f"code location {entry['name']} failed to load: {error['message']}\n{stack}")
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise AssertionError(f"code location not loaded after {timeout} s: {entries}\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> tuple[int | None, list[str]]:
        """SIGINT, then wait; SIGKILL the process group only as a last resort.

        Returns dagster dev's exit code (None if it had to be killed) and the processes of its session
        that were still alive once it had exited."""
        if self.returncode is not None or self.process.poll() is not None:
            self.returncode = self.process.returncode if self.returncode is None else self.returncode
            self._log.close()
            return self.returncode, []
        sid = self.process.pid
        self.process.send_signal(signal.SIGINT)
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.returncode = None
        # Its children (webserver, daemon, code server, run workers) must go with it.
        deadline = time.monotonic() + 15
        leftovers = session_processes(sid)
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.5)
            leftovers = session_processes(sid)
        if self.returncode is None or leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        self._log.close()
        return self.returncode, leftovers


@pytest.fixture(scope="module")
def dagster_dev(demo):
    """`dagster dev` on the demo's instance and storage (the session fixture `demo`): the UI first shows
    the demo's run, then materializes the graph again (an incremental run on the demo's tables)."""
    env, _, _ = demo
    ARTIFACTS.mkdir(exist_ok=True)
    # The demo's environment: its SPARK_SUBMIT_OPTS give the UI's run the test JVM options (conftest).
    server = DagsterDev(Path(env["DAGSTER_HOME"]), env, ARTIFACTS / "dagster_dev.log")
    try:
        seconds = server.wait_until_ready()
        print(f"dagster dev ready at {server.url} in {seconds:.1f} s")
        yield server
    finally:
        returncode, leftovers = server.stop()  # a no-op when the test has stopped it already
        if returncode != 0 or leftovers:
            print(f"dagster dev stopped uncleanly: exit code {returncode}, leftovers {leftovers}")


# --- helpers for the page ---


@contextlib.contextmanager
def step(page, name: str, server: DagsterDev | None = None, console: list[str] | None = None):
    """On failure: screenshot test-artifacts/failure-<name>.png and print the page and server state."""
    print(f"step: {name}")
    try:
        yield
    except BaseException:
        path = ARTIFACTS / f"failure-{name}.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=str(path), full_page=True)
        print(f"--- step {name!r} failed; screenshot {path}; url {page.url}")
        with contextlib.suppress(Exception):
            print("--- page text:\n" + page.inner_text("body")[:6000])
        if console:
            print("--- browser console:\n" + "\n".join(console[-30:]))
        if server is not None:
            print("--- dagster dev log (tail):\n" + server.log_tail())
        raise


def graph_edges(page) -> set[tuple[str, str]]:
    """The edges drawn in the lineage graph, as (upstream, downstream) asset names.

    The graph is one SVG: each asset node is a <foreignObject> holding its name (in a `data-tooltip`
    element), and each edge a <path> with a lineage-edge stroke from the right side of one node to the
    left side of another (its arrowhead stops a few pixels short). Nodes and edges share the SVG's
    coordinates, so an edge is matched to the nodes its ends touch."""
    return {
        tuple(edge)
        for edge in page.evaluate(
            """() => {
            const nodes = [];
            for (const fo of document.querySelectorAll('svg foreignObject')) {
                const named = fo.querySelector('[data-tooltip]');
                if (!named) continue;
                const [x, y, w, h] = ['x', 'y', 'width', 'height'].map(a => parseFloat(fo.getAttribute(a)));
                nodes.push({name: named.getAttribute('data-tooltip'), x, y, w, h});
            }
            const near = (a, b, d) => Math.abs(a - b) <= d;
            const inside = (n, y) => y >= n.y - 1 && y <= n.y + n.h + 1;
            const edges = [];
            for (const path of document.querySelectorAll('svg path[stroke*="lineage-edge"]')) {
                const numbers = (path.getAttribute('d') || '').match(/-?[0-9.]+/g);
                if (!numbers || numbers.length < 4) continue;
                const [x1, y1] = numbers.slice(0, 2).map(Number);
                const [x2, y2] = numbers.slice(-2).map(Number);
                const source = nodes.find(n => near(n.x + n.w, x1, 12) && inside(n, y1));
                const target = nodes.find(n => near(n.x, x2, 20) && inside(n, y2));
                edges.push([source ? source.name : `?(${x1},${y1})`, target ? target.name : `?(${x2},${y2})`]);
            }
            return edges;
        }"""
        )
    }


def metadata_image(page, key: str, min_width: int = 100):
    """The <img alt=key> of a markdown metadata entry on an asset page, loaded and visible.

    Short markdown is rendered in the metadata table itself; longer markdown (any real plot) shows
    "[Show Markdown]", which opens a dialog with the rendered image."""
    row = page.locator("tr").filter(has=page.locator("td", has_text=re.compile(rf"^\s*{re.escape(key)}\s*$"))).first
    row.wait_for(state="visible")
    image = row.locator(f'img[alt="{key}"]')
    if image.count() == 0:
        row.get_by_text("[Show Markdown]").click()
        image = page.get_by_role("dialog").locator(f'img[alt="{key}"]')
    image.wait_for(state="visible")
    loaded = f"""() => [...document.querySelectorAll('img[alt="{key}"]')]
        .some(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width >= {min_width})"""
    page.wait_for_function(loaded)
    return image


def lineage_link(page):
    # The navigation links' accessible names start with their icon's name: "lineage Lineage".
    return page.get_by_role("navigation").get_by_role("link", name=re.compile(r"\bLineage$"))


# --- the test ---


def test_the_ui_shows_the_demo_run_with_its_plots(dagster_dev, demo, browser):
    """What the demo's last line promises: `dagster dev` on its instance shows its four materializations
    and their plots."""
    _, stdout, _ = demo
    [short_run_id] = re.findall(r"\(run ([0-9a-f]{8})\)", stdout)
    server = dagster_dev
    # The demo's materialization of each asset, among the latest few (a CLI run on the same instance,
    # test_quiet's, may have come after it).
    query = """query ($path: [String!]!) { assetOrError(assetKey: {path: $path}) { __typename
        ... on Asset { assetMaterializations(limit: 10) { runId metadataEntries { label __typename } } } } }"""
    for name in ASSETS:
        asset = server.graphql(query, {"path": [name]})["assetOrError"]
        assert asset["__typename"] == "Asset", f"{name}: {asset}"
        [by_demo] = [m for m in asset["assetMaterializations"] if m["runId"].startswith(short_run_id)]
        labels = {entry["label"]: entry["__typename"] for entry in by_demo["metadataEntries"]}
        if name in PLOTS:
            assert labels.get(PLOTS[name]) == "MarkdownMetadataEntry", (name, sorted(labels))
    # And a person's view: pca_model's page shows its plot.
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        page.goto(f"{server.url}/assets/pca_model")
        page.get_by_text("Latest materialization").first.wait_for(state="visible")
        metadata_image(page, PLOTS["pca_model"])
        page.screenshot(path=str(ARTIFACTS / "pca_model_after_demo.png"))
    finally:
        page.close()


def test_materialize_all_in_the_ui(dagster_dev, browser):
    from playwright.sync_api import expect

    server = dagster_dev
    started = time.monotonic()

    # Secondary check of the lineage, without the browser: the asset nodes and their dependencies.
    nodes = server.graphql("{ assetNodes { assetKey { path } dependencyKeys { path } } }")["assetNodes"]
    dependencies = {
        "/".join(node["assetKey"]["path"]): {"/".join(key["path"]) for key in node["dependencyKeys"]} for node in nodes
    }
    assert set(ASSETS) <= set(dependencies), dependencies
    assert {(up, down) for down in ASSETS for up in dependencies[down] if up in ASSETS} == EDGES

    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    # Dagster shows a "join the community" dialog once on localhost; the dagster.yaml turns it off
    # (nux.enabled: false), and this marks it as dismissed in the browser as well.
    context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text[:300]}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    try:
        with step(page, "asset-graph", server, console):
            page.goto(server.url)
            lineage_link(page).click()
            graph = page.locator("svg foreignObject")
            for name in ASSETS:
                graph.get_by_text(name, exact=True).first.wait_for(state="visible")
            page.get_by_role("button", name="Materialize all").wait_for(state="visible")
            page.wait_for_function(
                "() => document.querySelectorAll('svg path[stroke*=\"lineage-edge\"]').length >= 4"
            )
            page.wait_for_timeout(1000)  # let the node statuses finish loading, for the screenshot
            page.screenshot(path=str(ARTIFACTS / "asset_graph.png"))
            drawn = graph_edges(page)
            assert drawn == EDGES, f"edges drawn in the lineage graph: {sorted(drawn)}"

        with step(page, "materialize-all", server, console):
            page.get_by_role("button", name="Materialize all").click()
            page.get_by_text(re.compile(r"Launched run")).first.wait_for(state="visible")
            href = page.locator('a[href*="/runs/"]').filter(has_text="View").first.get_attribute("href")
            match = re.search(r"/runs/([0-9a-f-]{36})", href or "")
            assert match, f"no run link in the launch toast: {href!r}"
            run_id = match.group(1)
            print(f"launched run {run_id}")

        with step(page, "run", server, console):
            # The run's page opens once the run has ended: a live run page re-renders its logs and
            # timeline for the whole run, which cost the browser CPU that the run itself needed.
            page.goto("about:blank")
            query = "query ($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"
            deadline = time.monotonic() + RUN_TIMEOUT_S
            status = None
            while time.monotonic() < deadline:
                status = server.graphql(query, {"id": run_id})["runOrError"].get("status")
                if status in ("SUCCESS", "FAILURE", "CANCELED"):
                    break
                time.sleep(0.5)  # a GraphQL query on loopback: cheap to ask often
            run_seconds = time.monotonic() - started
            if status != "SUCCESS":
                failures = server.graphql(
                    """query ($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
                        __typename ... on MessageEvent { message stepKey }
                        ... on ExecutionStepFailureEvent { error { message stack } } } } } }""",
                    {"id": run_id},
                )
                errors = [e for e in failures["logsForRun"].get("events", []) if e.get("error")]
                print("--- run errors:\n" + json.dumps(errors, indent=1)[:8000])
            assert status == "SUCCESS", f"run {run_id} ended as {status} (or timed out after {RUN_TIMEOUT_S} s)"
            # The UI shows it too: the run header's status tag.
            page.goto(f"{server.url}/runs/{run_id}")
            page.get_by_text("Success", exact=True).first.wait_for(state="visible")
            page.get_by_text("RUN_SUCCESS", exact=True).first.wait_for(state="attached")
            page.screenshot(path=str(ARTIFACTS / "run_success.png"))
            print(f"run succeeded {run_seconds:.0f} s after the test started")

        with step(page, "pca-model-page", server, console):
            page.goto(f"{server.url}/assets/pca_model")
            page.get_by_text("Latest materialization").first.wait_for(state="visible")
            metadata_row = page.locator("tr").filter(
                has=page.locator("td", has_text=re.compile(r"^\s*explained_variance_total\s*$"))
            ).first
            metadata_row.wait_for(state="visible")  # this run's metadata is shown
            metadata_row.scroll_into_view_if_needed()
            # The explained-variance plot must be visible in pca_model's metadata.
            metadata_image(page, PCA_PLOT_KEY)
            # Let the dialog finish fading in, so the screenshot shows the plot, not a ghost of it.
            page.wait_for_function(
                """() => [...document.querySelectorAll('[role=dialog]')]
                    .every(d => getComputedStyle(d).opacity === '1')"""
            )
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "pca_model.png"))  # with the plot's dialog open
            page.keyboard.press("Escape")

        with step(page, "asset-graph-materialized", server, console):
            lineage_link(page).click()
            graph = page.locator("svg foreignObject")
            # expect() has its own timeout (5 s), not the context's: give it the test's UI budget. A
            # node's status can take longer than 5 s to load after the page opens (seen once: the
            # asset list already showed raw_images materialized while its node still said "Loading...").
            expect(graph.get_by_text("Materialized", exact=True)).to_have_count(len(ASSETS), timeout=UI_TIMEOUT_MS)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "asset_graph_materialized.png"))
            # For the README (docs/asset_graph.png): the graph alone, at a readable zoom.
            page.get_by_role("button", name=re.compile(r"Hide navigation")).click()
            page.get_by_role("button", name="panel_show_right", exact=True).click()  # the asset list
            page.wait_for_timeout(1500)  # the graph re-fits its zoom to the wider pane
            box = page.evaluate(
                """() => {
                const r = [...document.querySelectorAll('svg foreignObject')].map(e => e.getBoundingClientRect());
                return {x: Math.min(...r.map(b => b.left)), y: Math.min(...r.map(b => b.top)),
                        right: Math.max(...r.map(b => b.right)), bottom: Math.max(...r.map(b => b.bottom))} }"""
            )
            margin = 24
            page.screenshot(
                path=str(ARTIFACTS / "asset_graph_readme.png"),
                clip={"x": max(box["x"] - margin, 0), "y": max(box["y"] - margin, 0),
                      "width": box["right"] - box["x"] + 2 * margin, "height": box["bottom"] - box["y"] + 2 * margin},
            )
    finally:
        context.close()

    returncode, leftovers = server.stop()
    print(f"test took {time.monotonic() - started:.0f} s; dagster dev exit code {returncode}")
    assert returncode == 0, f"dagster dev did not exit cleanly on SIGINT: exit code {returncode}\n{server.log_tail()}"
    assert not leftovers, f"processes left running after dagster dev exited: {leftovers}"
    log = server.log_path.read_text(errors="replace")
    assert not noise(log), noise(log)  # loading the code location, and the run, start nothing noisy
