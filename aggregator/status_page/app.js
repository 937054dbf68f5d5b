// cotune status page: polls the aggregator's JSON every two seconds and redraws. No library,
// no build step; every value from the ledger is written as text (never as HTML).
"use strict";
(function () {
  var PAGE = 50;
  var asked = /[?&]poll_ms=(\d+)/.exec(window.location.search);
  var POLL_MS = asked ? Math.max(200, parseInt(asked[1], 10)) : 2000;
  var devOffset = 0, selected = null;
  var SVGNS = "http://www.w3.org/2000/svg";

  function $(id) { return document.getElementById(id); }
  function text(el, v) { el.textContent = v === null || v === undefined ? "-" : String(v); }
  function fmtNum(v, digits) {
    if (v === null || v === undefined || isNaN(v)) return "-";
    return Number(v).toFixed(digits === undefined ? 1 : digits);
  }
  function fmtBytes(v) {
    if (v === null || v === undefined) return "-";
    var u = ["B", "KB", "MB", "GB", "TB"], i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return v.toFixed(i ? 1 : 0) + " " + u[i];
  }
  function ago(ts, now) {
    if (!ts) return "-";
    var s = Math.max(0, (now || Date.now() / 1000) - ts);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); }
  function row(cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (c) {
      var td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c); else text(td, c);
      tr.appendChild(td);
    });
    return tr;
  }
  function get(url) {
    return fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }

  // -- plots: small SVG line charts --------------------------------------------------------------
  function plot(svg, xs, series, fromZero) {
    clear(svg);
    var W = 320, H = 140, L = 36, R = 8, T = 8, B = 18;
    var ys = [];
    series.forEach(function (s) { s.values.forEach(function (v) { if (v !== null && v !== undefined) ys.push(v); }); });
    if (!xs.length || !ys.length) {
      var t = document.createElementNS(SVGNS, "text");
      t.setAttribute("x", 120); t.setAttribute("y", 70); t.textContent = "no data yet";
      svg.appendChild(t); return;
    }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (fromZero !== false) y0 = Math.min(0, y0);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) y1 = y0 + 1;
    function px(x) { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    function py(y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); }
    [[L, T, L, H - B], [L, H - B, W - R, H - B]].forEach(function (a) {
      var ln = document.createElementNS(SVGNS, "line");
      ln.setAttribute("x1", a[0]); ln.setAttribute("y1", a[1]); ln.setAttribute("x2", a[2]); ln.setAttribute("y2", a[3]);
      ln.setAttribute("class", "axis"); svg.appendChild(ln);
    });
    [[y1, T + 6], [y0, H - B]].forEach(function (a) {
      var t = document.createElementNS(SVGNS, "text");
      t.setAttribute("x", 2); t.setAttribute("y", a[1]); t.textContent = Number(a[0]).toPrecision(3);
      svg.appendChild(t);
    });
    [[x0, L], [x1, W - R - 12]].forEach(function (a) {
      var t = document.createElementNS(SVGNS, "text");
      t.setAttribute("x", a[1]); t.setAttribute("y", H - 4); t.textContent = "r" + a[0];
      svg.appendChild(t);
    });
    series.forEach(function (s, k) {
      var pts = [];
      xs.forEach(function (x, i) { var v = s.values[i]; if (v !== null && v !== undefined) pts.push(px(x).toFixed(1) + "," + py(v).toFixed(1)); });
      var pl = document.createElementNS(SVGNS, "polyline");
      pl.setAttribute("points", pts.join(" ")); pl.setAttribute("fill", "none");
      pl.setAttribute("stroke", s.color); pl.setAttribute("stroke-width", 2);
      svg.appendChild(pl);
      var lg = document.createElementNS(SVGNS, "text");
      lg.setAttribute("x", W - R - 90); lg.setAttribute("y", T + 10 + 11 * k); lg.setAttribute("fill", s.color);
      lg.textContent = s.name; svg.appendChild(lg);
    });
  }

  // -- the summary -----------------------------------------------------------------------------
  function renderStatus(d) {
    var svc = d.service || {}, cur = d.current;
    text($("online"), svc.clients_online);
    text($("mode"), (svc.mode || "sync") + " rounds" + (svc.rounds ? ", " + svc.rounds + " planned" : ""));
    if (d.federation) { text($("fed"), d.federation.id); text($("algo"), d.federation.algorithm); }
    text($("updated"), "updated " + new Date().toLocaleTimeString());
    if (cur) {
      text($("round-line"), "round " + cur.round + " " + cur.status + ": " + cur.accepted + " accepted, " +
        cur.rejected + " rejected, " + cur.pending + " pending of " + cur.selected + " selected");
      ["round", "status", "selected", "accepted", "rejected", "pending", "dropped", "quorum"].forEach(function (k) {
        text($("c-" + k), cur[k]);
      });
      text($("c-deadline"), cur.status === "open" && cur.deadline ? Math.max(0, Math.round(cur.deadline - d.now)) + " s" : "-");
      var n = Math.max(1, cur.selected);
      $("bar-accepted").style.width = (100 * cur.accepted / n) + "%";
      $("bar-rejected").style.width = (100 * cur.rejected / n) + "%";
      $("bar-quorum").style.left = cur.quorum ? (100 * cur.quorum / n) + "%" : "100%";
    }
    var hist = $("history-rows"); clear(hist);
    d.rounds.slice().reverse().slice(0, 50).forEach(function (r) {
      hist.appendChild(row([r.round, r.status, fmtNum(r.seconds), r.selected, r.accepted, r.quorum, r.skipped || ""]));
    });
    var done = d.rounds.filter(function (r) { return r.status === "committed"; });
    var xs = done.map(function (r) { return r.round; });
    plot($("plot-time"), xs, [{ name: "seconds", color: "#3b62c4", values: done.map(function (r) { return r.seconds; }) }]);
    plot($("plot-bytes"), xs, [
      { name: "up", color: "#c4663b", values: done.map(function (r) { return r.bytes_up === null ? null : r.bytes_up / 1048576; }) },
      { name: "down", color: "#3b8fc4", values: done.map(function (r) { return r.bytes_down === null ? null : r.bytes_down / 1048576; }) }]);
    plot($("plot-quality"), xs, [
      { name: "before", color: "#a0a0b0", values: done.map(function (r) { return r.mean_ppl_before; }) },
      { name: "after", color: "#3a9a5b", values: done.map(function (r) { return r.mean_ppl_after; }) }], false);
    var counts = Object.keys(d.rejections || {}).map(function (k) { return k + ": " + d.rejections[k]; });
    text($("reject-counts"), counts.length ? counts.join(" · ") : "none");
    var rej = $("reject-rows"); clear(rej);
    (d.recent_rejections || []).forEach(function (e) {
      rej.appendChild(row([new Date(e.at * 1000).toLocaleTimeString(), e.round, e.client || "?",
        (e.kind === "wire_rejected" ? "wire: " : "") + e.reason, e.detail || ""]));
    });
  }

  // -- the devices -----------------------------------------------------------------------------
  function renderDevices(p) {
    var body = $("device-rows"); clear(body);
    var now = Date.now() / 1000;
    text($("dev-total"), "(" + p.total + " seen in the last " + p.window + " rounds)");
    text($("dev-page"), p.total ? (p.offset + 1) + "–" + Math.min(p.total, p.offset + p.devices.length) + " of " + p.total : "");
    p.devices.forEach(function (d) {
      var on = document.createElement("span");
      on.className = d.online ? "online" : "offline"; on.textContent = d.online ? "online" : "offline";
      var a = document.createElement("a");
      a.className = "detail"; a.textContent = "rounds"; a.href = "#device-detail";
      a.addEventListener("click", function () { selected = d.client; loadDetail(); });
      var tr = row([d.client, on, ago(d.last_seen, now), d.accepted + "/" + d.rejected + "/" + d.dropped,
        fmtBytes(d.bytes_up), fmtBytes(d.bytes_down),
        d.peak_memory_bytes === null ? "-" : fmtBytes(d.peak_memory_bytes) + (d.peak_memory_kind ? " (" + d.peak_memory_kind + ")" : ""),
        fmtNum(d.tokens_per_s, 0), d.power_mean_w === null ? "-" : fmtNum(d.power_mean_w, 2) + " W",
        d.temperature_peak_c === null ? "-" : fmtNum(d.temperature_peak_c, 0) + " °C",
        fmtNum(d.ppl_before, 2) + " → " + fmtNum(d.ppl_after, 2), a]);
      tr.setAttribute("data-client", d.client);
      body.appendChild(tr);
    });
    $("dev-prev").disabled = p.offset <= 0;
    $("dev-next").disabled = p.offset + p.devices.length >= p.total;
  }
  function loadDevices() {
    var q = encodeURIComponent($("dev-q").value || "");
    return get("api/devices?offset=" + devOffset + "&limit=" + PAGE + "&sort=" + $("dev-sort").value + "&q=" + q)
      .then(renderDevices);
  }
  function loadDetail() {
    if (!selected) return Promise.resolve();
    return get("api/device?id=" + encodeURIComponent(selected)).then(function (d) {
      $("device-detail").hidden = false;
      text($("detail-id"), d.client);
      $("detail-csv").href = "api/device.csv?id=" + encodeURIComponent(d.client);
      var body = $("detail-rows"); clear(body);
      d.rounds.forEach(function (r) {
        body.appendChild(row([r.round, r.status, fmtNum(r.seconds), fmtBytes(r.peak_memory_bytes), fmtBytes(r.bytes_up),
          fmtBytes(r.bytes_down), fmtNum(r.tokens_per_s, 0), r.power_mean_w === null ? "-" : fmtNum(r.power_mean_w, 2) + " W",
          r.temperature_peak_c === null ? "-" : fmtNum(r.temperature_peak_c, 0) + " °C", fmtNum(r.ppl_before, 2), fmtNum(r.ppl_after, 2)]));
      });
    });
  }

  function tick() {
    Promise.all([get("api/status").then(renderStatus), loadDevices(), loadDetail()])
      .catch(function (e) { text($("updated"), "waiting for the aggregator (" + e.message + ")"); })
      .then(function () { setTimeout(tick, POLL_MS); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    $("dev-prev").addEventListener("click", function () { devOffset = Math.max(0, devOffset - PAGE); loadDevices(); });
    $("dev-next").addEventListener("click", function () { devOffset += PAGE; loadDevices(); });
    $("dev-sort").addEventListener("change", function () { devOffset = 0; loadDevices(); });
    $("dev-q").addEventListener("input", function () { devOffset = 0; loadDevices(); });
    tick();
  });
})();
