"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, with aiohttp's websocket client: enough
to walk a page as a user does (navigate, type, click, read the text, take a screenshot). No playwright needed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1900,1300",
]


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.ids = ws, itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict:
        n = next(self.ids)
        await self.ws.send_json({"id": n, "method": method, "params": params})
        while True:  # events arrive in between: skip them
            msg = json.loads((await self.ws.receive(timeout=60)).data)
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 60) -> Any:
        """Poll a JS expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := await self._try(expression)):
            if time.monotonic() > deadline:
                text = await self.js("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise AssertionError(f"the page never showed {what}; it shows:\n{text}")
            await asyncio.sleep(0.3)
        return value

    async def _try(self, expression: str) -> Any:
        try:
            return await self.js(expression)
        except RuntimeError as e:  # the page is (re)loading: no context to evaluate in yet
            if "navigated" in str(e) or "context" in str(e).lower():
                return None
            raise

    async def type(self, text: str) -> None:
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> Path:
        data = (await self.send("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.asynccontextmanager
async def chromium(url: str) -> AsyncIterator[Page]:
    """A headless Chromium opened at `url` (its own profile in a temp dir; killed at the end)."""
    with tempfile.TemporaryDirectory(prefix="cellray-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"  # Chromium writes the port it picked here
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text().strip():
                assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
                await asyncio.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                target = next(t for t in json.loads(r.read()) if t["type"] == "page")
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = Page(ws)
                    await page.send("Page.enable")
                    yield page
        finally:  # the browser and every process it started (renderers, zygotes): its own process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            deadline = time.monotonic() + 10
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
