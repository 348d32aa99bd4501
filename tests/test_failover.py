"""Stage failures with real processes: kill -9, SIGSTOP, link down between hosts, restart, SIGTERM, in the star
data plane (``topology: star``; the chain's failures are tests/test_chain_failover.py)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import signal
import subprocess

import aiohttp
import pytest

from chatloop.demo import demo_model_dir
from tests.cluster_harness import Cluster, http_json, wait_ready
from tests.sse import sse_events
from tests.waiting import wait_until

PROMPTS = [
    "Write a short story about a robot.",
    "Explain how rain forms.",
    "List some fruits:",
    "The history of Rome begins",
    "def quicksort(xs):",
    "Dear friend, I am writing",
    "Recipe for pancakes:",
    "The best way to learn",
]
MAX_TOKENS = 40
STAR = {"topology": "star"}
# A stopped or cut-off replica answers nothing: the step timeout is what notices it mid-step.
HUNG_REPLICA = {**STAR, "step_timeout_secs": 5.0}


async def _stream(
    session: aiohttp.ClientSession, url: str, prompt: str, first_token: asyncio.Event, max_tokens: int
) -> dict:
    """One streamed completion; ``first_token`` is set at its first token (or at its end, if it has none)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text, finish, error = [], None, None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return {"status": resp.status, "error": await resp.text()}
            async for event in sse_events(resp):
                if "error" in event:
                    error = event["error"]
                    continue
                choice = event["choices"][0]
                text.append(choice["text"])
                first_token.set()
                finish = choice["finish_reason"] or finish
    finally:
        first_token.set()
    return {"status": 200, "text": "".join(text), "finish": finish, "error": error}


def run_streams(url: str, fault=None, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> list[dict]:
    """Run one streaming request per prompt concurrently; call ``fault()`` (in a thread) mid-generation.

    NOTE: the fault comes once every stream has its first token, not after a fixed time: then every request is
    admitted and generating, however slow the machine is (a fixed delay either hits some streams still queued
    on a busy machine or none still running on a quiet one).
    """

    async def main():
        started = [asyncio.Event() for _ in prompts]
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [asyncio.create_task(_stream(session, url, p, e, max_tokens)) for p, e in zip(prompts, started)]
            if fault is not None:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 300)
                await asyncio.get_running_loop().run_in_executor(None, fault)
            return await asyncio.gather(*tasks)

    return asyncio.run(main())


def busy_replica(cluster: Cluster, stage: int) -> str:
    """The replica of ``stage`` carrying the most sequences now; it carries some (the fault hits mid-generation)."""
    _, view = http_json(f"{cluster.url}/v1/cluster")
    reps = [r for r in view["replicas"] if r["stage"] == stage]
    busiest = max(reps, key=lambda r: r["sequences"])
    assert busiest["sequences"] > 0, f"no stream in flight at the fault: {reps}"
    return busiest["url"]


def replica_state(cluster: Cluster, url: str) -> str:
    _, view = http_json(f"{cluster.url}/v1/cluster")
    return next(r["state"] for r in view["replicas"] if r["url"] == url)


def assert_all_complete(results, reference):
    for got, want in zip(results, reference, strict=True):
        assert got["status"] == 200, got
        assert got["error"] is None, got
        assert got["finish"] in ("length", "stop")
        assert got["text"] == want["text"]


@pytest.fixture
def cluster_r2(procs, tmp_path):
    return Cluster(procs, demo_model_dir(2), tmp_path, replicas=2, coordinator_extra=HUNG_REPLICA).start()


def check_kill9_mid_generation(cluster: Cluster, stage: int) -> None:
    """kill -9 of ``stage``'s busiest replica during 8 streams: none lost, texts unchanged; restarted, the replica
    rejoins and serves the same texts."""
    reference = run_streams(cluster.url)
    victim = {}

    def kill():
        url = busy_replica(cluster, stage)
        victim["url"] = url
        cluster.stage_procs[url].send_signal(signal.SIGKILL)

    results = run_streams(cluster.url, fault=kill)
    assert_all_complete(results, reference)
    # (Marked at the first failed forward call, or else by failed probes a moment later.)
    wait_until(lambda: replica_state(cluster, victim["url"]) == "unhealthy", what="killed replica unhealthy")
    # A restarted replica rejoins once the health checks see it ready again.
    cluster.start_stage(victim["url"])
    wait_until(lambda: replica_state(cluster, victim["url"]) == "healthy", what="rejoin")
    assert_all_complete(run_streams(cluster.url), reference)


def test_kill9_replica_mid_generation(cluster_r2):
    check_kill9_mid_generation(cluster_r2, 1)


def test_sigstop_replica_is_rerouted_and_rejoins(cluster_r2):
    cluster = cluster_r2
    reference = run_streams(cluster.url, prompts=PROMPTS[:4])
    victim = {}

    def stop():
        url = busy_replica(cluster, 0)
        victim["url"] = url
        os.kill(cluster.stage_procs[url].pid, signal.SIGSTOP)

    try:
        results = run_streams(cluster.url, fault=stop, prompts=PROMPTS[:4])
        assert_all_complete(results, reference)
        wait_until(lambda: replica_state(cluster, victim["url"]) == "unhealthy", what="stopped replica unhealthy")
    finally:
        if "url" in victim:
            os.kill(cluster.stage_procs[victim["url"]].pid, signal.SIGCONT)
    wait_until(lambda: replica_state(cluster, victim["url"]) == "healthy", what="rejoin after SIGCONT")


def test_no_replica_left_gives_503_and_recovers(procs, tmp_path):
    cluster = Cluster(procs, demo_model_dir(2), tmp_path, coordinator_extra=STAR).start()
    url = cluster.stage_urls[1][0]

    def kill():
        cluster.stage_procs[url].send_signal(signal.SIGKILL)

    results = run_streams(
        cluster.url,
        fault=kill,
        prompts=["Tell me a very long story about dragons.", "Write a long essay on rivers."],
        max_tokens=400,
    )
    for r in results:
        assert r["status"] == 503 or r["error"] is not None or r["finish"] is not None
    assert any(r["status"] == 503 or r["error"] for r in results)
    wait_until(lambda: http_json(f"{cluster.url}/readyz")[0] == 503, what="not ready")
    status, body = http_json(f"{cluster.url}/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503 and "Retry" not in body["error"]["message"]
    assert http_json(f"{cluster.url}/healthz")[0] == 200
    cluster.start_stage(url)
    wait_until(lambda: http_json(f"{cluster.url}/readyz")[0] == 200, what="ready again")
    status, body = http_json(f"{cluster.url}/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert status == 200, body


def test_sigterm_coordinator_drains(procs, tmp_path):
    cluster = Cluster(procs, demo_model_dir(2), tmp_path, coordinator_extra=STAR).start()
    late = {}

    def term():
        cluster.coordinator.send_signal(signal.SIGTERM)
        # The streams (150 tokens) keep the draining coordinator up while it refuses new work.
        late["ready"] = wait_until(lambda: http_json(f"{cluster.url}/readyz")[0] == 503 and 503, what="draining")
        late["status"] = http_json(f"{cluster.url}/v1/completions", {"prompt": "x", "max_tokens": 2})[0]

    results = run_streams(cluster.url, fault=term, prompts=PROMPTS[:3], max_tokens=150)
    for r in results:
        assert r["status"] == 200 and r["error"] is None and r["finish"] in ("length", "stop"), r
    assert late == {"status": 503, "ready": 503}
    assert cluster.coordinator.wait(timeout=120) == 0


def test_sigterm_stage_drains(procs, tmp_path):
    cluster = Cluster(procs, demo_model_dir(2), tmp_path, coordinator_extra=STAR).start()
    url = cluster.stage_urls[1][0]
    late = {}

    def term():
        cluster.stage_procs[url].send_signal(signal.SIGTERM)
        late["stage_ready"] = wait_until(lambda: http_json(f"{url}/readyz")[0] == 503 and 503, what="stage draining")

    results = run_streams(cluster.url, fault=term, prompts=PROMPTS[:3], max_tokens=150)
    for r in results:
        assert r["status"] == 200 and r["error"] is None and r["finish"] in ("length", "stop"), r
    assert late["stage_ready"] == 503
    assert cluster.stage_procs[url].wait(timeout=120) == 0


def test_sigterm_stage_closes_its_streams_and_exits(procs, tmp_path):
    """A stopping stage closes its open streams (the coordinator's and the previous stage's) itself, before the
    server waits for its handlers: an open stream's handler would hold the exit for the whole shutdown timeout,
    then be cut. Idle sequences (a finished request's prefix-cache entry) do not hold the drain either."""
    cluster = Cluster(procs, demo_model_dir(2), tmp_path, stage_extra={"drain_grace_secs": 600.0}).start()
    url = cluster.stage_urls[1][0]
    status, body = http_json(f"{cluster.url}/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    proc = cluster.stage_procs[url]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log = pathlib.Path(proc.log_path).read_text()
    assert "signal received: draining" in log
    after = log[log.index("signal received: draining") :]
    assert "stream_broken" not in after, after  # closed here, not cut after a timeout
    assert "stream from 127.0.0.1 (peer) closed" in after, after


# -- several hosts: network namespaces joined by veth pairs --------------------------------------------


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def hosts():
    """Two stage hosts in their own network namespaces, each linked to this one by a veth pair."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = f"{os.getpid() % 10000}"
    made = []
    try:
        for i in (1, 2):
            ns, host_if, peer_if = f"clns{tag}h{i}", f"clv{tag}h{i}", f"clp{tag}h{i}"
            subnet = f"10.231.{(os.getpid() + i) % 250}"
            _sh("ip", "netns", "add", ns)
            made.append((ns, host_if))
            _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
            _sh("ip", "link", "set", peer_if, "netns", ns)
            _sh("ip", "addr", "add", f"{subnet}.1/24", "dev", host_if)
            _sh("ip", "link", "set", host_if, "up")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/24", "dev", peer_if)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", peer_if, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns, host_if in made:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"network namespaces unavailable here: {exc.stderr.decode().strip()}")
    yield [(ns, host_if, f"10.231.{(os.getpid() + i) % 250}.2") for i, (ns, host_if) in enumerate(made, start=1)]
    for ns, host_if in made:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("topology", ["star", "chain"])
def test_link_down_between_hosts(procs, tmp_path, hosts, topology):
    """Stage 1 has a replica on each of two hosts; the link to the busy one goes down mid-generation. In the chain,
    stage 0 (this host) sends to stage 1 (the other hosts) itself, and the cut link stalls that hop."""
    model = demo_model_dir(2)
    # Stages on other hosts need a cluster token (secure by default).
    token = {"security": {"cluster_token": "link-test-token"}}
    extra = {**HUNG_REPLICA, "topology": topology, **token}
    cluster = Cluster(procs, model, tmp_path, replicas=2, stage_extra=token, coordinator_extra=extra)
    # Stage 0 stays on loopback; stage 1's replicas move to the two namespaced hosts.
    for r, (_ns, _, addr) in enumerate(hosts):
        old = cluster.stage_urls[1][r]
        port = int(old.rsplit(":", 1)[1])
        new = f"http://{addr}:{port}"
        cfg = cluster.stage_cfgs.pop(old)
        cfg.write_text(cfg.read_text().replace("host: 127.0.0.1", f"host: {addr}"))
        cluster.stage_cfgs[new] = cfg
        cluster.stage_urls[1][r] = new
    cluster.stage_urls[0] = cluster.stage_urls[0][:1]
    cluster.start_stage(cluster.stage_urls[0][0])
    for r, (ns, _, _) in enumerate(hosts):
        cluster.start_stage(cluster.stage_urls[1][r], netns=ns)
    cluster.start_coordinator()
    reference = run_streams(cluster.url, prompts=PROMPTS[:4])
    down = {}

    def cut():
        url = busy_replica(cluster, 1)
        down["url"] = url
        down["if"] = next(h for (ns, h, addr) in hosts if addr in url)
        _sh("ip", "link", "set", down["if"], "down")

    try:
        results = run_streams(cluster.url, fault=cut, prompts=PROMPTS[:4])
        assert_all_complete(results, reference)
        wait_until(lambda: replica_state(cluster, down["url"]) == "unhealthy", what="cut replica unhealthy")
    finally:
        if "if" in down:
            _sh("ip", "link", "set", down["if"], "up")
    wait_until(lambda: replica_state(cluster, down["url"]) == "healthy", what="rejoin after link up")
    wait_ready(cluster.url, cluster.coordinator)
