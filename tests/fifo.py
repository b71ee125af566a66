"""A named pipe that serves a text once, as ``<(grep ... gradclip_spikes.jsonl)`` does: every later reader gets
an empty stream (instead of blocking for ever), so a second read shows up as a failed assertion, not a hang."""

from __future__ import annotations

import contextlib
import os
import threading


@contextlib.contextmanager
def served_once(path, text: str):
    os.mkfifo(path)
    done = threading.Event()
    served = [False]

    def serve():
        while not done.is_set():
            with open(path, "w", encoding="utf-8") as f:  # blocks until a reader opens the pipe
                if not done.is_set():
                    f.write("" if served[0] else text)
                    served[0] = True

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets a writer waiting in open() go
        thread.join(timeout=5)
        os.close(fd)
