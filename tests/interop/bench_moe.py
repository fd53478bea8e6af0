#!/usr/bin/env python3
"""hivemind's side of `apiary bench moe`: trainer steps/s and samples/s of the demo's model, trained with hivemind
1.1.12's `RemoteMixtureOfExperts` against hivemind `Server`s on this machine.

The same swarm and model as `apiary bench moe` (crates/cli/src/bench_moe.rs, crates/moe/src/lm.rs):
- a bootstrap DHT node (in this process), --volunteers server processes, each a `hivemind.moe.Server` with its own
  DHT node hosting `ffn` experts (hidden --hidden-dim) of one grid per layer (uids `ffn_l0.i.j`, `ffn_l1.i.j`, …,
  --grid), spread over the servers as Apiary spreads them over its volunteers ((layer + i + j) % volunteers);
- a trainer (this process, a client-mode DHT node): a character-level transformer LM (--layers blocks, d_model =
  --hidden-dim, --heads heads; each block `h = x + Attention(LayerNorm(x))`, then the MoE layer over h's
  (batch·seq, d_model) rows replaces h; final LayerNorm and a linear head), whose MoE layers are
  `RemoteMixtureOfExperts(k_best=--k-best, k_min=1, forward/backward timeout --forward-timeout (20 s, Apiary's;
  `cargo xtask bench moe` gives 300 s), timeout_after_k_min 2 s)`,
  Adam at --lr with the gradient norm clipped to 1, on batches of --batch × --seq characters of the demo's corpus;
- each server runs --num-handlers (2) connection handler processes, not hivemind's default of 8 per expert (~80);
- two settings differ from hivemind's defaults, because with them the trainer stops working on this 2-CPU machine: the
  DHT nodes' wait_timeout is 30 s (not 3 s; while the servers' processes are busy with a layer's 2,048 expert
  requests, the next layer's beam search times out), and the MoE layers' beam search keeps no negative cache
  (`negative_caching=False`: one timed-out beam search would mark every grid row inactive for 300 s);
- a hivemind bug is worked around: its DHT process dies reading a big command from a pipe still being written
  (`_patient_pipes`);
- --warmup untimed steps, then --steps timed ones: steps_per_s, samples_per_s (characters/s = batch·seq per step).
  A step hivemind's layer gives up on (empty beam search, no expert in time) is retried with the next batch, its
  time counted (`failed_steps`).

--latency-ms L delays every expert RPC of the trainer in-process, as `apiary bench moe --latency-ms` does (L before
the request leaves, L before the reply is handed back; DHT traffic not delayed). `cargo xtask bench moe` instead runs
this script in a network namespace whose loopback delays every packet by L (--network-latency-ms L records it).

Prints one JSON line with the fields of `apiary bench moe --json`.

`bench_moe.py delay --ms L [--queue Q]` is that namespace's delay line (Python's standard library only, no torch):
it binds netfilter queue Q (iptables `-j NFQUEUE --queue-num Q`), holds every queued packet L ms and lets it go,
printing `ready` once bound. The kernel here has no `sch_netem`; this does netem's `delay L` in userspace.
"""
import os
import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "delay":
    _DELAY_ONLY = True
else:
    _DELAY_ONLY = False


# ---------------------------------------------------------------------------------------------------------------
# the delay line: NFQUEUE over raw netlink (include/uapi/linux/netfilter/nfnetlink_queue.h)

def delay_line(queue: int, delay_s: float) -> None:
    import heapq
    import socket
    import struct
    import threading
    import time

    netlink_netfilter, subsys_queue = 12, 3
    msg_packet, msg_verdict, msg_config = 0, 1, 2
    f_request, f_ack = 1, 4
    cfg_cmd, cfg_params, cfg_queue_maxlen, cfg_mask, cfg_flags = 1, 2, 3, 4, 5
    cmd_bind, copy_meta = 1, 1
    flag_fail_open, flag_gso = 1, 4
    packet_hdr, verdict_hdr, nf_accept = 1, 2, 1

    def attr(kind, payload):
        n = 4 + len(payload)
        return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)

    def message(kind, attrs, flags=f_request):
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
        return struct.pack("=IHHII", 16 + len(body), (subsys_queue << 8) | kind, flags, 0, 0) + body

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_netfilter)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: hold bursts
    sock.bind((0, 0))
    sock.setsockopt(270, 5, 1)  # SOL_NETLINK, NETLINK_NO_ENOBUFS

    def configure(attrs):
        sock.send(message(msg_config, attrs, f_request | f_ack))
        reply = sock.recv(65536)
        if struct.unpack_from("=H", reply, 4)[0] == 2:  # NLMSG_ERROR
            err = struct.unpack_from("=i", reply, 16)[0]
            if err:
                raise OSError(-err, f"configuring netfilter queue {queue}: {os.strerror(-err)}")

    configure([attr(cfg_cmd, struct.pack("=BxH", cmd_bind, 0))])
    configure([
        attr(cfg_params, struct.pack("!IB", 0, copy_meta)),  # metadata only: the verdict needs just the id
        attr(cfg_queue_maxlen, struct.pack("!I", 1 << 16)),
        attr(cfg_mask, struct.pack("!I", flag_fail_open | flag_gso)),
        attr(cfg_flags, struct.pack("!I", flag_fail_open | flag_gso)),  # GSO: no segmenting of big packets
    ])

    pending, wake = [], threading.Condition()

    def release():
        while True:
            with wake:
                while not pending:
                    wake.wait()
                due, packet_id = pending[0]
                left = due - time.monotonic()
                if left > 0:
                    wake.wait(left)
                    continue
                heapq.heappop(pending)
            sock.send(message(msg_verdict, [attr(verdict_hdr, struct.pack("!II", nf_accept, packet_id))]))

    threading.Thread(target=release, daemon=True).start()
    print("ready", flush=True)
    while True:
        data = sock.recv(1 << 20)
        due = time.monotonic() + delay_s
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if length < 16:
                break
            if kind == (subsys_queue << 8) | msg_packet:
                a = off + 20  # nlmsghdr + nfgenmsg
                while a + 4 <= off + length:
                    alen, akind = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if akind & 0x7FFF == packet_hdr:
                        with wake:
                            heapq.heappush(pending, (due, struct.unpack_from("!I", data, a + 4)[0]))
                            wake.notify()
                        break
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3


if _DELAY_ONLY:
    import argparse

    _p = argparse.ArgumentParser(prog="bench_moe.py delay")
    _p.add_argument("--ms", type=float, required=True, help="one-way delay of every queued packet")
    _p.add_argument("--queue", type=int, default=0)
    _a = _p.parse_args(sys.argv[2:])
    try:
        delay_line(_a.queue, _a.ms / 1000)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------------------
# the benchmark

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HIVEMIND_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hivemind  # noqa: E402
import hivemind.moe.client.moe as hivemind_moe  # noqa: E402


def _patient_pipes():
    """hivemind 1.1.12's DHT process reads its command pipe after `poll()` and dies when a big command (a beam search
    over a whole batch's gating scores) is only partly in the pipe: `BlockingIOError` mid-message, then `EOFError`
    on the garbage after it, and the trainer hangs. Pipes here wait for the rest of a message instead."""
    import multiprocessing.connection as mpc
    import select

    recv, send = mpc.Connection._recv, mpc.Connection._send

    def read(handle, n):
        while True:
            try:
                return os.read(handle, n)
            except BlockingIOError:
                select.select([handle], [], [], 1.0)

    def write(handle, buf):
        while True:
            try:
                return os.write(handle, buf)
            except BlockingIOError:
                select.select([], [handle], [], 1.0)

    mpc.Connection._recv = lambda self, size, read_=read: recv(self, size, read_)
    mpc.Connection._send = lambda self, buf, write_=write: send(self, buf, write_)


_patient_pipes()

CORPUS = Path(__file__).resolve().parents[2] / "assets" / "corpus" / "shakespeare-plays.txt"


def host_of(layer, coords, volunteers):
    """crates/cli/src/swarm.rs's `host_of`: every grid row spans several volunteers."""
    return (layer + sum(coords)) % volunteers


def uids_of(volunteer, a):
    out = []
    for layer in range(a.layers):
        for i in range(a.grid[0]):
            for j in range(a.grid[1]):
                if host_of(layer, (i, j), a.volunteers) == volunteer:
                    out.append(f"ffn_l{layer}.{i}.{j}")
    return out


def volunteer(uids, a, initial_peers, ready, stop):
    """One hivemind server process hosting `uids`."""
    torch.set_num_threads(1)
    server = hivemind.moe.Server.create(
        expert_uids=uids, expert_cls="ffn", hidden_dim=a.hidden_dim, max_batch_size=4096, device="cpu",
        num_handlers=a.num_handlers, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        update_period=4, expiration=10, wait_timeout=a.dht_timeout, start=True,
    )
    server.ready.wait()
    ready.release()
    stop.wait()
    server.shutdown()


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)


class TinyLm(nn.Module):
    """crates/moe/src/lm.rs's TinyLm, with hivemind MoE layers as the feed-forward sublayers."""

    def __init__(self, vocab, d, layers, heads, context, moes):
        super().__init__()
        self.d, self.heads = d, heads
        self.embed = nn.Parameter(torch.empty(vocab, d).uniform_(-0.5, 0.5))
        self.pos = nn.Parameter(torch.empty(context, d).uniform_(-0.1, 0.1))
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.moes = nn.ModuleList(moes)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        b, s = tokens.shape
        d, nh = self.d, self.heads
        x = self.embed[tokens] + self.pos[:s]
        for blk, moe in zip(self.blocks, self.moes):
            qkv = blk.qkv(blk.ln(x)).view(b, s, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
            h = x.reshape(b * s, d) + blk.out(ctx.transpose(1, 2).reshape(b * s, d))
            x = moe(h).reshape(b, s, d)
        return self.head(self.ln_f(x))


def delay_expert_calls(delay_s):
    """Every expert RPC of the trainer's MoE layers waits `delay_s` before it leaves and before its reply is used."""
    forward, backward = hivemind_moe.expert_forward, hivemind_moe.expert_backward

    async def delayed_forward(*args, **kwargs):
        await asyncio.sleep(delay_s)
        out = await forward(*args, **kwargs)
        await asyncio.sleep(delay_s)
        return out

    async def delayed_backward(*args, **kwargs):
        await asyncio.sleep(delay_s)
        out = await backward(*args, **kwargs)
        await asyncio.sleep(delay_s)
        return out

    hivemind_moe.expert_forward, hivemind_moe.expert_backward = delayed_forward, delayed_backward


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--network-latency-ms", type=float, default=0.0)
    p.add_argument("--volunteers", type=int, default=3)
    p.add_argument("--grid", type=int, nargs=2, default=[4, 4])
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--k-best", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-handlers", type=int, default=2,
                   help="connection handler processes per server (hivemind's default, 8 per expert, would be "
                        "~80 processes per server here)")
    p.add_argument("--forward-timeout", type=float, default=20,
                   help="the MoE layers' forward_timeout and backward_timeout (Apiary's trainer uses 20 s)")
    p.add_argument("--dht-timeout", type=float, default=30,
                   help="the DHT nodes' wait_timeout (hivemind's default 3 s loses beam searches on a loaded machine)")
    p.add_argument("--timeout", type=float, default=300, help="seconds the swarm may take to come up")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)

    text = CORPUS.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    train = ids[: int(len(ids) * 0.9)]

    procs, stop, boot = [], None, None
    try:
        boot = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        initial_peers = [str(m) for m in boot.get_visible_maddrs()]
        ctx = mp.get_context("spawn")
        ready, stop = ctx.Semaphore(0), ctx.Event()
        experts = 0
        for v in range(a.volunteers):
            uids = uids_of(v, a)
            experts += len(uids)
            procs.append(ctx.Process(target=volunteer, args=(uids, a, initial_peers, ready, stop)))
            procs[-1].start()
        deadline = time.monotonic() + a.timeout
        for _ in procs:
            while not ready.acquire(timeout=1):
                if time.monotonic() > deadline or not all(proc.is_alive() for proc in procs):
                    raise RuntimeError("a hivemind server did not come up")

        dht = hivemind.DHT(initial_peers=initial_peers, client_mode=True, wait_timeout=a.dht_timeout, start=True)
        # every expert declared and visible to the trainer before the first step (as Apiary's volunteers are)
        all_uids = [uid for v in range(a.volunteers) for uid in uids_of(v, a)]
        while not all(hivemind.moe.get_experts(dht, all_uids)):
            if time.monotonic() > deadline or not all(proc.is_alive() for proc in procs):
                raise RuntimeError("the trainer does not see every expert in the DHT")
            time.sleep(1)
        if a.latency_ms > 0:
            delay_expert_calls(a.latency_ms / 1000)
        moes = [
            hivemind.moe.RemoteMixtureOfExperts(
                in_features=a.hidden_dim, grid_size=tuple(a.grid), dht=dht, uid_prefix=f"ffn_l{layer}.",
                k_best=a.k_best, k_min=1, forward_timeout=a.forward_timeout, backward_timeout=a.forward_timeout,
                timeout_after_k_min=2,
                backward_k_min=1, negative_caching=False,
            )
            for layer in range(a.layers)
        ]
        model = TinyLm(len(chars), a.hidden_dim, a.layers, a.heads, a.seq, moes)
        opt = torch.optim.Adam(model.parameters(), lr=a.lr)

        def step():
            starts = [rng.randrange(len(train) - a.seq - 1) for _ in range(a.batch)]
            x = torch.stack([train[s: s + a.seq] for s in starts])
            y = torch.stack([train[s + 1: s + a.seq + 1] for s in starts])
            t = time.perf_counter()
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.item(), time.perf_counter() - t

        def attempt(what):
            # hivemind's layer raises when a beam search comes back empty or no expert answers in time (both happen
            # on a loaded machine): the step is lost, the clock runs on, and the next batch is tried
            try:
                loss, seconds = step()
            except (RuntimeError, TimeoutError) as e:
                print(f"bench_moe.py: {what} failed: {type(e).__name__}: {e}", file=sys.stderr)
                return None
            print(f"bench_moe.py: {what}: loss {loss:.3f}, {seconds:.2f} s", file=sys.stderr)
            return loss, seconds

        done = 0
        for _ in range(3 * max(a.warmup, 1)):
            if done == a.warmup:
                break
            done += attempt(f"warm-up step {done + 1}/{a.warmup}") is not None
        times, losses, failed = [], [], 0
        t0 = time.perf_counter()
        while len(times) < a.steps:
            if failed > 2 * a.steps:
                raise RuntimeError(f"{failed} failed steps")
            r = attempt(f"step {len(times) + 1}/{a.steps}")
            if r is None:
                failed += 1
                continue
            losses.append(r[0])
            times.append(r[1])
        total = time.perf_counter() - t0

        if a.latency_ms > 0:
            latency_ms, via = a.latency_ms, "transport"
        elif a.network_latency_ms > 0:
            latency_ms, via = a.network_latency_ms, "network"
        else:
            latency_ms, via = 0.0, "none"
        samples = a.steps * a.batch * a.seq
        print(json.dumps(dict(
            impl="hivemind", steps_per_s=a.steps / total, samples_per_s=samples / total, seconds=total,
            step_ms_median=statistics.median(times) * 1e3, steps=a.steps, warmup=a.warmup, latency_ms=latency_ms,
            latency_via=via, volunteers=a.volunteers, experts=experts, layers=a.layers, grid=a.grid,
            hidden=a.hidden_dim, batch=a.batch, seq=a.seq, k_best=a.k_best, loss_first=losses[0],
            loss_last=losses[-1], failed_steps=failed, num_handlers=a.num_handlers,
        )), flush=True)
    finally:
        if stop is not None:
            stop.set()
        for proc in procs:
            proc.join(timeout=20)
        stop_tree()


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


def stop_tree():
    """hivemind's shutdowns can hang joining their pools: kill whatever is left of this process's tree."""
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
