#!/usr/bin/env python3
"""hivemind's side of `apiary bench dht`: the measure of hivemind's benchmarks/benchmark_dht.py (that script
is in hivemind's repository, not in its wheel), done here through hivemind 1.1.12's public API.

1. Create --num_peers DHT nodes one by one, each bootstrapped from up to --initial_peers random earlier
   nodes (timed: create_s).
2. Pick --failure_rate of the nodes to be shut down during the run, at random points of the schedule.
3. --num_threads concurrent workers each run --total_num_rounds rounds on the surviving nodes: a fresh key;
   --num_store_peers random nodes each store one random sub-key of it (concurrently; timed as one store
   round); then --num_get_peers random nodes get the key with `latest` (concurrently; one get round). A get
   succeeds when it returns exactly the sub-keys whose store succeeded, with their values.

Prints one JSON line: {"peers", "create_s", "store_round_mean_s", "get_round_mean_s", "store_success",
"get_success", "rss_mb", "rss_mb_per_peer", "stores", "gets"}; rss_mb sums the proportional resident memory
(PSS) of this process and all its children (each hivemind DHT runs in its own process with its own p2pd).

    python bench_dht.py --num_peers 64 --initial_peers 4 --total_num_rounds 8 --num_store_peers 8 \\
        --num_get_peers 8 --failure_rate 0.1
"""
import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import time
import uuid
import warnings

os.environ.setdefault("HIVEMIND_QUIET", "1")
warnings.filterwarnings("ignore")

import hivemind  # noqa: E402
from hivemind.utils.timed_storage import get_dht_time  # noqa: E402

logging.disable(logging.WARNING)


def tree_rss_mb(pid: int) -> float:
    """Memory of `pid` and all its descendants, from /proc: the sum of their proportional set sizes (PSS),
    so that pages the forked DHT processes share are counted once."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total_kb, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


class Killer:
    """Shuts down one doomed node at each scheduled tick (a tick = one finished store round)."""

    def __init__(self, doomed, ticks):
        self.doomed, self.ticks, self.tick = list(doomed), set(ticks), 0
        self.lock = asyncio.Lock()

    async def tick_once(self):
        async with self.lock:
            if self.tick in self.ticks and self.doomed:
                victim = self.doomed.pop(random.randrange(len(self.doomed)))
                await asyncio.get_running_loop().run_in_executor(None, victim.shutdown)
            self.tick += 1


async def worker(alive, args, killer):
    store_times, get_times, stores_ok, gets_ok, stores, gets = [], [], 0, 0, 0, 0
    for _ in range(args.total_num_rounds):
        key = uuid.uuid4().hex
        t0 = time.perf_counter()
        store_peers = random.sample(alive, min(args.num_store_peers, len(alive)))
        values = {uuid.uuid4().hex: uuid.uuid4().hex for _ in store_peers}
        results = await asyncio.gather(
            *[
                peer.store(key, subkey=sub, value=val, expiration_time=get_dht_time() + args.expiration,
                           return_future=True)
                for peer, (sub, val) in zip(store_peers, values.items())
            ]
        )
        await killer.tick_once()
        store_times.append(time.perf_counter() - t0)
        stored = {sub for (sub, _), ok in zip(values.items(), results) if ok}
        stores += len(results)
        stores_ok += len(stored)

        t0 = time.perf_counter()
        get_peers = random.sample(alive, min(args.num_get_peers, len(alive)))
        found = await asyncio.gather(*[peer.get(key, latest=True, return_future=True) for peer in get_peers])
        get_times.append(time.perf_counter() - t0)
        gets += len(found)
        for result in found:
            if result is None:
                continue
            entries = result.value
            if set(entries.keys()) == stored and all(entries[s].value == values[s] for s in stored):
                gets_ok += 1
    return store_times, get_times, stores_ok, gets_ok, stores, gets


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_peers", type=int, default=16)
    p.add_argument("--initial_peers", type=int, default=4)
    p.add_argument("--random_seed", type=int, default=30)
    p.add_argument("--num_threads", type=int, default=10)
    p.add_argument("--total_num_rounds", type=int, default=16)
    p.add_argument("--num_store_peers", type=int, default=8)
    p.add_argument("--num_get_peers", type=int, default=8)
    p.add_argument("--wait_timeout", type=float, default=5)
    p.add_argument("--expiration", type=float, default=300)
    p.add_argument("--failure_rate", type=float, default=0.1)
    args = p.parse_args()
    random.seed(args.random_seed)

    t0 = time.perf_counter()
    peers = []
    for _ in range(args.num_peers):
        bootstrap = [m for peer in random.sample(peers, min(args.initial_peers, len(peers)))
                     for m in peer.get_visible_maddrs()]
        peers.append(hivemind.DHT(initial_peers=bootstrap, start=True, wait_timeout=args.wait_timeout))
    create_s = time.perf_counter() - t0
    rss_mb = tree_rss_mb(os.getpid())

    doomed = random.sample(peers, min(int(args.failure_rate * args.num_peers), args.num_peers - 1))
    alive = [peer for peer in peers if peer not in doomed]
    ticks = random.sample(range(args.num_threads * args.total_num_rounds),
                          min(len(doomed), args.num_threads * args.total_num_rounds))
    killer = Killer(doomed, ticks)
    results = await asyncio.gather(*[worker(alive, args, killer) for _ in range(args.num_threads)])

    store_times = [t for r in results for t in r[0]]
    get_times = [t for r in results for t in r[1]]
    stores_ok, gets_ok = sum(r[2] for r in results), sum(r[3] for r in results)
    stores, gets = sum(r[4] for r in results), sum(r[5] for r in results)
    print(json.dumps({
        "peers": args.num_peers,
        "create_s": create_s,
        "store_round_mean_s": statistics.mean(store_times),
        "get_round_mean_s": statistics.mean(get_times),
        "store_success": stores_ok / max(stores, 1),
        "get_success": gets_ok / max(gets, 1),
        "rss_mb": rss_mb,
        "rss_mb_per_peer": rss_mb / args.num_peers,
        "stores": stores,
        "gets": gets,
    }), flush=True)
    for peer in peers:
        if peer.is_alive():
            peer.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
