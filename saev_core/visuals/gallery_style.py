"""The gallery page's static parts: its stylesheet, its script (sorting by a column header; the overlay, original,
outline and size controls, which only set classes on ``<body>``) and its Content-Security-Policy (images from files
only, nothing from the network)."""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; --h: 180px; }
body.size-s { --h: 112px; }
body.size-l { --h: 300px; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }
th button { font: inherit; font-weight: bold; background: none; border: 0; padding: 0; cursor: pointer; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.imgs { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; }
.pair { display: flex; gap: 2px; align-items: flex-start; }
.pic { position: relative; display: block; }
.pic img { height: var(--h); width: auto; display: block; }
.pic.plain img { height: calc(var(--h) * var(--r, 1)); }
body.no-overlay .pic.heat { display: none; }
body.no-beside:not(.no-overlay) .pic.plain { display: none; }
svg.outline { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
.pic.heat svg.outline { height: calc(100% * var(--r, 1)); }
body.no-outline svg.outline { display: none; }
figcaption { font-size: 11px; width: 0; min-width: 100%; overflow: hidden; text-overflow: ellipsis;
             white-space: nowrap; }
svg.hist { display: block; }
td.classes { min-width: 11em; }
.small { font-size: 11px; color: #666; }
#latents { width: 100%; }
#latents tr[data-latent] td { border-bottom: 0; }
#latents tr.pics td { border-bottom: 2px solid #ccc; padding-top: 0; }
#controls { position: sticky; top: 0; background: #fff; padding: 6px 0; z-index: 1; border-bottom: 1px solid #ddd; }
#controls label { margin-right: 1.2em; }
tr:target { background: #fff7d6; }
"""

JS = """
(function () {
  "use strict";
  var table = document.getElementById("latents");
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.querySelectorAll("th[data-key]"));
  function num(tr, key) { return parseFloat(tr.getAttribute("data-" + key)); }
  function sortBy(th) {
    var key = th.getAttribute("data-key");
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var sign = ascending ? 1 : -1;
    // Each latent is two rows: its numbers (data-latent) and, under them, its pictures; they move together.
    var rows = Array.prototype.slice.call(tbody.querySelectorAll("tr[data-latent]"));
    rows.sort(function (a, b) {
      var x = num(a, key), y = num(b, key);
      var xNaN = isNaN(x), yNaN = isNaN(y);
      if (xNaN !== yNaN) { return xNaN ? 1 : -1; }
      if (!xNaN && x !== y) { return sign * (x < y ? -1 : 1); }
      return num(a, "latent") - num(b, "latent");
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (tr) {
      var pics = tr.nextElementSibling;
      frag.appendChild(tr);
      if (pics && pics.classList.contains("pics")) { frag.appendChild(pics); }
    });
    tbody.appendChild(frag);
    headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  headers.forEach(function (th) { th.addEventListener("click", function () { sortBy(th); }); });
  // The controls only set classes on <body>; the CSS does the rest.
  function bind(id, off) {
    var box = document.getElementById(id);
    if (!box) { return; }
    function apply() { document.body.classList.toggle(off, !box.checked); }
    box.addEventListener("change", apply);
    apply();
  }
  bind("overlay", "no-overlay");
  bind("beside", "no-beside");
  bind("outline", "no-outline");
  var size = document.getElementById("size");
  function resize() {
    document.body.classList.remove("size-s", "size-m", "size-l");
    document.body.classList.add("size-" + size.value);
  }
  size.addEventListener("change", resize);
  resize();
})();
"""

CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
OUTLINE_COLOUR = "#00e5ff"
