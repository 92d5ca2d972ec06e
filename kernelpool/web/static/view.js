// Live updates of a notebook page (kernelpool/web/live.py sends them): no framework, no build.
// Every piece of HTML it inserts was rendered and sanitised by the server (kernelpool/web/render.py);
// the page's Content-Security-Policy lets no inline script or event handler run in any case.
"use strict";
(function () {
  var status = document.getElementById("live-status");
  var cells = document.getElementById("cells");
  if (!status || !cells || !window.EventSource) { return; }
  var source = new EventSource(status.getAttribute("data-events"));

  function say(text) { status.textContent = text; }

  function fromHtml(html) {
    var box = document.createElement("div");
    box.innerHTML = html;
    return box.firstElementChild;
  }

  function byId(id) { return document.getElementById("cell-" + id); }

  source.addEventListener("open", function () { say("Live updates: on"); });
  source.addEventListener("error", function () {
    // a closed source does not retry (the page is unknown: the server restarted, or signed us out)
    say(source.readyState === EventSource.CLOSED ? "Live updates stopped: reload the page." : "Live updates: reconnecting…");
  });

  source.addEventListener("cells", function (e) {
    // {cells: [[id, html], ...] changed or new (new ones in notebook order), order?: every id,
    // sent only when cells were not just added at the end}
    var msg = JSON.parse(e.data);
    msg.cells.forEach(function (pair) {
      var fresh = fromHtml(pair[1]);
      var old = byId(pair[0]);
      if (old) { old.replaceWith(fresh); } else { cells.appendChild(fresh); }
    });
    if (msg.order) {
      var wanted = {};
      msg.order.forEach(function (id, i) {
        wanted[id] = true;
        var el = byId(id);
        if (el && cells.children[i] !== el) { cells.insertBefore(el, cells.children[i] || null); }
      });
      Array.prototype.slice.call(cells.children).forEach(function (el) {
        if (!wanted[el.getAttribute("data-id")]) { el.remove(); }
      });
    }
    var empty = document.getElementById("empty");
    if (empty && cells.children.length) { empty.remove(); }
    say("Live updates: on · last change " + new Date().toLocaleTimeString());
  });

  source.addEventListener("outputs", function (e) {
    var msg = JSON.parse(e.data);
    var el = byId(msg.id);
    var box = el && el.querySelector(".outputs");
    if (box) { box.innerHTML = msg.html; }
  });

  function stop(e) {
    source.close();
    var msg = JSON.parse(e.data);
    var note = document.createElement("p");
    note.className = "notice";
    note.setAttribute("role", "alert");
    note.textContent = msg.message + " ";
    var link = document.createElement("a");
    link.href = window.location.pathname;
    link.textContent = "Reload";
    note.appendChild(link);
    status.replaceWith(note);
  }
  source.addEventListener("reload", stop);
  source.addEventListener("gone", stop);
})();
