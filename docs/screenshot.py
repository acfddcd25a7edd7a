"""Take `docs/aim-ui.png`: the Aim UI showing a run recorded by aim-llama.

    python docs/screenshot.py [--repo DIR] [--out docs/aim-ui.png]

Without `--repo` it first runs `examples/rag_app.py` (offline MockLLM/MockEmbedding, only
`import aim_llama.auto`) into a temporary repo. Then it starts `aim up` on a free loopback port,
drives headless Chromium (`apt-get install chromium`) over the DevTools protocol to the run's
Texts tab with the `prompt` sequence open, and saves a PNG. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read() or b"null")
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:g}s")


def record_demo(repo: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIM_")}
    env.update(AIM_REPO=str(repo), AIM_EXPERIMENT="rag-demo", AIM_SYSTEM_TRACKING_INTERVAL="off",
               AIM_RUN_PARAMS='{"app": "examples/rag_app.py", "llm": "MockLLM"}')
    subprocess.run([sys.executable, str(ROOT / "examples" / "rag_app.py")], env=env, check=True,
                   cwd=repo.parent, stdout=subprocess.DEVNULL)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params: Any) -> Any:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                         awaitPromise=True).get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(expression):
                return
            time.sleep(0.25)
        raise SystemExit(f"the page never satisfied: {expression}")


CLICK_TEXT = """(() => {{
  const hit = [...document.querySelectorAll('{selector}')]
    .find(e => e.textContent.trim() === {text!r} && e.offsetParent !== null);
  if (hit) {{ hit.click(); return true; }} return false;
}})()"""


def shoot(base: str, run_hash: str, out: Path, width: int, height: int) -> None:
    from websockets.sync.client import connect  # installed with Aim

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="aim-llama-chromium-")
    browser = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
         f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        pages = wait_http(f"http://127.0.0.1:{port}/json/list", 30)
        page = next(p for p in pages if p.get("type") == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            drive(DevTools(ws), base, run_hash, out, width, height)
    finally:
        os.killpg(browser.pid, signal.SIGTERM)
        browser.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def drive(tools: DevTools, base: str, run_hash: str, out: Path, width: int, height: int) -> None:
    """Open the run's Texts tab with `prompt` selected, without Aim's popup; save a PNG."""
    tools.call("Page.enable")
    tools.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
               deviceScaleFactor=1, mobile=False)
    tools.call("Page.navigate", url=base)
    tools.wait_for("document.readyState === 'complete'")
    tools.js("localStorage.setItem('communityPopupSeen', 'true')")  # Aim's "join us" popup
    tools.call("Page.navigate", url=f"{base}/runs/{run_hash}/texts")
    tools.wait_for("document.body.innerText.includes('prompt')")
    tools.wait_for(CLICK_TEXT.format(selector="*", text="prompt"))
    time.sleep(0.5)
    tools.js(CLICK_TEXT.format(selector="*", text='kind="llm"'))
    tools.wait_for("document.body.innerText.includes('Context information')")
    time.sleep(1.0)  # let the table settle
    shot = tools.call("Page.captureScreenshot", format="png")
    out.write_bytes(base64.b64decode(shot["data"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repo", type=Path, help="an Aim repo written by aim-llama")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "aim-ui.png")
    parser.add_argument("--size", default="1400x860", help="window WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="aim-llama-shot-") as tmp:
        repo = args.repo
        if repo is None:
            repo = Path(tmp) / "repo"
            record_demo(repo)
        chunks = sorted((repo / ".aim" / "meta" / "chunks").iterdir(), key=lambda p: p.stat().st_mtime)
        run_hash = chunks[-1].name
        port = free_port()
        aim = str(Path(sys.executable).with_name("aim"))
        ui = subprocess.Popen(
            [aim, "up", "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port), "-y"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/api/projects/", 60)
            shoot(base, run_hash, args.out, width, height)
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=20)
    print(f"wrote {args.out} (run {run_hash})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
