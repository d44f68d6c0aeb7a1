"""deploy/grafana/dashboard.json checked against real things, since no Grafana runs here.

1. Every panel's PromQL runs against a real Prometheus that scrapes a real sidecar while a
   breaker trips and a flaky service is retried, and must return data (a non-empty,
   finite result). Template variables are substituted as Grafana would: `$service` with a
   regex of two services where the query matches with `=~`, with each service in turn
   where it matches with `=`; `$__rate_interval` with 4 x the 1 s scrape interval.
   Every metric a query names is one the sidecar exports.
2. The JSON is type-checked against Grafana's published schema, the npm package
   @grafana/schema, whose dashboard and panel types are TypeScript (it ships no JSON
   Schema): the test installs it with TypeScript into a cache directory (never into the
   repository) and compiles the dashboard as a typed literal with `tsc --strict`, so an
   unknown key, a wrong type or a value outside an enum fails. A broken copy is compiled
   too, to show the check can fail.
3. Layout: ids unique, panels inside the 24-column grid, none overlapping.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import ROOT
from promrunner import prometheus_binary, run_prometheus

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"

# The breaker rules' metrics, each with a panel of its own.
NEW_BREAKER_METRICS = {
    "sidecar_circuit_breaker_trips_total",
    "sidecar_circuit_breaker_failure_rate",
}

GRAFANA_SCHEMA = "@grafana/schema@13.2.3"
TYPESCRIPT = "typescript@5.9.3"

# What Grafana puts in for its built-in variables with a 1 s scrape interval.
BUILTINS = {"$__rate_interval": "4s", "$__range": "1m", "$__interval": "1s"}

METRIC_RE = re.compile(r"\bsidecar_[a-z_]+[a-z]\b")


def dashboard() -> dict[str, Any]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dash


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def queries() -> list[tuple[str, str]]:
    """(panel title / refId, expr) for every query target."""
    return [
        (f"{p['title']} / {t['refId']}", t["expr"])
        for p in panels(dashboard())
        for t in p.get("targets", [])
    ]


def substituted(expr: str, service: str, services: list[str]) -> str:
    expr = expr.replace('=~"$service"', '=~"(' + "|".join(services) + ')"')
    expr = expr.replace('"$service"', f'"{service}"')
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a template variable left unsubstituted: {expr}"
    return expr


# --- 3. layout --------------------------------------------------------------------------------


def test_layout_ids_and_grid():
    dash = dashboard()
    everything = panels(dash)
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    boxes = []
    for p in everything:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), f"{p['title']}: refIds repeat"
    for i, (ta, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for tb, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            apart = ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
            assert apart, f"panels overlap: {ta!r} and {tb!r}"
    # The breaker panels' value mapping matches their 0/1/2 expression.
    for p in everything:
        if p["type"] == "state-timeline":
            (mapping,) = p["fieldConfig"]["defaults"]["mappings"]
            texts = {k: v["text"] for k, v in mapping["options"].items()}
            assert texts == {"0": "closed", "1": "half_open", "2": "open"}, p["title"]
    # The new breaker metrics have panels of their own.
    charted = {name for _, expr in queries() for name in METRIC_RE.findall(expr)}
    assert charted >= NEW_BREAKER_METRICS


# --- 1. every query against a real Prometheus -------------------------------------------------


def finite(result: list[dict[str, Any]]) -> bool:
    return bool(result) and all(math.isfinite(float(r["value"][1])) for r in result)


@pytest.mark.slow
@pytest.mark.external
@pytest.mark.timeout(180)
async def test_every_panel_query_returns_data_from_a_real_prometheus(
    upstream, sidecar, client, tmp_path
):
    if prometheus_binary() is None:
        pytest.skip("prometheus not installed (Debian package prometheus; make system-deps)")

    async def down(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    calls = [0]

    async def flaky(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        return web.Response(status=503 if calls[0] % 3 == 0 else 200)

    payments_up, orders_up = await upstream(down), await upstream(flaky)
    sc = await sidecar(f"""
    services:
      payments:
        endpoints: ["{payments_up.address}"]
        circuit_breaker: {{ failure_threshold: 2, reset_timeout: 1s }}
      orders:
        endpoints: ["{orders_up.address}"]
    routes:
      - name: payments
        match: {{ prefix: /payments }}
        service: payments
        retries: {{ max_retries: 0 }}
      - name: orders
        match: {{ prefix: /orders }}
        service: orders
        retries: {{ max_retries: 2, backoff: {{ base: 1ms, max: 2ms }} }}
    """)
    services = ["payments", "orders"]
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    exported = {
        family.name + suffix
        for family in sc.metrics.registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }

    stop = asyncio.Event()

    async def traffic() -> None:
        for i in range(5000):  # about 50 requests a second, bounded in count
            if stop.is_set():
                return
            for path in ("/payments/charge", f"/orders/{i}"):
                async with client.get(f"{sc.url}{path}") as r:
                    await r.read()
            await asyncio.sleep(0.02)

    driver = asyncio.create_task(traffic())
    try:
        async with run_prometheus(tmp_path, [f"127.0.0.1:{sc.admin}"]) as prom:
            await prom.wait_for_targets_up(1)
            await prom.wait_for(
                'sidecar_circuit_breaker_transitions_total{service="payments",'
                ' to_state="open"} > 0',
                bool,
            )
            # rate() over 4 s wants a few scrapes of traffic.
            await prom.wait_for("count_over_time(up[1m]) >= 6", bool)

            # The service variable: label_values(sidecar_circuit_breaker_state, service).
            (variable,) = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
            query = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
            assert query is not None, variable["definition"]
            metric, label = query.groups()
            async with prom.session.get(
                f"{prom.url}/api/v1/label/{label}/values", params={"match[]": metric}
            ) as resp:
                values = (await resp.json())["data"]
            assert sorted(values) == sorted(services)

            failures = []
            for where, expr in queries():
                names = set(METRIC_RE.findall(expr))
                assert names <= exported, f"{where}: unknown {names - exported}"
                for service in services if '"$service"' in expr else services[:1]:
                    promql = substituted(expr, service, services)
                    try:
                        await prom.wait_for(promql, finite, timeout=15)
                    except Exception as exc:
                        failures.append(f"{where} [{service}]: {promql}\n  {exc!s:.300}")
            assert not failures, "queries without data:\n" + "\n".join(failures)
            print(f"checked {len(queries())} queries")

            # The overview timeline reaches 2 (open) for payments while its breaker is open.
            (overview,) = [p for p in dashboard()["panels"] if p["title"] == "Circuit breakers"]
            expr = substituted(overview["targets"][0]["expr"], "payments", ["payments"])
            await prom.wait_for(
                f"max_over_time(({expr})[1m:1s])",
                lambda r: bool(r) and float(r[0]["value"][1]) == 2.0,
            )
    finally:
        stop.set()
        await driver


# --- 2. Grafana's published schema --------------------------------------------------------------


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = f"{GRAFANA_SCHEMA}-{TYPESCRIPT}".replace("@", "").replace("/", "-")
    return base / "sidecar-tests" / name


def _schema_tools() -> Path:
    """A cache dir holding @grafana/schema and TypeScript, installed with npm if missing."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node and npm are needed to install @grafana/schema (Debian: nodejs, npm)")
    target = _cache_dir()
    if (target / "node_modules" / "typescript" / "bin" / "tsc").exists() and (
        target / "node_modules" / "@grafana" / "schema" / "package.json"
    ).exists():
        return target
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    result = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--prefix",
            str(staging),
            GRAFANA_SCHEMA,
            TYPESCRIPT,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        message = f"npm could not install {GRAFANA_SCHEMA}: {result.stderr[-800:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


# Dashboard JSON writes enum members as their values ("value", "thresholds", "list"); the
# schema's TypeScript types name them as enums. Json<T> accepts exactly those values there
# and keeps everything else (required keys, excess-key checks, unions) as it is.
TS_PRELUDE = """\
import type { Dashboard, VariableModel } from "@grafana/schema";
import type * as TimeSeries from
  "@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";
import type * as StateTimeline from
  "@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen";

type Json<T> = T extends string ? `${T}`
  : T extends number | boolean | null | undefined ? T
  : T extends Array<infer U> ? Array<Json<U>>
  : T extends object ? { [K in keyof T]: Json<T[K]> }
  : T;

// Grafana's UI writes a query variable's text as `definition` too (QueryVariableModel in
// @grafana/data); the CUE-generated schema leaves it out. Allowed here, and nothing else.
type SidecarDashboard = Omit<Json<Dashboard>, "templating"> & {
  templating?: { list?: Array<Json<VariableModel> & { definition?: string }> };
};

// The fields of a Prometheus query target (Grafana's prometheus plugin, dataquery.cue).
interface PromQuery {
  datasource?: { type?: string; uid?: string };
  refId: string;
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  format?: "time_series" | "table" | "heatmap";
  interval?: string;
  editorMode?: "code" | "builder";
  exemplar?: boolean;
  hide?: boolean;
}
"""

PANEL_TYPES = {"timeseries": "TimeSeries", "state-timeline": "StateTimeline"}


def typescript_for(dash: dict[str, Any]) -> str:
    lines = [TS_PRELUDE, f"export const dashboard: SidecarDashboard = {json.dumps(dash)};"]
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["type"] in PANEL_TYPES, f"add the schema types of panel type {p['type']!r}"
        module, pid = PANEL_TYPES[p["type"]], p["id"]
        lines.append(f"export const options{pid}: Json<{module}.Options> = ")
        lines.append(f"  {json.dumps(p.get('options', {}))};")
        custom = p["fieldConfig"]["defaults"].get("custom", {})
        lines.append(f"export const custom{pid}: Json<{module}.FieldConfig> = ")
        lines.append(f"  {json.dumps(custom)};")
        lines.append(f"export const targets{pid}: PromQuery[] = {json.dumps(p['targets'])};")
    return "\n".join(lines) + "\n"


def tsc(tools: Path, workdir: Path, source: str) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "dashboard.ts").write_text(source)
    modules = tools / "node_modules"
    (workdir / "tsconfig.json").write_text(
        json.dumps(
            {
                "compilerOptions": {
                    "strict": True,
                    "noEmit": True,
                    "target": "es2022",
                    "module": "esnext",
                    "moduleResolution": "bundler",
                    "skipLibCheck": True,
                    "types": [],
                    "baseUrl": ".",
                    "paths": {"@grafana/schema": [str(modules / "@grafana" / "schema")]},
                    "typeRoots": [str(modules / "@types")],
                },
                "files": ["dashboard.ts"],
            }
        )
    )
    # Imports resolve from the source's folder upwards: link the cached node_modules in.
    link = workdir / "node_modules"
    if not link.exists():
        link.symlink_to(modules, target_is_directory=True)
    return subprocess.run(
        [shutil.which("node") or "node", str(modules / "typescript" / "bin" / "tsc"), "-p", "."],
        cwd=workdir,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.external
@pytest.mark.timeout(300)
def test_dashboard_type_checks_against_grafanas_published_schema(tmp_path: Path):
    tools = _schema_tools()
    dash = dashboard()
    result = tsc(tools, tmp_path / "good", typescript_for(dash))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    # The same check on broken copies must fail, naming what is wrong (one fault a copy:
    # tsc reports the first fault in an object literal only).
    def timeseries(d: dict[str, Any]) -> dict[str, Any]:
        return next(p for p in d["panels"] if p["type"] == "timeseries")

    faults = [
        (lambda d: timeseries(d)["fieldConfig"]["defaults"].update(colour="red"), "'\"colour\"'"),
        (lambda d: timeseries(d).update(gridpos=timeseries(d).pop("gridPos")), "'\"gridpos\"'"),
        (
            lambda d: timeseries(d)["options"]["legend"].update(displayMode="lists"),
            "'\"lists\"' is not assignable",
        ),
        (lambda d: d.update(graphTooltip="shared"), "'DashboardCursorSync"),
        (lambda d: timeseries(d)["targets"][0].pop("expr"), "'expr' is missing"),
    ]
    for i, (spoil, words) in enumerate(faults):
        broken = copy.deepcopy(dash)
        spoil(broken)
        result = tsc(tools, tmp_path / f"broken{i}", typescript_for(broken))
        assert result.returncode != 0, words
        assert words in result.stdout, (words, result.stdout[-2000:])
