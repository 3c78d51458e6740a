"""A tiny OpenAI-like ASGI backend for the gateway prototype's checks (run under uvicorn).

GET /stream[?n=N]: N (4) SSE events 500 ms apart (the first at once). POST /v1/chat/completions: echoes the
body's model; with "stream": true, streams like /stream. POST /upload: counts the body's bytes.
POST /v1/models/<name>:predict: echoes the instances (KServe V1, no thread hop). GET /slow: answers after 3 s. GET /disconnect: streams until the client goes, and records that
in the file named by $DISCONNECT_FILE.
"""

import asyncio
import json
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/health":
        return await _json(send, {"ok": True})
    if path == "/upload":
        n = 0
        while True:
            msg = await receive()
            n += len(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        return await _json(send, {"received": n})
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if path.endswith(":predict"):  # KServe V1, answered on the event loop (no thread hop)
        return await _json(send, {"predictions": json.loads(body)["instances"]})
    if path == "/slow":
        await asyncio.sleep(3)
        return await _json(send, {"slow": True})
    if path == "/v1/chat/completions":
        req = json.loads(body)
        if not req.get("stream"):
            return await _json(send, {"object": "chat.completion", "model": req["model"], "choices": []})
    if path in ("/stream", "/v1/chat/completions", "/disconnect"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        i, events = 0, int(scope["query_string"].decode().partition("n=")[2] or 4)
        while path == "/disconnect" or i < events:
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
            i += 1
            try:
                msg = await asyncio.wait_for(receive(), 0.5)
                if msg["type"] == "http.disconnect":
                    with open(os.environ.get("DISCONNECT_FILE", "/dev/null"), "w") as f:
                        f.write("disconnected after %d\n" % i)
                    return
            except asyncio.TimeoutError:
                pass
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    await _json(send, {"path": path}, 404)


async def _json(send, obj, status=200):
    payload = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
