"""Entry point of the writer process: `python -m aim_llama.writer_process`.

Reads length-prefixed pickled frames from stdin (first a `RunConfig`, then batches of
records, then a close request or end of file), stores them through a `RunSink`, and writes
acknowledgements to the original stdout. It finalizes the run when the application closes
the pipe, asks it to, or dies, so a SIGKILLed application still leaves a finished run.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def main() -> int:
    """Run the writer loop until the application goes away; exit status 0 when the run was finalized."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep the protocol channel private: anything printed by Aim goes to stderr instead.
    ack_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from .aimrun import RunConfig, RunSink
    from .writer import CLOSE, read_frame, write_frame

    stdin = os.fdopen(0, "rb", buffering=1 << 16)
    config = read_frame(stdin)
    if not isinstance(config, RunConfig):
        return 2

    def send(msg: tuple[Any, ...]) -> None:
        try:
            write_frame(ack_fd, msg)
        except OSError:
            pass  # the application is gone; keep storing what we have

    sink = RunSink(config)
    announced = False
    while True:
        try:
            msg = read_frame(stdin)
        except Exception:
            msg = None
        if msg is None or msg == CLOSE:
            break
        tokens = sink.apply(msg)
        if not announced and sink.run_hash:
            announced = True
            send(("run", sink.run_hash))
        for token in tokens:
            send(("ack", token))
    sink.close()
    send(("closed", sink.stored, sink.lost, sink.failed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
