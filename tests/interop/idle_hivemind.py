#!/usr/bin/env python3
"""hivemind's side of `cargo xtask bench idle`: a hivemind 1.1.12 expert server, idle, to measure.

Starts `hivemind.moe.Server.create(...)` in this process with --experts `ffn` experts (--hidden, uids
`<--prefix><i>`), its DHT on loopback, hivemind's defaults otherwise (so `num_handlers = 8 × experts`
connection handler processes, as `hivemind-server` would run), prints one JSON line
{"event": "ready", "pid", "maddrs", "uids", "num_handlers"} and then sleeps, serving nobody, until SIGTERM.
The caller measures this process and all its descendants (the handlers, the DHT process, the Go p2pd
daemons). On SIGTERM it shuts the server down (20 s at most) and kills what is left of its tree.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings

warnings.filterwarnings("ignore")

import hivemind  # noqa: E402


def descendants(pid: int):
    out, pids = [], [pid]
    while pids:
        p = pids.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                    out.extend(kids)
                    pids.extend(kids)
        except OSError:
            pass
    return out


def stop(server):
    """hivemind's Server.shutdown can hang joining its pools: give it 20 s, then kill what is left of our tree."""
    if server is not None:
        t = threading.Thread(target=server.shutdown, daemon=True)
        t.start()
        t.join(timeout=20)
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=6)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--prefix", default="ffn_idle.")
    p.add_argument("--num-handlers", type=int, default=None, help="hivemind's default: 8 per expert")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    uids = [f"{a.prefix}{i}" for i in range(a.experts)]
    server = None
    try:
        server = hivemind.moe.Server.create(
            expert_uids=uids, expert_cls="ffn", hidden_dim=a.hidden, max_batch_size=1024,
            num_handlers=a.num_handlers, device="cpu", host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
        )
        server.ready.wait()
        maddrs = [str(m) for m in server.dht.get_visible_maddrs()]
        handlers = a.num_handlers if a.num_handlers is not None else 8 * a.experts
        print(json.dumps(dict(event="ready", pid=os.getpid(), maddrs=maddrs, uids=uids, num_handlers=handlers)),
              flush=True)
        while True:
            time.sleep(3600)
    finally:
        stop(server)


if __name__ == "__main__":
    try:
        main()
    finally:
        sys.stdout.flush()
        os._exit(0)
