#!/usr/bin/env python3
"""hivemind's side of `apiary bench server`: the measure of hivemind's benchmarks/benchmark_throughput.py (that
script is in hivemind's repository, not in its wheel), done here through hivemind 1.1.12's public API.

Without --initial-peers it starts a hivemind Server in this process with --experts experts `expert.0` …
(--expert-cls, --hidden); with --initial-peers it aims at experts of those uids hosted by the peer of those
multiaddrs (e.g. an Apiary server; the multiaddrs must end in /p2p/<peer id>). Then --clients client
processes, each with its own hivemind P2P connected to the server (as benchmark_throughput.py's clients do:
`RemoteExpert(ExpertInfo(uid, server peer id), p2p)`, no DHT lookups), call random experts --batches times
with a (--batch, --hidden) random input, and backward through it unless --forward-only
(`out.sum().backward()`, as benchmark_throughput.py does). Timed from the moment every client is ready
(connected, one warm-up call done) to the moment the last one finishes.

Prints one JSON line: {"samples_per_s", "total_s", "samples", "server_rss_mb" (the in-process server's
process tree idle, before the clients start, PSS in MiB; null with --initial-peers), "batch1_forward_ms"
(median round trip of a batch-1 forward, after the throughput run)}.
"""
import argparse
import faulthandler
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import threading
import time
import warnings

os.environ.setdefault("HIVEMIND_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import hivemind  # noqa: E402
from hivemind.moe.client.expert import RemoteExpert  # noqa: E402
from hivemind.moe.expert_uid import ExpertInfo  # noqa: E402
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of `pid` and its descendants (children of any of its threads), in MiB."""
    total, seen, pids = 0, set(), [pid]
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    pids.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total / 1024


def server_peer_id(maddrs):
    for m in maddrs:
        parts = str(m).split("/")
        if "p2p" in parts and parts.index("p2p") + 1 < len(parts):
            return parts[parts.index("p2p") + 1]
    raise SystemExit("bench_server.py: --initial-peers must end in /p2p/<peer id>")


def connect(maddrs, uids):
    """A client-side hivemind P2P connected to the server, and RemoteExperts for `uids` on it."""
    p2p = RemoteExpertWorker.run_coroutine(P2P.create(initial_peers=maddrs))
    peer = PeerID.from_base58(server_peer_id(maddrs))
    return p2p, [RemoteExpert(ExpertInfo(uid, peer), p2p) for uid in uids]


def client(maddrs, uids, a, ready, start, done, seed):
    faulthandler.dump_traceback_later(3 * a.timeout, exit=True)  # a stuck client shows where, and exits
    torch.set_num_threads(1)
    p2p, experts = connect(maddrs, uids)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    x = torch.randn(a.batch, a.hidden, requires_grad=not a.forward_only)
    with torch.no_grad():
        experts[0](x[:1].detach())  # connect and fetch rpc_info before the clock starts
    ready.release()
    start.wait()
    for _ in range(a.batches):
        out = rng.choice(experts)(x)
        if not a.forward_only:
            out.sum().backward()
    done.release()
    RemoteExpertWorker.run_coroutine(p2p.shutdown())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--initial-peers", nargs="*", default=[])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--expert-cls", default="ffn")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--latency-calls", type=int, default=20)
    p.add_argument("--timeout", type=float, default=600, help="seconds the clients may take, each phase")
    a = p.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops every process we started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    uids = [f"expert.{i}" for i in range(a.experts)]
    server, procs = None, []
    try:
        maddrs = list(a.initial_peers)
        if not maddrs:
            server = hivemind.moe.Server.create(
                expert_uids=uids, expert_cls=a.expert_cls, hidden_dim=a.hidden, max_batch_size=4096,
                device="cpu", host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
            )
            server.ready.wait()
            maddrs = [str(m) for m in server.dht.get_visible_maddrs()]
            time.sleep(2)  # let the server settle before measuring it idle
            server_rss = tree_pss_mb(os.getpid())
        else:
            server_rss = None

        ctx = mp.get_context("spawn")
        ready, start, done = ctx.Semaphore(0), ctx.Event(), ctx.Semaphore(0)
        procs = [ctx.Process(target=client, args=(maddrs, uids, a, ready, start, done, i))
                 for i in range(a.clients)]
        for proc in procs:
            proc.start()
        for _ in procs:
            if not ready.acquire(timeout=a.timeout):
                raise RuntimeError("a client did not get ready")
        t0 = time.perf_counter()
        start.set()
        for _ in procs:
            if not done.acquire(timeout=a.timeout):
                raise RuntimeError("a client did not finish")
        total_s = time.perf_counter() - t0
        for proc in procs:
            proc.join(timeout=30)

        # batch-1 forward round trip, after the throughput run
        p2p, experts = connect(maddrs, uids[:1])
        x1 = torch.randn(1, a.hidden)
        with torch.no_grad():
            experts[0](x1)
            times = []
            for _ in range(a.latency_calls):
                t = time.perf_counter()
                experts[0](x1)
                times.append(time.perf_counter() - t)
        RemoteExpertWorker.run_coroutine(p2p.shutdown())
        samples = a.clients * a.batches * a.batch
        print(json.dumps(dict(samples_per_s=samples / total_s, total_s=total_s, samples=samples,
                              server_rss_mb=server_rss, batch1_forward_ms=statistics.median(times) * 1e3)),
              flush=True)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
        stop(server)


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


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
