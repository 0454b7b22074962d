// Inlined into index.html by report/html.rs. Optional sugar: the charts are complete SVG
// without it. Hovering a chart reads the values back from each series path (the chart's data-*
// attributes give the mapping), so no second copy of the data is embedded.
(function () {
  "use strict";
  function fmt(v) {
    var a = Math.abs(v);
    var digits = a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3;
    return v.toLocaleString("en-US", { maximumFractionDigits: digits });
  }
  function points(path) {
    var nums = (path.getAttribute("d") || "").match(/-?[\d.]+/g) || [];
    var out = [];
    for (var i = 0; i + 1 < nums.length; i += 2) out.push([+nums[i], +nums[i + 1]]);
    return out;
  }
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    var paths = Array.prototype.slice.call(svg.querySelectorAll("path.series"));
    if (!paths.length) return;
    var d = svg.dataset;
    var box = { x0: +d.x0, x1: +d.x1, y0: +d.y0, y1: +d.y1, left: +d.left, top: +d.top, w: +d.width, h: +d.height };
    var series = paths.map(function (p) {
      return { name: p.dataset.series, color: p.getAttribute("stroke"), pts: points(p) };
    });
    var ns = "http://www.w3.org/2000/svg";
    var cursor = document.createElementNS(ns, "line");
    cursor.setAttribute("class", "cursor");
    cursor.setAttribute("y1", box.top);
    cursor.setAttribute("y2", box.top + box.h);
    cursor.style.display = "none";
    svg.appendChild(cursor);
    var tip = document.createElement("div");
    tip.className = "tooltip";
    tip.style.display = "none";
    svg.parentNode.appendChild(tip);
    function hide() { cursor.style.display = "none"; tip.style.display = "none"; }
    svg.addEventListener("mouseleave", hide);
    svg.addEventListener("mousemove", function (ev) {
      var ctm = svg.getScreenCTM();
      if (!ctm) return;
      var pt = svg.createSVGPoint();
      pt.x = ev.clientX; pt.y = ev.clientY;
      var p = pt.matrixTransform(ctm.inverse());
      if (p.x < box.left || p.x > box.left + box.w) return hide();
      var t = box.x0 + (p.x - box.left) / box.w * (box.x1 - box.x0);
      tip.textContent = "";
      var head = document.createElement("b");
      head.textContent = "t ≈ " + fmt(t) + " s";
      tip.appendChild(head);
      series.forEach(function (s) {
        var best = null;
        s.pts.forEach(function (q) { if (!best || Math.abs(q[0] - p.x) < Math.abs(best[0] - p.x)) best = q; });
        if (!best) return;
        var v = box.y0 + (box.top + box.h - best[1]) / box.h * (box.y1 - box.y0);
        var row = document.createElement("div");
        var swatch = document.createElement("i");
        swatch.style.background = s.color;
        row.appendChild(swatch);
        row.appendChild(document.createTextNode(s.name + ": " + fmt(v) + " " + d.unit));
        tip.appendChild(row);
      });
      cursor.setAttribute("x1", p.x);
      cursor.setAttribute("x2", p.x);
      cursor.style.display = "";
      tip.style.display = "";
      var card = svg.parentNode.getBoundingClientRect();
      var left = ev.clientX - card.left + 14;
      if (left + tip.offsetWidth > card.width) left = ev.clientX - card.left - tip.offsetWidth - 14;
      tip.style.left = left + "px";
      tip.style.top = (ev.clientY - card.top + 10) + "px";
    });
  });
  document.documentElement.classList.add("js");
})();
