// drv web UI: live parts over server-sent events. The pages work without it (they are
// rendered whole on the server); this only swaps in the fragments the server sends.
(function () {
  "use strict";
  var live = document.querySelector("[data-events]");
  if (!live || !window.EventSource) { return; }
  var status = document.getElementById("live");
  var source = new EventSource(live.getAttribute("data-events"));
  // Each event: the id of the element to fill, a line break, the HTML the server rendered.
  source.addEventListener("fragment", function (e) {
    var cut = e.data.indexOf("\n");
    if (cut < 0) { return; }
    var el = document.getElementById(e.data.slice(0, cut));
    if (el) { el.innerHTML = e.data.slice(cut + 1); }
    if (status) { status.textContent = "live, updated " + new Date().toLocaleTimeString(); }
  });
  source.addEventListener("ended", function () {
    source.close();
    if (status) { status.textContent = "session ended: reload to log in again"; }
  });
  source.onerror = function () {
    if (status) { status.textContent = "reconnecting..."; }
  };
})();
