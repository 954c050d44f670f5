// drv web UI: live parts over server-sent events. The pages work without it (they are
// rendered whole on the server); this only swaps in the fragments the server sends.
(function () {
  "use strict";
  var live = document.querySelector("[data-events]");
  if (!live || !window.EventSource) { return; }
  var status = document.getElementById("live");
  var source = new EventSource(live.getAttribute("data-events"));
  source.addEventListener("fragment", function (e) {
    var msg = JSON.parse(e.data);
    var el = document.getElementById(msg.id);
    if (el) { el.innerHTML = msg.html; }
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
