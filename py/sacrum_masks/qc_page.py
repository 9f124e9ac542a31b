"""The QC review page: one self-contained ``index.html`` (inline CSS and JS, no server, no network).

Rows are written here, worst first (the order of ``records``); the inline script adds sorting, filters by
flag or decision, and review marks:

* click a row's **pass** / **fail** / **artifact** button, or select a row (click, ``j``/``k`` or the arrow
  keys) and press ``p`` / ``f`` / ``a`` (``x`` clears); clicking the mark a row has clears it;
* marks are kept in the browser (``localStorage``, key ``sacrum-qc:<report id>``), so closing the page
  loses nothing;
* **Export YAML** downloads ``qc_fail.yml``: ``FILES_SEG:`` lists the image file names of the masks marked
  fail, the config that spinalcordtoolbox/manual-correction reads
  (``manual_correction.py -config qc_fail.yml -path-img <dataset> -suffix-files-seg _label-sacrum_seg``);
* **Export review.tsv** downloads ``review.tsv`` (columns ``mask``, ``decision``, ``flags``, ``date``; one row
  per marked mask; ``mask`` relative to the folder holding the datasets), read by
  ``sacrum-masks init-config --review``.

``window.sacrumQc`` exposes ``yaml()``, ``tsv()``, ``marks()`` and ``mark(key, decision)`` (what the
buttons call) for scripts and tests.
"""

from __future__ import annotations

import html
import json
from urllib.parse import quote

DECISIONS = ("pass", "fail", "artifact")


def _rel_url(path: str) -> str:
    return "/".join(quote(p) for p in path.split("/"))


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _row(i: int, r: dict, flag_text: dict, png_size) -> str:
    e = html.escape
    flags = "".join(f'<span class="flag f-{e(f)}" title="{e(reason)}">{e(flag_text.get(f, f))}</span>'
                    for f, reason in zip(r["flags"], r["reasons"]))
    reasons = "".join(f"<li>{e(x)}</li>" for x in r["reasons"])
    if r["png"]:
        url = e(_rel_url(r["png"]))
        pic = (f'<a href="{url}"><img src="{url}" width="{png_size[0] // 2}" height="{png_size[1] // 2}" '
               f'alt="{e(r["mask"])}" loading="lazy"></a>')
    else:
        pic = '<span class="nopic">no picture</span>'
    comp = "n/a" if r["components_removed"] is None else str(r["components_removed"])
    image_name = r["image"].rsplit("/", 1)[-1]
    buttons = "".join(f'<button type="button" class="mark m-{d}" data-decision="{d}">{d}</button>' for d in DECISIONS)
    attrs = {"data-key": r["mask"], "data-image": image_name, "data-score": r["score"],
             "data-volume": r["volume_ml"] if r["volume_ml"] is not None else -1,
             "data-entropy": r["boundary_entropy"] if r["boundary_entropy"] is not None else -1,
             "data-dice": r["fold_dice"] if r["fold_dice"] is not None else 2,
             "data-flags": " ".join(r["flags"]), "data-index": i}
    attr = " ".join(f'{k}="{e(str(v))}"' for k, v in attrs.items())
    cls = "flagged" if r["flags"] else "ok"
    return (f'<tr class="{cls}" {attr}><td class="num rank">{i}</td><td>{pic}</td>'
            f'<td class="name">{e(r["mask"])}<br><small>image: {e(r["image"])}</small>'
            f'<br><small>sidecar: {e(r["sidecar"])}</small></td>'
            f'<td class="num">{_fmt(r["score"], 2)}</td><td class="num">{_fmt(r["volume_ml"], 2)}</td>'
            f'<td class="num">{e(comp)}</td>'
            f'<td class="num">{_fmt(r["boundary_entropy"], 3)}</td><td class="num">{_fmt(r["fold_dice"], 3)}</td>'
            f'<td>{flags or "ok"}<ul class="reasons">{reasons}</ul></td>'
            f'<td class="review"><span class="decision">-</span><br>{buttons}</td></tr>')


CSS = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 4px; vertical-align: top; }
td.num { text-align: right; font-family: monospace; }
td.name { font-family: monospace; word-break: break-all; min-width: 16em; max-width: 26em; }
tr.flagged { background: #fff3f0; }
tr.selected { outline: 3px solid #1e90ff; }
tr[data-decision="pass"] td.review { background: #d4edda; }
tr[data-decision="fail"] td.review { background: #f8d7da; }
tr[data-decision="artifact"] td.review { background: #fff3cd; }
.flag { display: inline-block; background: #d9534f; color: white; border-radius: 3px; padding: 1px 4px; margin: 1px; }
.f-error, .f-bad_sidecar { background: #6f42c1; }
ul.reasons { margin: 2px 0 0 1em; padding: 0; font-size: small; }
.controls { position: sticky; top: 0; background: white; padding: 6px 0; border-bottom: 1px solid #ccc; }
button.mark { margin: 1px; }
.decision { font-weight: bold; }
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("qc-data").textContent);
  var KEY = "sacrum-qc:" + data.report_id;
  var tbody = document.querySelector("#qc tbody");
  var rows = Array.prototype.slice.call(tbody.rows);
  var byKey = {};
  rows.forEach(function (r) { byKey[r.dataset.key] = r; });
  var marks = {};
  try { marks = JSON.parse(window.localStorage.getItem(KEY) || "{}") || {}; } catch (err) { marks = {}; }
  var selected = null;

  function save() {
    try { window.localStorage.setItem(KEY, JSON.stringify(marks)); } catch (err) { /* private mode: kept in memory */ }
  }
  function paint(row) {
    var m = marks[row.dataset.key];
    row.dataset.decision = m ? m.decision : "";
    row.querySelector(".decision").textContent = m ? m.decision : "-";
  }
  function counts() {
    var c = {pass: 0, fail: 0, artifact: 0};
    Object.keys(marks).forEach(function (k) { if (byKey[k]) { c[marks[k].decision] += 1; } });
    document.getElementById("counts").textContent =
      c.pass + " pass, " + c.fail + " fail, " + c.artifact + " artifact, " +
      (rows.length - c.pass - c.fail - c.artifact) + " unmarked";
  }
  function mark(key, decision) {
    var row = byKey[key];
    if (!row) { return false; }
    if (!decision || (marks[key] && marks[key].decision === decision)) { delete marks[key]; }
    else { marks[key] = {decision: decision, date: new Date().toISOString().slice(0, 19) + "Z"}; }
    save(); paint(row); counts();
    return true;
  }
  function visible() { return rows.filter(function (r) { return r.style.display !== "none"; }); }
  function select(row) {
    if (selected) { selected.classList.remove("selected"); }
    selected = row;
    if (row) { row.classList.add("selected"); row.scrollIntoView({block: "nearest"}); }
  }
  function sortRows() {
    var how = document.getElementById("sort").value;
    var num = function (r, k) { return parseFloat(r.dataset[k]); };
    var cmp = {
      score: function (a, b) { return num(b, "score") - num(a, "score") || num(a, "index") - num(b, "index"); },
      volume_up: function (a, b) { return num(a, "volume") - num(b, "volume"); },
      volume_down: function (a, b) { return num(b, "volume") - num(a, "volume"); },
      entropy: function (a, b) { return num(b, "entropy") - num(a, "entropy"); },
      dice: function (a, b) { return num(a, "dice") - num(b, "dice"); },
      name: function (a, b) { return a.dataset.key < b.dataset.key ? -1 : (a.dataset.key > b.dataset.key ? 1 : 0); }
    }[how];
    rows.slice().sort(cmp).forEach(function (r) { tbody.appendChild(r); });
    rows = Array.prototype.slice.call(tbody.rows);
  }
  function filterRows() {
    var f = document.getElementById("filter").value;
    var shown = 0;
    rows.forEach(function (r) {
      var flags = r.dataset.flags ? r.dataset.flags.split(" ") : [];
      var d = r.dataset.decision || "";
      var ok = f === "all" || (f === "flagged" && flags.length > 0) || (f === "clean" && flags.length === 0) ||
        (f === "unmarked" && d === "") || (f.indexOf("decision:") === 0 && d === f.slice(9)) ||
        (f.indexOf("flag:") === 0 && flags.indexOf(f.slice(5)) >= 0);
      r.style.display = ok ? "" : "none";
      if (ok) { shown += 1; }
    });
    document.getElementById("shown").textContent = shown + " of " + rows.length + " shown";
  }
  function yamlName(name) {
    return /^[A-Za-z0-9._-]+$/.test(name) ? name : "'" + name.replace(/'/g, "''") + "'";
  }
  function exportYaml() {
    var names = rows.filter(function (r) { var m = marks[r.dataset.key]; return m && m.decision === "fail"; })
      .map(function (r) { return r.dataset.image; });
    names = names.filter(function (n, i) { return names.indexOf(n) === i; }).sort();
    return "FILES_SEG:" + (names.length ? "\n" + names.map(function (n) { return "- " + yamlName(n); }).join("\n") : " []") + "\n";
  }
  function exportTsv() {
    var clean = function (s) { return String(s).replace(/[\t\n\r]/g, " "); };
    var lines = ["mask\tdecision\tflags\tdate"];
    Object.keys(marks).sort().forEach(function (k) {
      var r = byKey[k];
      if (!r) { return; }
      lines.push([k, marks[k].decision, (r.dataset.flags || "").split(" ").filter(Boolean).join(","),
                  marks[k].date].map(clean).join("\t"));
    });
    return lines.join("\n") + "\n";
  }
  function download(text, name, type) {
    var blob = new Blob([text], {type: type});
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  rows.forEach(function (r) {
    paint(r);
    r.addEventListener("click", function (ev) {
      select(r);
      var d = ev.target.getAttribute && ev.target.getAttribute("data-decision");
      if (d) { mark(r.dataset.key, d); }
    });
  });
  document.getElementById("sort").addEventListener("change", function () { sortRows(); filterRows(); });
  document.getElementById("filter").addEventListener("change", filterRows);
  document.getElementById("export-yaml").addEventListener("click", function () {
    download(exportYaml(), "qc_fail.yml", "application/x-yaml");
  });
  document.getElementById("export-tsv").addEventListener("click", function () {
    download(exportTsv(), "review.tsv", "text/tab-separated-values");
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.target && (ev.target.tagName === "SELECT" || ev.target.tagName === "INPUT")) { return; }
    var vis = visible();
    var i = selected ? vis.indexOf(selected) : -1;
    var k = ev.key;
    if (k === "ArrowDown" || k === "j") { select(vis[Math.min(i + 1, vis.length - 1)] || null); ev.preventDefault(); }
    else if (k === "ArrowUp" || k === "k") { select(vis[Math.max(i - 1, 0)] || null); ev.preventDefault(); }
    else if (selected && (k === "p" || k === "f" || k === "a")) {
      mark(selected.dataset.key, {p: "pass", f: "fail", a: "artifact"}[k]);
    } else if (selected && k === "x") { mark(selected.dataset.key, null); }
  });
  counts(); filterRows();
  window.sacrumQc = {yaml: exportYaml, tsv: exportTsv, marks: function () { return JSON.parse(JSON.stringify(marks)); },
                     mark: mark};
})();
"""


def build_index_html(records: list[dict], meta: dict) -> str:
    """The review page for ``records`` (qc.json's ``masks``, worst first). All text escaped, links relative."""
    e = html.escape
    flag_text = meta["flags"]
    present = [f for f in flag_text if any(f in r["flags"] for r in records)]
    options = ['<option value="all">all masks</option>', '<option value="flagged">flagged</option>',
               '<option value="clean">not flagged</option>', '<option value="unmarked">not marked yet</option>']
    options += [f'<option value="decision:{d}">marked {d}</option>' for d in DECISIONS]
    options += [f'<option value="flag:{e(f)}">flag: {e(flag_text[f])}</option>' for f in present]
    rows = "\n".join(_row(i, r, flag_text, meta["png_size"]) for i, r in enumerate(records, 1))
    gen = meta["GeneratedBy"]
    c = meta["counts"]
    # the data block: "</" escaped so that no string can close the script element
    data = json.dumps({"report_id": meta["report_id"], "root": meta["root"]}).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Sacrum mask QC: {e(meta['title'])}</title>
<style>{CSS}</style></head><body>
<h1>Sacrum mask QC: {e(meta['title'])}</h1>
<p>{c['masks']} masks, {c['flagged']} flagged, {c['failed']} unreadable; datasets in <code>{e(meta['root'])}</code>.
Ranked worst first by score = number of failed checks + the largest ratio of a measure to its threshold
(a flagged mask scores 2 or more, a clean one under 1, an unreadable one 100).<br>
Generated by {e(gen['Name'])} {e(gen['Version'])} on {e(gen['Date'])}: <code>{e(gen['CommandLine'])}</code></p>
<div class="controls">
<label>sort <select id="sort"><option value="score">score (worst first)</option>
<option value="volume_up">volume (smallest first)</option><option value="volume_down">volume (largest first)</option>
<option value="entropy">boundary entropy (highest first)</option><option value="dice">fold Dice (lowest first)</option>
<option value="name">name</option></select></label>
<label>show <select id="filter">{''.join(options)}</select></label>
<span id="shown"></span> | <span id="counts"></span> |
<button type="button" id="export-yaml">Export YAML (fails, for manual-correction)</button>
<button type="button" id="export-tsv">Export review.tsv</button>
<small>keys: j/k or arrows select, p pass, f fail, a artifact, x clear</small>
</div>
<table id="qc">
<thead><tr><th>#</th><th>sagittal | coronal | axial; sagittal strip</th><th>mask</th><th>score</th>
<th>volume (mL)</th><th>components removed</th><th>boundary entropy (bits)</th><th>fold Dice</th>
<th>flags and reasons</th><th>review</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<script id="qc-data" type="application/json">{data}</script>
<script>{JS}</script>
</body></html>
"""
