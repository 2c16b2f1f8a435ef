/* meterline dashboard. Reads the ledger only through POST /_meterline/sql (the same read-only path as
   `meterline sql`; reconciliation runs too) and budgets through GET /_meterline/budgets. Sums and ratios are computed in SQL;
   DECIMAL money arrives as exact strings, parsed here only to display it. */
"use strict";
(() => {
  const POLL_DEFAULT_S = 3;
  const MAX_SERIES = 8;
  const CHART_H = 320;
  const PALETTE = ["#1f5eff", "#f08c00", "#2aa876", "#d6336c", "#7048e8", "#0c8599", "#e8590c", "#a61e4d"];
  const OTHER_COLOR = "#9aa1ad";
  const RANGES = [300, 900, 3600, 21600, 86400, 604800, 2592000];
  const BUCKETS = [5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600];
  const MODEL = "coalesce(response_model, request_model)";
  const MIX = [
    ["input", "input, uncached"], ["cache_read", "cache reads"], ["cache_write", "cache writes"],
    ["output", "output"], ["reasoning", "reasoning"],
  ];

  const state = {
    cfg: { jaeger_ui_url: null, poll_s: POLL_DEFAULT_S },
    range: 3600, metric: "cost", groupBy: "provider",
    scope: "local", // "fleet": the fleet ledger (Postgres, every sidecar's rows) through this sidecar
    filters: { provider: "", model: "", app: "", outcome: "", tag: "" },
    gen: 0, busy: false, polls: 0, timer: null,
    chart: null, chartKey: "", colors: new Map(), legend: [],
    seenCalls: null, selected: null,
  };

  // --- small helpers -------------------------------------------------------------------------

  const $ = (sel) => document.querySelector(sel);
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else if (k === "style") Object.assign(node.style, v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  const lit = (s) => "'" + String(s).replace(/'/g, "''") + "'";
  const num = (v) => (v === null || v === undefined || v === "" ? null : Number(v));

  function money(v) {
    const x = num(v);
    if (x === null || Number.isNaN(x)) return "–";
    const a = Math.abs(x);
    const d = a === 0 || a >= 1 ? 2 : a >= 0.01 ? 4 : 6;
    return (x < 0 ? "-$" : "$") + a.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
  }
  function int(v) {
    const x = num(v);
    return x === null ? "–" : Math.round(x).toLocaleString("en-US");
  }
  function compact(v) {
    const x = num(v);
    if (x === null) return "–";
    const a = Math.abs(x);
    if (a >= 1e9) return (x / 1e9).toFixed(2) + "B";
    if (a >= 1e6) return (x / 1e6).toFixed(2) + "M";
    if (a >= 1e4) return (x / 1e3).toFixed(1) + "k";
    return Math.round(x).toLocaleString("en-US");
  }
  function ms(v) {
    const x = num(v);
    if (x === null || Number.isNaN(x)) return "–";
    if (x >= 10000) return (x / 1000).toFixed(1) + " s";
    return x < 10 ? x.toFixed(1) : Math.round(x).toLocaleString("en-US");
  }
  function pct(v, digits = 0) {
    const x = num(v);
    return x === null ? "–" : (x * 100).toFixed(digits) + "%";
  }
  // A budget's share used, never rounded up: the label reaches 80% when the bar turns amber and 100%
  // only when the limit is reached (bar red); above zero it never reads 0%.
  function utilText(v) {
    const x = num(v);
    if (x === null || Number.isNaN(x)) return "–";
    if (x <= 0) return "0%";
    const p = x * 100 + 1e-9; // 0.29 * 100 is 28.999999999999996 in binary floating point
    if (p < 0.1) return "<0.1%";
    return p < 10 ? (Math.floor(p * 10) / 10).toFixed(1) + "%" : Math.floor(p) + "%";
  }
  const utilClass = (x) => (x >= 1 ? "full" : x >= 0.8 ? "warn" : "");
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "never resets";
    const s = Math.max(0, Math.round(seconds));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    const text = d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
    return "resets in " + text;
  }
  function clock(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    const today = new Date().toDateString() === d.toDateString();
    const t = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
    return today ? t : d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + t;
  }
  const tagsText = (tags) => (tags && typeof tags === "object" ? Object.entries(tags).map(([k, v]) => `${k}=${v}`).join(", ") : "");

  const FETCH_TIMEOUT_MS = 20000; // a request that hangs must not stop the polling
  const TOKEN_KEY = "meterline-admin-token";

  // When the sidecar has an admin token, every request but the page's own files needs it. The page is
  // opened as /_meterline/#token=TOKEN (or asks for it): kept in sessionStorage for this tab only,
  // never in localStorage, and taken out of the URL as soon as it is read.
  function tokenHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { "x-meterline-admin-token": token } : {};
  }
  function takeTokenFromUrl() {
    const p = new URLSearchParams(location.hash.slice(1));
    if (!p.has("token")) return;
    const token = p.get("token");
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    p.delete("token");
    const rest = p.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }
  function needToken(sentWith) {
    // an answer to a request sent before a new token was entered says nothing about the new one
    if ((sessionStorage.getItem(TOKEN_KEY) || "") !== sentWith) return new Error("the admin token changed: reloading");
    const had = Boolean(sentWith);
    $("#token-form").hidden = false;
    $("#token-help").textContent = had
      ? "The admin token this tab has is wrong. Open the page as /_meterline/#token=TOKEN, or enter the token:"
      : "This sidecar has an admin token. Open the page as /_meterline/#token=TOKEN, or enter the token:";
    return new Error(had ? "the admin token is wrong: open /_meterline/#token=TOKEN"
                         : "the sidecar needs its admin token: open /_meterline/#token=TOKEN");
  }

  async function sql(query) {
    const sentWith = sessionStorage.getItem(TOKEN_KEY) || "";
    const fleet = fleetMode();
    const resp = await fetch("sql", { method: "POST",
                                      headers: { "content-type": fleet ? "application/json" : "text/plain", ...tokenHeaders() },
                                      body: fleet ? JSON.stringify({ query, fleet: true }) : query,
                                      signal: AbortSignal.timeout(FETCH_TIMEOUT_MS) });
    let doc = null;
    try { doc = await resp.json(); } catch (e) { /* not JSON */ }
    if (resp.status === 401) throw needToken(sentWith);
    if (!resp.ok) throw new Error((doc && doc.error) || `HTTP ${resp.status}`);
    return doc.rows.map((row) => Object.fromEntries(doc.columns.map((c, i) => [c, row[i]])));
  }
  async function getJSON(path) {
    const sentWith = sessionStorage.getItem(TOKEN_KEY) || "";
    const resp = await fetch(path, { headers: { accept: "application/json", ...tokenHeaders() },
                                     signal: AbortSignal.timeout(FETCH_TIMEOUT_MS) });
    if (resp.status === 401) throw needToken(sentWith);
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return resp.json();
  }
  async function loadConfig() {
    try {
      state.cfg = { ...state.cfg, ...(await getJSON("dashboard/config")) };
    } catch (e) {
      console.warn("meterline: no dashboard config, using defaults", e.message || e);
    }
  }

  // --- filters and the state in the URL ------------------------------------------------------

  // the fleet ledger is asked only when the sidecar has one (dashboard/config says so)
  const fleetMode = () => state.scope === "fleet" && Boolean(state.cfg.fleet);
  // a tag's value: DuckDB's MAP or the fleet ledger's (Postgres) jsonb
  const tagExpr = (key) => (fleetMode() ? `(tags->>${lit(key)})` : `tags[${lit(key)}]`);

  function filterParts() {
    const f = state.filters, parts = [];
    if (f.provider) parts.push(`provider = ${lit(f.provider)}`);
    if (f.model) parts.push(`${MODEL} = ${lit(f.model)}`);
    if (f.app) parts.push(`app = ${lit(f.app)}`);
    if (f.outcome) parts.push(`outcome = ${lit(f.outcome)}`);
    if (f.tag) {
      const i = f.tag.indexOf("=");
      parts.push(`${tagExpr(f.tag.slice(0, i))} = ${lit(f.tag.slice(i + 1))}`);
    }
    return parts;
  }
  const where = () => [`started_at >= now() - INTERVAL '${state.range} seconds'`, ...filterParts()].join(" AND ");
  const filtersOnly = () => filterParts().map((p) => " AND " + p).join("");

  function groupExpr() {
    const g = state.groupBy;
    if (g === "model") return MODEL;
    if (g === "app") return "coalesce(app, '(no app)')";
    if (g === "user") return "coalesce(user_id, '(no user)')";
    if (g.startsWith("tag:")) return `coalesce(${tagExpr(g.slice(4))}, '(untagged)')`;
    return "provider";
  }

  function readHash() {
    takeTokenFromUrl();
    const p = new URLSearchParams(location.hash.slice(1));
    const range = Number(p.get("range"));
    if (RANGES.includes(range)) state.range = range;
    if (["cost", "calls", "tokens"].includes(p.get("metric"))) state.metric = p.get("metric");
    if (p.get("by")) state.groupBy = p.get("by");
    state.scope = p.get("scope") === "fleet" ? "fleet" : "local";
    for (const k of Object.keys(state.filters)) state.filters[k] = p.get(k) || "";
  }
  function writeHash() {
    const p = new URLSearchParams();
    p.set("range", state.range);
    p.set("metric", state.metric);
    p.set("by", state.groupBy);
    if (state.scope === "fleet") p.set("scope", "fleet");
    for (const [k, v] of Object.entries(state.filters)) if (v) p.set(k, v);
    history.replaceState(null, "", "#" + p.toString());
  }

  function ensureOption(select, value, label) {
    if (!value || [...select.options].some((o) => o.value === value)) return;
    select.append(el("option", { value, text: label || value }));
  }

  function syncControls() {
    $("#range").value = String(state.range);
    $("#scope-label").hidden = !state.cfg.fleet;
    $("#scope").value = fleetMode() ? "fleet" : "local";
    $("#fleet-row").hidden = !fleetMode();
    for (const row of document.querySelectorAll("[data-local-only]")) row.hidden = fleetMode();
    $("#metric").value = state.metric;
    ensureOption($("#group-by"), state.groupBy, state.groupBy.replace("tag:", "tag: "));
    $("#group-by").value = state.groupBy;
    for (const select of document.querySelectorAll("select[data-filter]")) {
      const v = state.filters[select.dataset.filter];
      ensureOption(select, v);
      select.value = v;
      select.classList.toggle("active", Boolean(v));
    }
    $("#clear-filters").hidden = !Object.values(state.filters).some(Boolean);
  }

  async function loadOptions() {
    const w = `started_at >= now() - INTERVAL '${state.range} seconds'`;
    // written to run on DuckDB and on the fleet ledger's Postgres alike (but for the tags' type)
    const tags = fleetMode()
      ? `SELECT 'tag', t.key || '=' || t.value, count(*) FROM calls, jsonb_each_text(coalesce(tags, '{}'::jsonb)) AS t(key, value) WHERE ${w} GROUP BY 1, 2`
      : `SELECT 'tag', entry.key || '=' || entry.value, count(*) FROM calls, unnest(map_entries(tags)) AS t(entry) WHERE ${w} GROUP BY 1, 2`;
    const rows = await sql(`
      SELECT f, v, n FROM (
        SELECT 'provider' AS f, provider AS v, count(*) AS n FROM calls WHERE ${w} GROUP BY 1, 2
        UNION ALL SELECT 'model', ${MODEL}, count(*) FROM calls WHERE ${w} GROUP BY 1, 2
        UNION ALL SELECT 'app', app, count(*) FROM calls WHERE ${w} GROUP BY 1, 2
        UNION ALL SELECT 'outcome', outcome, count(*) FROM calls WHERE ${w} GROUP BY 1, 2
        UNION ALL ${tags}
      ) AS o WHERE v IS NOT NULL ORDER BY f, n DESC, v LIMIT 2000`);
    const by = { provider: [], model: [], app: [], outcome: [], tag: [] };
    for (const r of rows) if (by[r.f] && by[r.f].length < 200) by[r.f].push(r.v);
    for (const select of document.querySelectorAll("select[data-filter]")) {
      const name = select.dataset.filter, current = state.filters[name];
      const values = by[name].slice().sort();
      if (current && !values.includes(current)) values.unshift(current);
      select.replaceChildren(el("option", { value: "", text: "all" }), ...values.map((v) => el("option", { value: v, text: v })));
      select.value = current;
    }
    const keys = [...new Set(by.tag.map((t) => t.slice(0, t.indexOf("="))))].sort();
    const groupBy = $("#group-by");
    const fixed = ["provider", "model", "app", "user"];
    groupBy.replaceChildren(...fixed.map((v) => el("option", { value: v, text: v })),
      ...keys.map((k) => el("option", { value: "tag:" + k, text: "tag: " + k })));
    ensureOption(groupBy, state.groupBy, state.groupBy.replace("tag:", "tag: "));
    groupBy.value = state.groupBy;
  }

  // --- panels --------------------------------------------------------------------------------

  async function loadKpis(gen) {
    const rows = await sql(`
      WITH b AS (SELECT (date_trunc('day', now() AT TIME ZONE 'UTC')) AT TIME ZONE 'UTC' AS d,
                        (date_trunc('week', now() AT TIME ZONE 'UTC')) AT TIME ZONE 'UTC' AS w,
                        (date_trunc('month', now() AT TIME ZONE 'UTC')) AT TIME ZONE 'UTC' AS m)
      SELECT coalesce(sum(cost_usd) FILTER (WHERE started_at >= d), 0) AS spend_today,
             count(*) FILTER (WHERE started_at >= d) AS calls_today,
             coalesce(sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)) FILTER (WHERE started_at >= d), 0) AS tokens_today,
             count(*) FILTER (WHERE started_at >= d AND outcome = 'blocked') AS blocked_today,
             count(*) FILTER (WHERE started_at >= d AND outcome NOT IN ('ok', 'blocked')) AS errors_today,
             count(*) FILTER (WHERE started_at >= d AND price_source = 'unpriced') AS unpriced_today,
             count(cost_usd) FILTER (WHERE started_at >= d) AS priced_today,
             count(cost_usd) FILTER (WHERE started_at >= w) AS priced_week,
             count(*) FILTER (WHERE started_at >= w AND price_source = 'unpriced') AS unpriced_week,
             count(cost_usd) FILTER (WHERE started_at >= m) AS priced_month,
             count(*) FILTER (WHERE started_at >= m AND price_source = 'unpriced') AS unpriced_month,
             coalesce(sum(cost_usd) FILTER (WHERE started_at >= w), 0) AS spend_week,
             count(*) FILTER (WHERE started_at >= w) AS calls_week,
             coalesce(sum(cost_usd) FILTER (WHERE started_at >= m), 0) AS spend_month,
             count(*) FILTER (WHERE started_at >= m) AS calls_month
      FROM calls, b WHERE started_at >= least(d, w, m)${filtersOnly()}`);
    if (gen !== state.gen) return;
    const k = rows[0];
    for (const node of document.querySelectorAll("[data-kpi]")) {
      const name = node.dataset.kpi, v = k[name];
      node.dataset.value = v === null ? "" : String(v);
      if (name.startsWith("spend_")) {
        // a sum over no priced call is not $0.00 when the calls it covers have no known price
        const span = name.slice(6), priced = num(k["priced_" + span]), unpriced = num(k["unpriced_" + span]);
        node.textContent = priced === 0 && unpriced > 0 ? "unpriced" : money(v);
        node.classList.toggle("unpriced", priced === 0 && unpriced > 0);
        node.title = `$${v} exactly (sum of cost_usd)` + (unpriced > 0 ? `; ${unpriced} unpriced calls not included` : "");
      } else if (name.startsWith("tokens_")) {
        node.textContent = compact(v);
      } else {
        node.textContent = int(v);
      }
      if (["blocked_today", "errors_today", "unpriced_today"].includes(name)) node.classList.toggle("bad", num(v) > 0);
    }
  }

  function bucketFor(range) {
    return BUCKETS.find((b) => range / b <= 120) || BUCKETS[BUCKETS.length - 1];
  }

  // a call's bucket, as seconds since the epoch (DuckDB's time_bucket or Postgres arithmetic: the
  // same buckets for every width that divides a day)
  function bucketStart(bucket) {
    return fleetMode() ? `CAST(floor(extract(epoch FROM started_at) / ${bucket}) * ${bucket} AS bigint)`
      : `epoch(time_bucket(INTERVAL '${bucket} seconds', started_at))`;
  }

  async function loadSeries(gen) {
    const bucket = bucketFor(state.range);
    const metric = { cost: "sum(cost_usd)", calls: "count(*)",
                     tokens: "sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0))" }[state.metric];
    // per bucket and series: the value, and the running total up the stack (both summed in SQL)
    const rows = await sql(`
      WITH f AS (SELECT ${bucketStart(bucket)} AS t,
                        coalesce(${groupExpr()}, '(none)') AS k, cost_usd, input_tokens, output_tokens,
                        price_source = 'unpriced' AS unpriced
                 FROM calls WHERE ${where()}),
           top AS (SELECT k, row_number() OVER (ORDER BY ${metric} DESC NULLS LAST, k) AS rank
                   FROM f GROUP BY k ORDER BY rank LIMIT ${MAX_SERIES}),
           g AS (SELECT f.t, coalesce(top.k, 'other') AS series, coalesce(top.rank, ${MAX_SERIES + 1}) AS rank,
                        f.cost_usd, f.input_tokens, f.output_tokens, f.unpriced
                 FROM f LEFT JOIN top ON f.k = top.k),
           per AS (SELECT t, series, rank, coalesce(${metric}, 0) AS v, count(cost_usd) AS priced,
                          count(*) FILTER (WHERE unpriced) AS unpriced
                   FROM g GROUP BY t, series, rank),
           grid AS (SELECT ts.t, s.series, s.rank, coalesce(per.v, 0) AS v, coalesce(per.priced, 0) AS priced,
                           coalesce(per.unpriced, 0) AS unpriced
                    FROM (SELECT DISTINCT t FROM per) ts CROSS JOIN (SELECT DISTINCT series, rank FROM per) s
                    LEFT JOIN per ON per.t = ts.t AND per.series = s.series)
      SELECT t, series, rank, v, sum(v) OVER (PARTITION BY t ORDER BY rank) AS cum, priced, unpriced FROM grid
      UNION ALL
      SELECT NULL, series, rank, sum(v), NULL, sum(priced), sum(unpriced) FROM per GROUP BY series, rank
      ORDER BY t NULLS FIRST, rank`);
    if (gen !== state.gen) return;
    drawSeries(rows, bucket);
  }

  function colorOf(key) {
    if (key === "other") return OTHER_COLOR;
    if (!state.colors.has(key)) state.colors.set(key, PALETTE[state.colors.size % PALETTE.length]);
    return state.colors.get(key);
  }

  function metricText(v) {
    return state.metric === "cost" ? money(v) : state.metric === "tokens" ? compact(v) : int(v);
  }

  function drawSeries(rows, bucket) {
    const box = $("#spend-chart");
    const totals = new Map(), ranks = new Map(), totalUnpriced = new Map(), points = [];
    for (const r of rows) {
      if (r.t === null) {
        totals.set(r.series, r.v); ranks.set(r.series, r.rank);
        totalUnpriced.set(r.series, num(r.priced) === 0 && num(r.unpriced) > 0);
      } else points.push(r);
    }
    $("#spend-empty").hidden = totals.size > 0;
    box.hidden = totals.size === 0;
    if (!totals.size) {
      if (state.chart) { state.chart.destroy(); state.chart = null; state.chartKey = ""; }
      return;
    }
    const keys = [...totals.keys()].sort((a, b) => ranks.get(a) - ranks.get(b)); // bottom of the stack first
    const now = Date.now() / 1000;
    const xsSet = new Set();
    for (let t = Math.floor((now - state.range) / bucket) * bucket; t <= now; t += bucket) xsSet.add(t);
    for (const p of points) xsSet.add(p.t);
    const xs = [...xsSet].sort((a, b) => a - b);
    const at = new Map(xs.map((t, i) => [t, i]));
    const idx = new Map(keys.map((k, i) => [k, i]));
    const own = keys.map(() => new Array(xs.length).fill(0));
    const cum = keys.map(() => new Array(xs.length).fill(0));
    const unpricedAt = keys.map(() => new Array(xs.length).fill(false)); // calls there, none of them priced
    for (const p of points) {
      own[idx.get(p.series)][at.get(p.t)] = num(p.v);
      cum[idx.get(p.series)][at.get(p.t)] = num(p.cum);
      unpricedAt[idx.get(p.series)][at.get(p.t)] = num(p.priced) === 0 && num(p.unpriced) > 0;
    }
    // drawn top of the stack first, so each lower bar covers the part of the one above that is not its own
    const drawn = keys.slice().reverse();
    const data = [xs, ...drawn.map((k) => cum[idx.get(k)])];
    const chartKey = keys.join("\u0001") + "|" + state.metric + "|" + state.groupBy + "|" + bucket;
    if (!state.chart || state.chartKey !== chartKey) {
      if (state.chart) state.chart.destroy();
      box.replaceChildren();
      state.chart = makeChart(box, drawn, data, bucket);
      state.chartKey = chartKey;
    } else {
      state.chart.setData(data);
    }
    state.legend = keys.map((k) => ({ key: k, total: totals.get(k), own: own[idx.get(k)], slot: drawn.indexOf(k) + 1,
                                      unpriced: totalUnpriced.get(k), unpricedAt: unpricedAt[idx.get(k)] }));
    renderLegend(null);
  }

  function makeChart(box, drawn, data, bucket) {
    const width = Math.max(320, box.clientWidth);
    const bars = uPlot.paths.bars({ size: [0.82, Infinity], align: 0 });
    const opts = {
      width, height: CHART_H,
      legend: { show: false },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: (u, min, max) => [min - bucket / 2, max + bucket / 2] },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.08 : 1] },
      },
      axes: [
        { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e3e6ec" }, space: 70,
          values: (u, splits) => splits.map((v) => timeLabel(v, bucket)) },
        { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e3e6ec" }, size: 72,
          values: (u, vals) => vals.map((v) => metricText(v)) },
      ],
      series: [{}, ...drawn.map((k) => ({
        label: k, stroke: colorOf(k), fill: colorOf(k), width: 0, paths: bars, points: { show: false },
      }))],
      hooks: { setCursor: [(u) => renderLegend(u.cursor.idx)] },
    };
    const u = new uPlot(opts, data, box);
    box.append(el("div", { class: "legend series-legend", id: "spend-legend" }));
    if (!state.resizer) {
      state.resizer = new ResizeObserver(() => {
        if (state.chart) state.chart.setSize({ width: Math.max(320, box.clientWidth), height: CHART_H });
      });
      state.resizer.observe(box);
    }
    return u;
  }

  function timeLabel(epochS, bucket) {
    const d = new Date(epochS * 1000);
    const hm = { hour: "2-digit", minute: "2-digit", hour12: false };
    if (state.range > 86400) return d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + d.toLocaleTimeString([], hm);
    return d.toLocaleTimeString([], bucket < 60 ? { ...hm, second: "2-digit" } : hm);
  }

  function renderLegend(idx) {
    const legend = $("#spend-legend");
    if (!legend || !state.chart) return;
    const u = state.chart;
    const hovering = idx !== null && idx !== undefined && idx >= 0;
    const items = state.legend.map((item) => {
      const unpriced = state.metric === "cost" && (hovering ? item.unpricedAt[idx] : item.unpriced);
      return el("span", { class: "legend-item", "data-series": item.key },
        el("i", { style: { background: colorOf(item.key) } }), item.key + " ",
        el("b", { class: unpriced ? "unpriced" : null, title: unpriced ? "no known price: cost_usd is NULL" : null,
                  text: unpriced ? "unpriced" : metricText(hovering ? item.own[idx] : item.total) }));
    });
    let when = "in range";
    if (hovering) {
      const top = state.legend.length ? u.data[1][idx] : 0; // the top of the stack: the bucket's total
      when = new Date(u.data[0][idx] * 1000).toLocaleTimeString([], { hour12: false }) + " · " + metricText(top);
    }
    legend.replaceChildren(el("span", { class: "legend-when", text: when }), ...items);
  }

  async function loadBudgets(gen) {
    const doc = await getJSON("budgets");
    if (gen !== state.gen) return;
    const list = $("#budgets");
    const rows = doc.budgets || [];
    $("#budgets-empty").hidden = rows.length > 0;
    $("#budgets-refused").textContent = doc.refused ? `${int(doc.refused)} calls refused since start` : "";
    list.replaceChildren(...rows.map(budgetRow));
  }

  function budgetRow(r) {
    const util = Number(r.utilization) || 0;
    const node = el("div", { class: "budget", "data-rule": r.rule, "data-key": r.key || "", "data-utilization": String(util) });
    node.append(el("div", { class: "budget-head" },
      el("span", { class: "budget-name", text: r.rule }),
      r.key ? el("span", { class: "budget-key", text: `${r.per}=${r.key}` }) : null,
      el("span", { class: "badge", text: r.window }),
      el("span", { class: "badge " + r.action, text: r.action })));
    const bar = el("div", { class: ("bar " + utilClass(util)).trim(), title: `${utilText(util)} used` });
    const spentW = Math.min(util, 1) * 100;
    let reservedW = 0;
    if (r.limit_usd !== null && num(r.limit_usd) > 0 && num(r.reserved_usd) > 0) {
      reservedW = Math.min(100 - spentW, (num(r.reserved_usd) / num(r.limit_usd)) * 100);
    }
    bar.append(el("span", { class: "spent", style: { width: spentW + "%" } }));
    if (reservedW > 0) bar.append(el("span", { class: "reserved", style: { left: spentW + "%", width: reservedW + "%" },
                                               title: `${money(r.reserved_usd)} reserved by calls in flight` }));
    node.append(bar);
    const parts = [];
    if (r.limit_usd !== null) parts.push(el("span", { class: "spent", "data-spent": r.spent_usd, title: `$${r.spent_usd} spent` },
      `${money(r.spent_usd)} of ${money(r.limit_usd)}`));
    if (r.limit_tokens !== null) parts.push(el("span", { class: "spent" }, `${compact(r.spent_tokens)} of ${compact(r.limit_tokens)} tokens`));
    if (r.limit_requests !== null) parts.push(el("span", { class: "spent" }, `${int(r.requests)} of ${int(r.limit_requests)} requests`));
    parts.push(el("span", { class: ("util " + utilClass(util)).trim(), text: utilText(util) }));
    if (num(r.reserved_usd) > 0) parts.push(el("span", { text: `+${money(r.reserved_usd)} in flight` }));
    // a threshold alert fired this window; one above what is spent now (a refused call's reservation
    // would have passed it) is told apart from one the spend reached
    const fired = (r.alerts_fired || []).map((t) => {
      const reached = util >= num(t);
      return el("span", { class: "chip" + (reached ? (num(t) >= 1 ? " hit" : "") : " ahead"),
                          title: reached ? "alert fired in this window" : `alert fired in this window by a refused call; spend is at ${utilText(util)}`,
                          text: pct(t) });
    });
    parts.push(...fired);
    parts.push(el("span", { class: "reset", text: duration(r.seconds_to_reset) }));
    node.append(el("div", { class: "budget-foot" }, ...parts));
    return node;
  }

  // the whole fleet: one line per sidecar (the fleet ledger's `instance` column)
  async function loadFleet(gen) {
    const rows = await sql(`
      SELECT coalesce(instance, '(unknown)') AS instance, count(*) AS calls, coalesce(sum(cost_usd), 0) AS cost,
             count(cost_usd) AS priced, count(*) FILTER (WHERE price_source = 'unpriced') AS unpriced,
             max(started_at) AS last
      FROM calls WHERE ${where()} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 200`);
    if (gen !== state.gen) return;
    $("#fleet-empty").hidden = rows.length > 0;
    $("#fleet-table").hidden = rows.length === 0;
    $("#fleet-table tbody").replaceChildren(...rows.map((r) => el("tr", { "data-instance": r.instance },
      el("td", { text: r.instance }),
      el("td", { class: "num", text: int(r.calls) }),
      el("td", { class: "num", "data-value": String(r.cost),
                 text: num(r.priced) === 0 && num(r.unpriced) > 0 ? "unpriced" : money(r.cost) }),
      el("td", { class: "num", text: int(r.unpriced) }),
      el("td", { title: r.last, text: r.last ? clock(r.last) : "" }))));
  }

  // routes' targets with their circuit states (GET /_meterline/routes: this forwarder's circuits)
  async function loadRoutes(gen) {
    const doc = await getJSON("routes");
    if (gen !== state.gen) return;
    const routes = Object.entries(doc.routes || {});
    $("#routes-part").hidden = routes.length === 0;
    $("#routes").replaceChildren(...routes.flatMap(([name, r]) => (r.targets || []).map((t) => routeRow(name, r, t))));
  }

  function routeRow(name, r, t) {
    const circuit = t.state || "closed";
    const node = el("div", { class: "budget", "data-route": name, "data-target": t.target, "data-circuit": circuit });
    node.append(el("div", { class: "budget-head" },
      el("span", { class: "budget-name", text: name }),
      el("span", { class: "budget-key", text: t.target }),
      el("span", { class: "badge", text: r.strategy }),
      el("span", { class: "badge " + (circuit === "open" ? "block" : circuit === "half_open" ? "alert" : ""), text: circuit })));
    const parts = [];
    if (t.recent_error_rate !== null && t.recent_error_rate !== undefined) {
      parts.push(el("span", { text: `${pct(t.recent_error_rate)} errors of last ${int(t.recent_attempts)}` }));
    }
    if (t.ttft_ms !== null && t.ttft_ms !== undefined) parts.push(el("span", { text: `ttft ${t.ttft_ms} ms` }));
    if (t.opened) parts.push(el("span", { text: `opened ${int(t.opened)}×` }));
    node.append(el("div", { class: "budget-foot" }, ...parts));
    return node;
  }

  async function loadAlerts(gen) {
    let rows = [];
    try {
      rows = await sql(`SELECT fired_at, rule, split_key, threshold, utilization, spent_usd, limit_usd, action
                        FROM alerts ORDER BY fired_at DESC LIMIT 15`);
    } catch (e) {
      rows = []; // a ledger without budgets has no alerts table
    }
    if (gen !== state.gen) return;
    $("#alerts-empty").hidden = rows.length > 0;
    $("#alerts").replaceChildren(...rows.map((a) => el("li", { "data-rule": a.rule },
      el("time", { datetime: a.fired_at, title: a.fired_at, text: clock(a.fired_at) }),
      el("span", { class: "alert-rule", text: a.rule + (a.split_key ? ` (${a.split_key})` : "") }),
      el("span", { class: "chip" + (num(a.threshold) >= 1 ? " hit" : ""), text: pct(a.threshold) }),
      el("span", { class: "muted alert-spend",
                   text: a.limit_usd !== null ? `${money(a.spent_usd)} of ${money(a.limit_usd)}` : `${pct(a.utilization)} used` }))));
  }

  // async jobs still holding a reservation, and those that ended `unknown` (docs/jobs.md)
  async function loadJobs(gen) {
    let rows = [];
    try {
      rows = await sql(`SELECT job_id, state, provider, model, submitted_at, estimate_usd, cost_usd
                        FROM jobs WHERE settled_at IS NULL OR state = 'unknown'
                        ORDER BY submitted_at DESC NULLS LAST LIMIT 10`);
    } catch (e) {
      rows = []; // a ledger of an older version has no jobs table
    }
    if (gen !== state.gen) return;
    $("#jobs-empty").hidden = rows.length > 0;
    $("#jobs").replaceChildren(...rows.map((j) => el("li", { "data-job": j.job_id, "data-state": j.state },
      el("time", { datetime: j.submitted_at || "", title: j.submitted_at || "", text: j.submitted_at ? clock(j.submitted_at) : "" }),
      el("span", { class: "alert-rule", text: `${j.provider || "?"} ${j.model || ""}` }),
      el("span", { class: "chip" + (j.state === "unknown" ? " hit" : ""), text: j.state }),
      el("span", { class: "muted alert-spend",
                   text: j.cost_usd !== null ? money(j.cost_usd)
                       : j.estimate_usd !== null ? `~${money(j.estimate_usd)} reserved` : "no estimate" }))));
  }

  async function loadTokens(gen) {
    const rows = await sql(`
      WITH rate AS (
        SELECT provider, ${MODEL} AS model, sum(input_cost_usd) / sum(input_tokens) AS full_rate
        FROM calls
        WHERE started_at >= now() - INTERVAL 30 DAY AND input_cost_usd IS NOT NULL AND input_tokens > 0
          AND coalesce(cache_read_tokens, 0) = 0 AND coalesce(cache_write_tokens, 0) = 0
        GROUP BY ALL),
      f AS (SELECT provider, ${MODEL} AS model, input_tokens, cache_read_tokens, cache_write_tokens,
                   output_tokens, reasoning_tokens, input_cost_usd, cost_usd
            FROM calls WHERE ${where()} AND input_tokens IS NOT NULL)
      SELECT f.provider, f.model, grouping(f.provider, f.model) AS total_row, count(*) AS calls,
             sum(f.input_tokens - coalesce(f.cache_read_tokens, 0) - coalesce(f.cache_write_tokens, 0)) AS input,
             sum(coalesce(f.cache_read_tokens, 0)) AS cache_read,
             sum(coalesce(f.cache_write_tokens, 0)) AS cache_write,
             sum(coalesce(f.output_tokens, 0) - coalesce(f.reasoning_tokens, 0)) AS output,
             sum(coalesce(f.reasoning_tokens, 0)) AS reasoning,
             sum(f.input_tokens) + sum(coalesce(f.output_tokens, 0)) AS tokens,
             sum(coalesce(f.cache_read_tokens, 0)) / nullif(sum(f.input_tokens), 0) AS cached_share,
             CAST(sum(f.input_tokens * r.full_rate - f.input_cost_usd)
                  FILTER (WHERE f.cache_read_tokens > 0 AND r.full_rate IS NOT NULL) AS DECIMAL(38, 6)) AS saved_usd,
             count(*) FILTER (WHERE f.cache_read_tokens > 0 AND r.full_rate IS NULL) AS unestimated,
             sum(f.cost_usd) AS cost_usd, count(f.cost_usd) AS priced
      FROM f LEFT JOIN rate r ON r.provider = f.provider AND r.model = f.model
      GROUP BY GROUPING SETS ((f.provider, f.model), ())
      ORDER BY total_row DESC, tokens DESC LIMIT 13`);
    if (gen !== state.gen) return;
    const total = rows.find((r) => r.total_row > 0);
    const models = rows.filter((r) => r.total_row === 0);
    const hasTokens = total && num(total.tokens) > 0;
    $("#tokens-empty").hidden = Boolean(hasTokens);
    $("#mix-total").hidden = $("#mix-legend").hidden = $("#tokens-table").hidden = !hasTokens;
    if (!hasTokens) return;
    $("#mix-total").replaceChildren(...mixBar(total));
    $("#mix-legend").replaceChildren(
      ...MIX.map(([k, label]) => el("span", { "data-kind": k }, el("i", { class: "k-" + k }), label + " ", el("b", { text: compact(total[k]) }))),
      el("span", { "data-kind": "cached_share", title: "cache reads / all input tokens" }, "cached share ", el("b", { text: pct(total.cached_share, 1) })),
      el("span", { "data-kind": "saved", title: "estimate: see the ? above" }, "saved by caching ≈ ", el("b", { text: total.saved_usd === null ? "–" : money(total.saved_usd) })));
    $("#tokens-table tbody").replaceChildren(...models.map((r) => el("tr", { "data-model": r.model },
      el("td", { class: "model", title: `${r.provider} / ${r.model}`, text: r.model }),
      el("td", { class: "num", text: int(r.calls) }),
      el("td", { class: "bar-col" }, el("div", { class: "mix", title: MIX.map(([k, l]) => `${l}: ${int(r[k])}`).join("\n") }, ...mixBar(r))),
      el("td", { class: "num", text: pct(r.cached_share, 1) }),
      el("td", { class: "num", title: num(r.unestimated) > 0 ? "no uncached calls of this model to estimate its full input rate" : "",
                 text: r.saved_usd === null ? "–" : money(r.saved_usd) }),
      el("td", { class: "num", "data-cost": r.cost_usd === null ? "" : r.cost_usd,
                 title: num(r.priced) < num(r.calls) ? `${int(num(r.calls) - num(r.priced))} calls without a known price` : null,
                 text: r.cost_usd === null ? "unpriced" : money(r.cost_usd) }))));
  }

  function mixBar(r) {
    const total = MIX.reduce((s, [k]) => s + (num(r[k]) || 0), 0) || 1;
    return MIX.map(([k, label]) => el("span", { class: "k-" + k, title: `${label}: ${int(r[k])}`,
                                                 style: { width: ((num(r[k]) || 0) / total) * 100 + "%" } }));
  }

  async function loadLatency(gen) {
    const ok = state.filters.outcome ? "" : " AND outcome = 'ok'";
    const q = (col) => `quantile_cont(${col}, [0.5, 0.95, 0.99])`;
    const rows = await sql(`
      SELECT provider, ${MODEL} AS model, count(*) AS calls,
             ${q("duration_ms")} AS duration, ${q("ttft_ms")} AS ttft, ${q("overhead_ms")} AS overhead
      FROM calls WHERE ${where()}${ok} GROUP BY ALL ORDER BY calls DESC, model LIMIT 15`);
    if (gen !== state.gen) return;
    $("#latency-empty").hidden = rows.length > 0;
    $("#latency-table").hidden = rows.length === 0;
    const cells = (list) => [0, 1, 2].map((i) => el("td", { class: "num", text: list ? ms(list[i]) : "–" }));
    $("#latency-table tbody").replaceChildren(...rows.map((r) => el("tr", { "data-model": r.model },
      el("td", { class: "model", title: `${r.provider} / ${r.model}`, text: r.model }),
      el("td", { class: "num", text: int(r.calls) }),
      ...cells(r.duration), ...cells(r.ttft), ...cells(r.overhead))));
  }

  async function loadCalls(gen) {
    const rows = await sql(`
      SELECT call_id, started_at, app, provider, ${MODEL} AS model, user_id, tags, outcome, status_code, stream,
             input_tokens, output_tokens, cost_usd, duration_ms, trace_id, count(*) OVER () AS total
      FROM calls WHERE ${where()} ORDER BY started_at DESC, call_id LIMIT 50`);
    if (gen !== state.gen) return;
    const total = rows.length ? rows[0].total : 0;
    $("#calls-empty").hidden = rows.length > 0;
    $("#calls-table").hidden = rows.length === 0;
    $("#calls-count").textContent = rows.length ? `latest ${int(rows.length)} of ${int(total)} in range` : "";
    $("#calls-count").dataset.total = String(total);
    const before = state.seenCalls;
    state.seenCalls = new Set(rows.map((r) => r.call_id));
    $("#calls-table tbody").replaceChildren(...rows.map((r) => {
      const tr = el("tr", { "data-call-id": r.call_id, class: [before && !before.has(r.call_id) ? "fresh" : "",
                                                             state.selected === r.call_id ? "selected" : ""].join(" ").trim() || null },
        el("td", { title: r.started_at, text: clock(r.started_at) }),
        el("td", { text: r.app || "" }),
        el("td", { text: r.provider || "" }),
        el("td", { class: "model", title: (r.model || "") + (r.stream ? " (streamed)" : ""), text: (r.model || "") + (r.stream ? " ⇢" : "") }),
        el("td", { text: r.user_id || "" }),
        el("td", { class: "tags", title: tagsText(r.tags), text: tagsText(r.tags) }),
        el("td", {}, el("span", { class: "outcome " + r.outcome, title: r.status_code ? `HTTP ${r.status_code}` : "", text: r.outcome })),
        el("td", { class: "num", text: int(r.input_tokens) }),
        el("td", { class: "num", text: int(r.output_tokens) }),
        el("td", { class: "num", "data-cost": r.cost_usd === null ? "" : r.cost_usd, title: r.cost_usd === null ? "not priced" : `$${r.cost_usd}`, text: money(r.cost_usd) }),
        el("td", { class: "num", text: ms(r.duration_ms) }),
        el("td", {}, traceLink(r.trace_id, true)));
      tr.addEventListener("click", (ev) => {
        if (ev.target.closest("a")) return;
        openDetail(r.call_id);
      });
      return tr;
    }));
  }

  function traceLink(traceId, short) {
    if (!traceId) return el("span", { class: "muted", text: "–" });
    const label = short ? traceId.slice(0, 8) + "…" : traceId;
    if (!state.cfg.jaeger_ui_url) {
      return el("span", { class: "mono muted", title: `trace ${traceId} (set telemetry.jaeger_ui_url to link to Jaeger)`, text: label });
    }
    return el("a", { class: "mono trace", href: `${state.cfg.jaeger_ui_url}/trace/${encodeURIComponent(traceId)}`,
                     target: "_blank", rel: "noopener noreferrer", title: "open the trace in Jaeger", text: label + " ↗" });
  }

  async function openDetail(callId) {
    state.selected = callId;
    for (const tr of document.querySelectorAll("#calls-table tbody tr")) tr.classList.toggle("selected", tr.dataset.callId === callId);
    const rows = await sql(`SELECT * FROM calls WHERE call_id = ${lit(callId)}`);
    if (!rows.length || state.selected !== callId) return;
    const row = rows[0];
    $("#detail-id").textContent = callId;
    const trace = $("#detail-trace");
    trace.replaceChildren(row.trace_id ? el("span", {}, "trace ", traceLink(row.trace_id, false)) : "");
    $("#detail-fields").replaceChildren(...Object.entries(row).flatMap(([k, v]) => [
      el("dt", { text: k }),
      el("dd", { "data-field": k, class: v === null ? "muted" : null, text: show(k, v) }),
    ]));
    $("#detail").hidden = false;
  }

  function show(k, v) {
    if (v === null || v === undefined) return "NULL";
    if (k === "units" && typeof v === "string") {
      try { return JSON.stringify(JSON.parse(v), null, 1); } catch (e) { return v; }
    }
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function closeDetail() {
    state.selected = null;
    $("#detail").hidden = true;
    for (const tr of document.querySelectorAll("#calls-table tbody tr.selected")) tr.classList.remove("selected");
  }

  // --- ledger vs provider: the runs `meterline reconcile` stored (tables reconciliations, reconciliation_rows)

  const RECON_METRICS = [
    ["requests", "requests"], ["uncached_input", "uncached in"], ["cache_read", "cache read"],
    ["cache_write", "cache write"], ["output", "output"], ["images", "images"], ["seconds", "audio s"], ["usd", "usd"],
  ];
  const RECON_MAX_ROWS = 300;
  const recon = { selected: null };

  async function loadReconciliation(gen) {
    // a ledger no run was stored in has no such table: the card says how to make one
    const [t] = await sql(`SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'reconciliations'`);
    const runs = num(t.n) > 0 ? await sql(`
      SELECT run_id, ran_at, provider, strftime(since AT TIME ZONE 'UTC', '%Y-%m-%d %H:%M') AS since,
             strftime(until AT TIME ZONE 'UTC', '%Y-%m-%d %H:%M') AS until, bucket, tolerance, status, ledger_usd, provider_usd,
             covered_share, rows_over, max_drift
      FROM reconciliations ORDER BY ran_at DESC, run_id LIMIT 10`) : [];
    if (gen !== state.gen) return;
    $("#recon-empty").hidden = runs.length > 0;
    $("#recon-runs").hidden = runs.length === 0;
    if (!runs.some((r) => r.run_id === recon.selected)) recon.selected = runs.length ? runs[0].run_id : null;
    $("#recon-runs tbody").replaceChildren(...runs.map((r) => {
      const tr = el("tr", { "data-run-id": r.run_id, "data-status": r.status,
                            class: ("clickable " + (r.run_id === recon.selected ? "selected" : "")).trim() },
        el("td", { title: r.ran_at, text: clock(r.ran_at) }),
        el("td", { text: r.provider }),
        el("td", { text: `${r.since.endsWith("00:00") ? day(r.since) : r.since} .. ${r.until.endsWith("00:00") ? day(r.until) : r.until} · ${r.bucket}` }),
        el("td", {}, el("span", { class: "recon-status " + r.status, title: `tolerance ${pct(r.tolerance, 2)}`,
                                  text: r.status === "ok" ? "agrees" : "drift" })),
        el("td", { class: "num", "data-usd": r.ledger_usd, title: `$${r.ledger_usd}`, text: money(r.ledger_usd) }),
        el("td", { class: "num", "data-usd": r.provider_usd, title: `$${r.provider_usd}`, text: money(r.provider_usd) }),
        el("td", { class: "num", "data-share": r.covered_share === null ? "" : r.covered_share,
                   title: "the share of the provider's spend the ledger accounts for", text: pct(r.covered_share, 1) }),
        el("td", { class: "num", text: int(r.rows_over) }));
      tr.addEventListener("click", () => { recon.selected = r.run_id; loadReconciliation(state.gen); });
      return tr;
    }));
    if (!recon.selected) { $("#recon-rows").hidden = $("#recon-rows-note").hidden = true; return; }
    const run = runs.find((r) => r.run_id === recon.selected);
    const rows = await sql(`
      SELECT *, strftime(bucket AT TIME ZONE 'UTC', '%Y-%m-%d %H:00') AS bucket_utc, count(*) OVER () AS total
      FROM reconciliation_rows WHERE run_id = ${lit(run.run_id)}
      ORDER BY cause IS NULL, width, bucket, model LIMIT ${RECON_MAX_ROWS}`);
    if (gen !== state.gen || recon.selected !== run.run_id) return;
    drawReconRows(run, rows);
  }

  const day = (iso) => String(iso).slice(0, 10);

  function drawReconRows(run, rows) {
    // a column per metric some row compares (images and audio seconds only for their models)
    const shown = RECON_METRICS.filter(([m]) => rows.some((r) => r["ledger_" + m] !== null || r["provider_" + m] !== null));
    $("#recon-rows thead tr").replaceChildren(el("th", { text: "bucket" }), el("th", { text: "model" }),
      ...shown.map(([, label]) => el("th", { class: "num", text: label })),
      el("th", { class: "num", text: "max drift" }), el("th", { text: "cause" }));
    $("#recon-rows tbody").replaceChildren(...rows.map((r) => el("tr", {
        "data-model": r.model, "data-width": r.width, "data-bucket": r.bucket_utc, "data-cause": r.cause || "",
        class: r.cause ? "drift" : null },
      el("td", { title: r.bucket_utc + " UTC", text: r.width === "1h" ? r.bucket_utc : day(r.bucket_utc) }),
      el("td", { class: "model", title: r.model, text: r.model }),
      ...shown.map(([m]) => reconCell(m, r["ledger_" + m], r["provider_" + m])),
      el("td", { class: "num", text: r.max_drift === null ? (r.cause ? "unbounded" : "") : pct(r.max_drift, 2) }),
      el("td", {}, r.cause ? el("span", { class: "recon-cause", text: r.cause }) : ""))));
    $("#recon-rows").hidden = rows.length === 0;
    const total = rows.length ? num(rows[0].total) : 0;
    const note = $("#recon-rows-note");
    note.hidden = false;
    note.textContent = `run ${run.run_id}: ${int(total)} rows` + (total > rows.length ? `, the first ${int(rows.length)} shown (rows past the tolerance first)` : "")
      + "; ledger / provider in each cell, '=' when they agree";
  }

  function reconCell(metric, ledger, provider) {
    const usd = metric === "usd";
    const show = (v) => (v === null ? "–" : usd ? money(v) : int(v));
    const attrs = { class: "num", "data-metric": metric, "data-ledger": ledger === null ? "" : String(ledger),
                    "data-provider": provider === null ? "" : String(provider) };
    if (ledger === null && provider === null) return el("td", attrs);
    if (num(ledger) === num(provider) && String(ledger) === String(provider)) return el("td", { ...attrs, text: show(ledger) + " =" });
    const exact = usd ? `ledger $${ledger ?? "–"}, provider $${provider ?? "–"}` : `ledger ${ledger ?? "–"}, provider ${provider ?? "–"}`;
    return el("td", { ...attrs, class: "num differs", title: exact, text: `${show(ledger)} / ${show(provider)}` });
  }

  // --- the loop ------------------------------------------------------------------------------

  function setStatus(kind, text) {
    $("#status").dataset.state = kind;
    $("#status-text").textContent = text;
  }

  async function refresh(force) {
    if (state.busy && !force) return;
    if (document.hidden && !force) { setStatus("paused", "paused while the tab is hidden"); return; }
    state.busy = true;
    const gen = state.gen;
    try {
      // the fleet view: the panels whose SQL runs on Postgres too; budgets, routes, jobs, tokens, latency
      // and the reconciliation card (DuckDB-only SQL, or this forwarder's state) stay per sidecar
      const jobs = fleetMode() ? [loadKpis(gen), loadSeries(gen), loadFleet(gen), loadCalls(gen)]
        : [loadKpis(gen), loadSeries(gen), loadBudgets(gen), loadAlerts(gen), loadJobs(gen), loadRoutes(gen), loadTokens(gen),
           loadLatency(gen), loadCalls(gen), loadReconciliation(gen)];
      if (state.polls % 5 === 0) jobs.push(loadOptions());
      state.polls += 1;
      const results = await Promise.allSettled(jobs);
      const failed = results.filter((r) => r.status === "rejected");
      if (gen !== state.gen) {
        // drawn for an older view (or token): the newer refresh sets the status
      } else if (failed.length) {
        setStatus("error", `${failed[0].reason.message || failed[0].reason}`.slice(0, 140));
        if (failed.length < results.length) console.warn("meterline: some panels failed", failed.map((f) => f.reason));
      } else {
        setStatus("live", "live · updated " + new Date().toLocaleTimeString([], { hour12: false }));
      }
    } finally {
      state.busy = false;
      // what tests wait for: every panel has been drawn for the current range and filters
      if (gen === state.gen) document.body.dataset.loaded = String(gen);
    }
  }

  function changed() {
    state.gen += 1;
    document.body.dataset.gen = String(state.gen);
    state.seenCalls = null;
    writeHash();
    syncControls();
    state.polls = 0; // reload the filter options too
    refresh(true);
  }

  function wire() {
    $("#range").addEventListener("change", (e) => { state.range = Number(e.target.value); changed(); });
    $("#scope").addEventListener("change", (e) => { state.scope = e.target.value === "fleet" ? "fleet" : "local"; changed(); });
    $("#metric").addEventListener("change", (e) => { state.metric = e.target.value; changed(); });
    $("#group-by").addEventListener("change", (e) => { state.groupBy = e.target.value; changed(); });
    for (const select of document.querySelectorAll("select[data-filter]")) {
      select.addEventListener("change", (e) => { state.filters[select.dataset.filter] = e.target.value; changed(); });
    }
    $("#clear-filters").addEventListener("click", () => {
      for (const k of Object.keys(state.filters)) state.filters[k] = "";
      changed();
    });
    $("#token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("#token").value);
      $("#token").value = "";
      $("#token-form").hidden = true;
      loadConfig().then(changed);
    });
    $("#detail-close").addEventListener("click", closeDetail);
    document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    window.addEventListener("hashchange", () => {
      const token = new URLSearchParams(location.hash.slice(1)).has("token"); // pasted into this tab's URL
      readHash();
      if (token) { $("#token-form").hidden = true; loadConfig().then(changed); } else changed();
    });
  }

  async function start() {
    document.body.dataset.gen = String(state.gen);
    readHash();
    wire();
    syncControls();
    await loadConfig();
    syncControls(); // the config says whether a fleet ledger is there to switch to
    await refresh(true);
    const every = Math.min(5, Math.max(2, Number(state.cfg.poll_s) || POLL_DEFAULT_S)) * 1000;
    state.timer = setInterval(() => refresh(false), every);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
