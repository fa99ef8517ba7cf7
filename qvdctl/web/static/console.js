// A VM's console: xterm.js (vendored in static/xterm/) joined to the server's
// lxc-console over a WebSocket. Binary frames carry bytes both ways; a text frame
// tells the server the terminal's size.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const element = document.getElementById("console");
  if (!element) return;
  const status = document.getElementById("console-status");
  // The DOM renderer: the screen's text is the page's text (the tests read it there).
  const term = new Terminal({rendererType: "dom", cursorBlink: true, rows: 30, cols: 100});
  term.open(element);
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const socket = new WebSocket(scheme + location.host + element.dataset.socket);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  socket.onopen = () => {
    status.textContent = "connected.";
    socket.send(JSON.stringify({cols: term.cols, rows: term.rows}));
    term.focus();
  };
  socket.onmessage = (event) => term.write(new Uint8Array(event.data));
  socket.onclose = (event) => {
    status.textContent = `closed${event.reason ? ": " + event.reason : ""}.`;
  };
  term.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
});
