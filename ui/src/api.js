// The tenant API, called with the key as a Bearer header. Server-sent events
// are read with fetch streaming, because EventSource cannot send headers and
// the key must not travel in a URL.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class Api {
  constructor(key, base = "/api/v1") {
    this.key = key;
    this.base = base;
  }

  headers() {
    return { Authorization: `Bearer ${this.key}` };
  }

  async get(path) {
    const r = await fetch(this.base + path, { headers: this.headers(), cache: "no-store" });
    if (!r.ok) {
      let message = `HTTP ${r.status}`;
      try {
        const body = await r.json();
        message = body?.error?.message || message;
      } catch (_) { /* not JSON */ }
      throw new ApiError(r.status, message);
    }
    return r.json();
  }

  sessions() { return this.get("/sessions"); }
  dag(sid) { return this.get(`/sessions/${encodeURIComponent(sid)}/dag`); }
  call(sid, cid) { return this.get(`/sessions/${encodeURIComponent(sid)}/calls/${encodeURIComponent(cid)}`); }

  /**
   * Follow the session's DAG events until it closes or `signal` aborts.
   * Calls onOpen() once the stream is open, then onEvent({type, ...}) per
   * event; resolves when the stream ends.
   */
  async events(sid, onEvent, signal, onOpen = () => {}) {
    const r = await fetch(`${this.base}/sessions/${encodeURIComponent(sid)}/events`, {
      headers: { ...this.headers(), Accept: "text/event-stream" },
      cache: "no-store",
      signal,
    });
    if (!r.ok || !r.body) throw new ApiError(r.status, `events: HTTP ${r.status}`);
    onOpen();
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
        if (!data.length) continue; // a comment or keep-alive ping
        try {
          onEvent(JSON.parse(data.join("\n")));
        } catch (_) { /* not one of ours */ }
      }
    }
  }
}
